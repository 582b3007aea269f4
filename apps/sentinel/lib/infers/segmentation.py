"""Multi-structure segmentation inference task."""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SqueezeDimd,
)
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.post import Restored

from labelsentinel.io import VolumeError
from labelsentinel.models.segmentation import HU_WINDOW
from lib.transforms import ChannelsToLabelIdsd

logger = logging.getLogger(__name__)


def header_shape(path: str):
    """Spatial shape from a NIfTI header without reading the voxels (None for other formats)."""
    if not (path.endswith(".nii") or path.endswith(".nii.gz")):
        return None
    import nibabel as nib

    try:
        return tuple(int(s) for s in nib.load(path).shape[:3])
    except Exception as e:
        raise VolumeError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


class Segmentation(BasicInferTask):
    def __init__(self, path, network, labels: dict[str, int], spacing, roi_size, description="", **kwargs):
        self.spacing = spacing
        self.ids = list(labels.values())  # network channel i+1 -> structure id ids[i]
        super().__init__(
            path=path,
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=description,
            roi_size=roi_size,
            **kwargs,
        )

    def pre_transforms(self, data=None):
        return [
            LoadImaged(keys="image"),
            EnsureTyped(keys="image", device=data.get("device") if data else None),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=self.spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        ]

    def inferer(self, data=None):
        return SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=1, overlap=0.25)

    def inverse_transforms(self, data=None):
        return []  # invert the pre-transforms (spacing, orientation)

    def post_transforms(self, data=None):
        return [
            EnsureTyped(keys="pred", device=data.get("device") if data else None),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="pred", argmax=True),
            SqueezeDimd(keys="pred", dim=0),
            ChannelsToLabelIdsd(keys="pred", ids=self.ids),
            Restored(keys="pred", ref_image="image"),
        ]

    def writer(self, data, extension=None, dtype=None):
        label_dtype = "uint8" if max(self.ids, default=0) < 256 else "int16"  # ids, not floats
        return super().writer(data, extension=extension, dtype=dtype or label_dtype)

    def __call__(self, request, callbacks=None):
        if self.get_path() is None:
            # MONAI Label would run the untrained network and return noise as a label
            raise HTTPException(
                status_code=409,
                detail="the segmentation model has no weights yet: the shipped ones do not fit this configuration "
                       "(or use_pretrained_model is false) and no model has been trained; train first "
                       "(POST /train/segmentation, Slicer's or OHIF's Train)")
        image = request.get("image")
        try:
            if isinstance(image, str) and os.path.isfile(image):
                label = request.get("label")
                if isinstance(label, str) and os.path.isfile(label):
                    si, sl = header_shape(image), header_shape(label)
                    if si is not None and sl is not None and si != sl:
                        raise VolumeError(
                            f"label shape {sl} does not match image shape {si} (image {image}, label {label})"
                        )
        except VolumeError as e:
            logger.error(f"infer refused: {e}")
            raise HTTPException(status_code=422, detail=str(e)) from e
        try:
            return super().__call__(request, callbacks)
        except HTTPException:
            raise
        except Exception as e:  # e.g. a corrupt or truncated image: name the file and the reason
            logger.exception(f"inference failed on {image}")
            raise HTTPException(status_code=500, detail=f"inference failed on {image}: {type(e).__name__}: {e}") from e
