"""The app's local datastore: MONAI Label's LocalDatastore, minus the studies that cannot be read."""

from __future__ import annotations

import logging
import os

from monailabel.datastore.local import LocalDatastore

from labelsentinel.imagecheck import ImageCheckCache

logger = logging.getLogger(__name__)


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

    def datalist(self, full_path=True):
        bad = {os.path.realpath(self.get_image_uri(i)) for i in self.unreadable_images()}
        return [d for d in super().datalist(full_path) if os.path.realpath(d["image"]) not in bad]
