"""Multi-structure segmentation training task (trains on `final` labels)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
    Spacingd,
)
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.infers.segmentation import HU_WINDOW, header_shape
from lib.transforms import LabelIdsToChannelsd
from labelsentinel.io import VolumeError

logger = logging.getLogger(__name__)


def check_pairs(datalist: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split a datalist into usable pairs and refused ones (unreadable, or label shape != image shape)."""
    good, refused = [], []
    for d in datalist:
        try:
            si, sl = header_shape(d["image"]), header_shape(d["label"])
            if si is not None and sl is not None and si != sl:
                raise VolumeError(
                    f"label shape {sl} does not match image shape {si} (image {d['image']}, label {d['label']})"
                )
            good.append(d)
        except VolumeError as e:
            logger.error(f"training skips a pair: {e}")
            refused.append({"image": d["image"], "label": d["label"], "error": str(e)})
    return good, refused


class Segmentation(BasicTrainTask):
    def __init__(self, model_dir, network, labels: dict[str, int], spacing, roi_size, description="", **kwargs):
        self._network = network
        self.ids = list(labels.values())
        self.spacing = spacing
        self.roi_size = roi_size
        super().__init__(model_dir, description, labels=labels, amp=torch.cuda.is_available(), **kwargs)
        self._config.update({"max_epochs": 20, "val_split": 0.2, "lr": 2e-3})

    def network(self, context: Context):
        return self._network

    def optimizer(self, context: Context):
        return torch.optim.AdamW(context.network.parameters(), lr=float(context.request.get("lr", 2e-3)), weight_decay=1e-5)

    def loss_function(self, context: Context):
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def pre_process(self, request, datastore):
        good, refused = check_pairs(datastore.datalist())
        report = os.path.join(self._model_dir, "train_refused.json")
        os.makedirs(self._model_dir, exist_ok=True)
        with open(report, "w") as f:
            json.dump({"ts": int(time.time()), "refused": refused}, f, indent=1)
        if not good:
            msg = "no usable final labels to train on"
            if refused:
                msg += f"; refused: {'; '.join(r['error'] for r in refused)}"
            raise ValueError(msg)
        return good

    def _load(self, keys):
        return [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=self.spacing, mode=("bilinear", "nearest")[: len(keys)]),
            LabelIdsToChannelsd(keys="label", ids=self.ids),
            ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        ]

    def train_pre_transforms(self, context: Context):
        keys = ("image", "label")
        return [
            *self._load(keys),
            SpatialPadd(keys=keys, spatial_size=self.roi_size),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=self.roi_size, pos=2, neg=1, num_samples=1),
            # No flips: left/right structures (kidney_left/right) must keep their side.
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            EnsureTyped(keys=keys, device=context.device),
        ]

    def train_post_transforms(self, context: Context):
        n = len(self.ids) + 1
        return [
            EnsureTyped(keys="pred", device=context.device),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(n, n)),
        ]

    def val_pre_transforms(self, context: Context):
        keys = ("image", "label")
        return [*self._load(keys), EnsureTyped(keys=keys, device=context.device)]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=1, overlap=0.25)
