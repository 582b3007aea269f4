"""Flags suspect final labels from per-sample training signals (no MONAI Label, no torch).

Two signals, gathered by the trainer at several checkpoints of one training run (see
``labelsentinel.models.training_signals`` for how a checkpoint's maps are computed):

- **VoG** (variance of gradients): the gradient of the label's log-likelihood with respect to the input
  image, at every checkpoint. A label that disagrees with the image keeps pulling the network in changing
  directions, so its gradient map varies more across checkpoints. The per-voxel variance is accumulated with
  Welford's update (memory: two maps per sample, whatever the number of checkpoints); a structure's VoG is
  the mean variance over its region (voxels the label *or* the network gives to it, so a missing or
  under-segmented structure is still looked at).
- **loss**: the mean cross-entropy of the label over the same region, averaged over checkpoints.

Both are normalised per structure across samples (robust z-score: median and MAD of that structure), since
large, small, bright and faint structures have very different raw values; a sample's score is its worst
(largest) structure z-score. ``suspects`` ranks samples by it.
"""

from __future__ import annotations

import numpy as np


class Welford:
    """Running mean and variance of arrays of one shape."""

    def __init__(self):
        self.n = 0
        self.mean = None
        self.m2 = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self.n += 1
        if self.mean is None:
            self.mean = x.copy()
            self.m2 = np.zeros_like(x)
            return
        if x.shape != self.mean.shape:
            raise ValueError(f"shape changed between updates: {self.mean.shape} then {x.shape}")
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def variance(self) -> np.ndarray:
        if self.n < 2:
            return np.zeros_like(self.mean)
        return self.m2 / (self.n - 1)


class LabelErrorSignals:
    """Accumulates checkpoint maps per sample; ``scores()`` gives per-sample, per-structure signals."""

    def __init__(self, ids: list[int] | None = None):
        self.ids = ids  # class index c (1..C-1) -> structure id ids[c-1]; None: the index is the id
        self._grad: dict[str, Welford] = {}
        self._loss: dict[str, dict[int, list[float]]] = {}
        self._region: dict[str, dict[int, np.ndarray]] = {}

    def _sid(self, c: int) -> int:
        return int(self.ids[c - 1]) if self.ids else int(c)

    def update(self, sample: str, grad: np.ndarray, ce: np.ndarray, pred: np.ndarray, label: np.ndarray) -> None:
        """One checkpoint of one sample: input-gradient map, per-voxel cross-entropy of the label, the
        network's prediction and the label (class indices, same shape)."""
        self._grad.setdefault(sample, Welford()).update(grad)
        loss = self._loss.setdefault(sample, {})
        regions = self._region.setdefault(sample, {})
        classes = (set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {0}
        for c in sorted(classes):
            region = (label == c) | (pred == c)
            regions[c] = region | regions[c] if c in regions else region
            loss.setdefault(c, []).append(float(ce[region].mean()))

    @property
    def checkpoints(self) -> int:
        return max((w.n for w in self._grad.values()), default=0)

    def raw(self) -> dict[str, dict[int, dict]]:
        out = {}
        for s, w in self._grad.items():
            var = w.variance()
            out[s] = {c: {"vog": float(var[reg].mean()), "loss": float(np.mean(self._loss[s][c]))}
                      for c, reg in self._region[s].items() if reg.any()}
        return out

    def scores(self, names: dict[int, str] | None = None) -> dict[str, dict]:
        raw = self.raw()
        names = names or {}
        z = {}
        for key in ("vog", "loss"):
            by_c: dict[int, list[tuple[str, float]]] = {}
            for s, d in raw.items():
                for c, v in d.items():
                    by_c.setdefault(c, []).append((s, v[key]))
            for c, vals in by_c.items():
                arr = np.array([v for _, v in vals], float)
                med = float(np.median(arr))
                mad = float(np.median(np.abs(arr - med))) * 1.4826
                # a floor of 5% of the median keeps a handful of near-identical samples from exploding
                scale = max(mad, 0.05 * abs(med), 1e-12)
                for s, v in vals:
                    z[(s, c, key)] = (v - med) / scale if len(arr) > 1 else 0.0
        out = {}
        for s, d in raw.items():
            structs = []
            for c, v in sorted(d.items()):
                sid = self._sid(c)
                structs.append({"id": sid, "name": names.get(sid), "vog": v["vog"], "loss": v["loss"],
                                "vog_z": round(z[(s, c, "vog")], 4), "loss_z": round(z[(s, c, "loss")], 4)})
            out[s] = {
                "vog": max((x["vog_z"] for x in structs), default=0.0),
                "loss": max((x["loss_z"] for x in structs), default=0.0),
                "checkpoints": self._grad[s].n,
                "structures": structs,
            }
        return out


def suspects(signals: dict[str, dict], by: str = "vog", min_score: float | None = None, exclude=()) -> list[tuple[str, float]]:
    """Samples by suspicion, most suspect first (ties by id): ``[(sample, score), ...]``."""
    if by not in ("vog", "loss"):
        raise ValueError(f"unknown label-error signal {by!r}; choose vog or loss")
    ex = set(exclude)
    rows = [(s, float(d[by])) for s, d in signals.items() if s not in ex and d.get(by) is not None]
    if min_score is not None:
        rows = [r for r in rows if r[1] >= min_score]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def auroc(scores, is_error) -> float:
    """Area under the ROC curve (Mann-Whitney), ties counted half."""
    s = np.asarray(scores, float)
    y = np.asarray(is_error, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
