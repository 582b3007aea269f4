"""A minimal MONAI Label app that adds Label Sentinel's quality scoring and strategies to another team's
app. Copy the marked lines into your own ``main.py``; everything else is an ordinary MONAI Label app.

Run (with label-sentinel installed in the server's Python, and PYTHONPATH set for background tasks):
    monailabel start_server --app sample-apps/add-to-your-app --studies STUDIES --host 127.0.0.1 --port 8000
"""

import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

# --- Label Sentinel (1/2): imports ---------------------------------------------------------------------
from labelsentinel.io import load_label_names
from labelsentinel.store import Store, store_path
from labelsentinel.strategies.monailabel_adapters import BudgetStrategy, QualityScoring, QualityStrategy
from labelsentinel.strategies.ranking import good_enough_threshold


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # --- Label Sentinel (2/2): a record store next to the studies, a threshold, and the tasks -------
        self.sentinel_store = Store(store_path(studies))
        self.good_enough = good_enough_threshold(0.06)  # the estimator's MAE: see BENCHMARKS.md
        names_file = os.path.join(studies, "label_names.json")
        self.structure_names = load_label_names(names_file) if os.path.exists(names_file) else {}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Your app + Label Sentinel")

    def init_strategies(self):
        store = lambda: self.sentinel_store  # noqa: E731
        return {
            "random": Random(),
            "quality": QualityStrategy(store, self.good_enough),
            "budget": BudgetStrategy(store, self.good_enough),
        }

    def init_scoring_methods(self):
        return {"quality": QualityScoring(lambda: self.sentinel_store, self.structure_names)}
