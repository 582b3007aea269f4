"""TaskConfig of the multi-structure segmentation model.

Options (``--conf key value``):
- ``labels``: JSON file mapping structure id to name (default: the app's labels.json, the phantom structures).
- ``preset``: small (default, CPU) | medium | large (GPU); see labelsentinel.models.segmentation.
- ``use_pretrained_model``: true (default) to start from the weights shipped in ``apps/sentinel/pretrained``
  (made for the app's own labels.json: with other labels they do not fit, and training starts from scratch).

Weights are checked against the network at start-up: shipped weights that do not fit are not used (a warning
says why); a model trained earlier in ``model_dir`` for other labels or another preset stops the start with the
reason, and is left as it is (never trained over).
"""

from __future__ import annotations

import logging
import os

import torch
from monailabel.utils.others.generic import strtobool

from monailabel.interfaces.config import TaskConfig

import lib.infers
import lib.trainers
from labelsentinel.io import load_label_names
from labelsentinel.models.segmentation import build_network, get_preset

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weights_mismatch(path: str, network: torch.nn.Module) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded into ``network`` (None when it fits)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return "holds no network weights"
    want = network.state_dict()
    if set(sd) != set(want):
        return f"is for another network ({len(set(want) - set(sd))} layer(s) missing, {len(set(sd) - set(want))} unknown)"
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            return f"does not fit this network ({k}: {tuple(sd[k].shape)}, this configuration needs {tuple(v.shape)})"
    return None


class Segmentation(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        names = load_label_names(conf.get("labels") or os.path.join(APP_DIR, "labels.json"))
        self.labels = {names[i]: i for i in sorted(names)}  # MONAI Label convention: name -> id
        self.preset = get_preset(conf.get("preset", "small"))
        pretrained = os.path.join(APP_DIR, "pretrained", f"{name}_{self.preset.name}.pt")
        use_pretrained = strtobool(conf.get("use_pretrained_model", "true"))
        self.network = build_network(self.preset.name, len(self.labels) + 1)
        if use_pretrained and os.path.exists(pretrained):
            why = weights_mismatch(pretrained, self.network)
            if why:
                logger.warning(f"segmentation: the shipped weights {pretrained} are not used: the file {why} "
                               f"({len(self.labels)} structures, preset {self.preset.name}); training starts from scratch")
                use_pretrained = False
        published = os.path.join(model_dir, f"{name}.pt")
        # the published model: the server infers with it and a training run starts from it (the trainer's
        # load_path; a run's own checkpoints are no longer resumed from)
        for trained in (published,):
            why = weights_mismatch(trained, self.network) if os.path.exists(trained) else None
            if why:
                raise ValueError(
                    f"the trained model {trained} {why}: it was trained for other labels or another preset than "
                    f"this start asks for ({len(self.labels)} structures, preset {self.preset.name}). It is left as "
                    "it is. Start with another --conf model_dir for this configuration, or move the file away to "
                    "train anew.")
        self.path = [pretrained if use_pretrained else None, published]
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
