"""The app's local datastore: MONAI Label's LocalDatastore, minus the studies that cannot be read."""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from labelsentinel.imagecheck import ImageCheckCache
from labelsentinel.io import label_upload_problem

logger = logging.getLogger(__name__)


def refuse_bad_label(datastore, image_id: str, label_filename: str, label_tag: str) -> None:
    try:
        image = datastore.get_image_uri(image_id)
    except Exception:  # an unknown image: MONAI Label's own save reports it
        return
    problem = label_upload_problem(image, label_filename)
    if problem:
        logger.error(f"{label_tag} label of {image_id} refused: {problem}")
        raise HTTPException(status_code=422, detail=f"the {label_tag} label of {image_id} was NOT saved: {problem}")


class SentinelDatastore(LocalDatastore):
    """Unreadable images are logged (file and reason) and kept out of active learning and training."""

    def __init__(self, datastore_path: str, **kwargs):
        super().__init__(datastore_path, **kwargs)
        self._checks = ImageCheckCache(os.path.join(datastore_path, ".labelsentinel", "image_checks.json"))

    def image_error(self, image_id: str) -> str | None:
        try:
            return self._checks.check(self.get_image_uri(image_id))
        except Exception as e:  # an id whose file vanished
            return f"{image_id}: {e}"

    def unreadable_images(self) -> dict[str, str]:
        out = {}
        for i in self.list_images():
            err = self.image_error(i)
            if err:
                out[i] = err
        return out

    def get_labeled_images(self, label_tag=None, labels=None):
        return [i for i in super().get_labeled_images(label_tag, labels) if not self.image_error(i)]

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return [i for i in super().get_unlabeled_images(label_tag, labels) if not self.image_error(i)]

    def save_label(self, image_id, label_filename, label_tag, label_info):
        """Refuses (HTTP 422, nothing stored) a label that cannot be read or is not on the image's grid: stored,
        it would mark the case as labelled while no training or correction could use it."""
        refuse_bad_label(self, image_id, label_filename, label_tag)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def datalist(self, full_path=True):
        bad = {os.path.realpath(self.get_image_uri(i)) for i in self.unreadable_images()}
        return [d for d in super().datalist(full_path) if os.path.realpath(d["image"]) not in bad]
