"""Segmentation networks of the Label Sentinel app (MONAI networks), selectable by preset.

``small`` trains a few epochs on the sample studies on 2 CPU cores in minutes; ``medium`` and ``large`` are
for a server with a GPU. Every preset works on a fixed target spacing; the app resamples to it and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# CT intensity window (HU) every preset's input is scaled from to [0, 1]: the app's infer and train transforms,
# the estimator's checkpoint predictions and the benchmarks all use this one.
HU_WINDOW = (-250.0, 350.0)


def scale_hu(image: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] float32 by ``HU_WINDOW`` (clipped), as the app's ``ScaleIntensityRanged`` does."""
    return np.clip((np.asarray(image, np.float32) - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1)


@dataclass(frozen=True)
class Preset:
    name: str
    spacing: tuple[float, float, float]  # mm
    roi_size: tuple[int, int, int]  # sliding-window / training patch size (voxels at `spacing`)
    description: str


PRESETS: dict[str, Preset] = {
    "small": Preset("small", (3.2, 3.2, 5.0), (96, 96, 48), "UNet 8-16-32-64, 3.2 x 3.2 x 5 mm: CPU-friendly"),
    "medium": Preset("medium", (2.0, 2.0, 3.0), (128, 128, 64), "UNet 16-32-64-128-256 with 2 residual units"),
    "large": Preset("large", (1.5, 1.5, 2.0), (128, 128, 96), "SegResNet, 32 initial filters (GPU)"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def build_network(preset: str, num_classes: int) -> torch.nn.Module:
    """``num_classes`` includes the background."""
    from monai.networks.nets import SegResNet, UNet

    p = get_preset(preset)
    if p.name == "small":
        return UNet(3, 1, num_classes, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="instance")
    if p.name == "medium":
        return UNet(3, 1, num_classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
