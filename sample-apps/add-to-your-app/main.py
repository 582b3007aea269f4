"""A minimal MONAI Label app that adds Label Sentinel's quality scoring and strategies to another team's
app. Copy the marked lines into your own ``main.py``; everything else is an ordinary MONAI Label app.

Run (with label-sentinel installed in the server's Python, and PYTHONPATH set for background tasks):
    monailabel start_server --app sample-apps/add-to-your-app --studies STUDIES --host 127.0.0.1 --port 8000
"""

import os

from monailabel.interfaces.app import MONAILabelApp

# --- Label Sentinel (1/3): imports ---------------------------------------------------------------------
from labelsentinel.io import load_label_names
from labelsentinel.store import Store, store_path
from labelsentinel.strategies.monailabel_adapters import (
    BudgetStrategy,
    QualityScoring,
    QualityStrategy,
    RandomStrategy,
)
from labelsentinel.strategies.monailabel_app import ReasonedNextSample
from labelsentinel.strategies.ranking import good_enough_threshold


# --- Label Sentinel (2/3): ReasonedNextSample first among the bases (a strategy with nothing to serve
# answers with its reason), a record store next to the studies, a threshold and the structure names -------
class MyApp(ReasonedNextSample, MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.sentinel_store = Store(store_path(studies))
        self.good_enough = good_enough_threshold(0.06)  # the estimator's MAE: see BENCHMARKS.md
        names_file = os.path.join(studies, "label_names.json")
        self.structure_names = load_label_names(names_file) if os.path.exists(names_file) else {}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Your app + Label Sentinel")

    # --- Label Sentinel (3/3): the strategies and the scoring method --------------------------------------
    def init_strategies(self):
        store = lambda: self.sentinel_store  # noqa: E731
        return {
            "random": RandomStrategy(store),  # MONAI Label's random order, with the annotators' leases
            "quality": QualityStrategy(store, self.good_enough),
            "budget": BudgetStrategy(store, self.good_enough),
        }

    def init_scoring_methods(self):
        return {"quality": QualityScoring(lambda: self.sentinel_store, self.structure_names)}
