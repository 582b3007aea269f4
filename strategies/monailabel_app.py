"""The one change a MONAI Label app needs so that Label Sentinel's strategies can answer "nothing to serve,
because ...".

MONAI Label 0.8.5's ``MONAILabelApp.next_sample`` turns any answer without an id into ``{}``, so the reason a
strategy gives (budget spent, every case good enough or out with another annotator, no budget set) never
reaches the annotator, and its /activelearning endpoint reads ``result["id"]`` of any non-empty answer. With
:class:`ReasonedNextSample` first among an app's bases, an answer of our strategies that serves nothing
carries an empty id (clients read it as "nothing to label") and the ``reason``; other strategies are
answered by MONAI Label as before.
"""

from __future__ import annotations

from labelsentinel.strategies.monailabel_adapters import (
    BudgetStrategy,
    FirstStrategy,
    QualityStrategy,
    RandomStrategy,
    ReviewStrategy,
)

SENTINEL_STRATEGIES = (QualityStrategy, BudgetStrategy, ReviewStrategy, RandomStrategy, FirstStrategy)


class ReasonedNextSample:
    """Mixin for a ``MONAILabelApp`` subclass: ``class MyApp(ReasonedNextSample, MONAILabelApp)``."""

    def next_sample(self, request):
        task = self._strategies.get(request.get("strategy") or "random")
        if not isinstance(task, SENTINEL_STRATEGIES):
            return super().next_sample(request)
        res = task(request, self.datastore()) or {}
        if not res.get("id"):
            return {**res, "id": ""}
        res["path"] = self._datastore.get_image_uri(res["id"])
        if self._auto_update_scoring:
            self.async_scoring(None)
        return res
