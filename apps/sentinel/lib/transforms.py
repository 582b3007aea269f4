"""Label id <-> network channel mapping (structure ids can be sparse, e.g. TotalSegmentator's 52 = aorta)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform


def _assign(x, values):
    if isinstance(x, torch.Tensor):
        y = x.clone()  # keeps MetaTensor metadata
        y.copy_(torch.as_tensor(values, dtype=x.dtype, device=x.device))
        return y
    return np.asarray(values, dtype=np.asarray(x).dtype)


class LabelIdsToChannelsd(MapTransform):
    """Map structure ids to channels 1..N in the order given; any other id (structures the model does not
    segment) becomes background."""

    def __init__(self, keys, ids, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        ids = [int(i) for i in ids]
        lut = np.zeros(max(ids) + 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        self.lut = torch.as_tensor(lut)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            v = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu()).round().long()
            inside = (v >= 0) & (v < len(self.lut))
            mapped = torch.where(inside, self.lut[v.clamp(0, len(self.lut) - 1)], torch.zeros_like(v))
            d[key] = _assign(x, mapped)
        return d


class ChannelsToLabelIdsd(MapTransform):
    """Inverse of LabelIdsToChannelsd for an argmax prediction."""

    def __init__(self, keys, ids, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.ids = torch.as_tensor([0] + [int(i) for i in ids], dtype=torch.int64)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            v = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)).round().long()
            d[key] = _assign(x, self.ids[v.clamp(0, len(self.ids) - 1)])
        return d
