"""The stock `random` strategy, without MONAI Label 0.8.5's crash when every candidate was served within the
current second (its weights are the seconds since each image was last served, so they can all be 0 and
`random.choices` raises; several annotators clicking Next Sample at once hit it)."""

from __future__ import annotations

import random
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.random import Random as StockRandom


class Random(StockRandom):
    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "random")
        now = int(time.time())
        # +1: an image served this very second still has a (small) chance, and the weights never sum to 0.
        weights = [now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0) + 1 for i in images]
        k = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[k], "weight": weights[k]}
