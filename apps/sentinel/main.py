"""Label Sentinel: the MONAI Label app.

Start with ``monailabel start_server --app apps/sentinel --studies STUDIES --host 127.0.0.1 --port 8000``
(or ``make run``). Options come in with ``--conf key value``; see README.md for the list.
This file only wires the pieces together; the logic lives in ``labelsentinel`` and ``lib/``.
"""

from __future__ import annotations

import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First

from lib.configs.segmentation import Segmentation
from lib.activelearning import Random
from lib.datastore import SentinelDatastore

from labelsentinel import __version__

logger = logging.getLogger(__name__)

CONFIGS = {"segmentation": Segmentation}


class SentinelApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # Set everything the base constructor's init_* calls need before calling it.
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        names = [m.strip() for m in conf.get("models", "segmentation").split(",") if m.strip()]
        unknown = [m for m in names if m not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; available: {', '.join(CONFIGS)}")
        self.configs: dict[str, TaskConfig] = {}
        for n in names:
            c = CONFIGS[n]()
            c.init(n, self.model_dir, conf, None)
            self.configs[n] = c
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Label Sentinel",
            description="Label-quality estimation and quality-driven annotation",
            version=f"{__version__} (monailabel {monailabel.__version__})",
            labels=next(iter(self.configs.values())).labels if self.configs else None,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            return super().init_datastore()
        from monailabel.config import settings

        if not os.path.isdir(self.studies):
            raise ValueError(f"studies folder {self.studies!r} does not exist")
        ds = SentinelDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        images = ds.list_images()
        if not images:
            logger.warning(f"studies folder {self.studies} holds no images: add .nii.gz files (or run labelsentinel sample-data)")
        bad = ds.unreadable_images()
        if bad:
            logger.warning(f"{len(bad)} of {len(images)} studies cannot be read and are not served: {sorted(bad)}")
        return ds

    def init_infers(self) -> dict[str, InferTask]:
        return {k: v.infer() for k, v in self.configs.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        out = {}
        for k, v in self.configs.items():
            t = v.trainer()
            if t:
                out[k] = t
        return out

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {}

    def info(self):
        d = super().info()
        ds = self.datastore()
        if isinstance(ds, SentinelDatastore):
            d["labelsentinel"] = {"unreadable_images": ds.unreadable_images()}
        return d
