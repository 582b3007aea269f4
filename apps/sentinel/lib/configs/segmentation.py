"""TaskConfig of the multi-structure segmentation model.

Options (``--conf key value``):
- ``labels``: JSON file mapping structure id to name (default: the app's labels.json, the phantom structures).
- ``preset``: small (default, CPU) | medium | large (GPU); see labelsentinel.models.segmentation.
- ``use_pretrained_model``: true (default) to start from the weights shipped in ``apps/sentinel/pretrained``.
"""

from __future__ import annotations

import logging
import os
from monailabel.utils.others.generic import strtobool

from monailabel.interfaces.config import TaskConfig

import lib.infers
import lib.trainers
from labelsentinel.io import load_label_names
from labelsentinel.models.segmentation import build_network, get_preset

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Segmentation(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        names = load_label_names(conf.get("labels") or os.path.join(APP_DIR, "labels.json"))
        self.labels = {names[i]: i for i in sorted(names)}  # MONAI Label convention: name -> id
        self.preset = get_preset(conf.get("preset", "small"))
        pretrained = os.path.join(APP_DIR, "pretrained", f"{name}_{self.preset.name}.pt")
        use_pretrained = strtobool(conf.get("use_pretrained_model", "true"))
        self.path = [pretrained if use_pretrained else None, os.path.join(model_dir, f"{name}.pt")]
        self.network = build_network(self.preset.name, len(self.labels) + 1)
        logger.info(f"segmentation: preset {self.preset.name} ({self.preset.description}); {len(self.labels)} structures")

    def infer(self):
        return lib.infers.Segmentation(
            path=self.path,
            network=self.network,
            labels=self.labels,
            spacing=self.preset.spacing,
            roi_size=self.preset.roi_size,
            description=f"Multi-structure segmentation ({self.preset.name}: {self.preset.description})",
        )

    def trainer(self):
        output_dir = os.path.join(self.model_dir, self.name)
        load_path = self.path[1] if os.path.exists(self.path[1]) else self.path[0]
        return lib.trainers.Segmentation(
            model_dir=output_dir,
            network=self.network,
            labels=self.labels,
            spacing=self.preset.spacing,
            roi_size=self.preset.roi_size,
            load_path=load_path,
            publish_path=self.path[1],
            description=f"Train the multi-structure segmentation model on final labels ({self.preset.name})",
        )
