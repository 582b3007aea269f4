"""Flags suspect final labels from per-sample training signals (no MONAI Label, no torch).

Two signals, gathered by the trainer at several checkpoints of one training run (see
``labelsentinel.models.training_signals`` for how a checkpoint's maps are computed):

- **VoG** (variance of gradients): the gradient of the label's log-likelihood with respect to the input
  image, at every checkpoint. A label that disagrees with the image keeps pulling the network in changing
  directions, so its gradient map varies more across checkpoints. Every checkpoint's maps are first divided
  by that checkpoint's mean absolute gradient over all samples: gradients shrink by orders of magnitude as
  training goes on, and without this the variance mostly measures how large the first checkpoint's gradients
  were, not how unstable a sample is. The per-voxel variance is accumulated with Welford's update (memory:
  three float maps per sample, whatever the number of checkpoints: a checkpoint's map waits until the
  checkpoint is complete and its scale known; plus the label and one 64-bit set per voxel of the classes
  the network gave it, whatever the number of structures up to 63). A structure's VoG is the mean variance
  over the voxels whose label is in question: where the label and the network (at some checkpoint)
  disagree about the structure, and the label's surface. A missing or under-segmented structure is still looked at (the network's voxels count),
  and an error on the boundary of a large structure is not diluted by its interior.
- **loss**: the mean cross-entropy of the label over the voxels the label *or* the network gives to the
  structure, averaged over checkpoints.

Both are normalised per structure across samples (robust z-score: median and MAD of that structure), since
large, small, bright and faint structures have very different raw values; a sample's score is its worst
(largest) structure z-score. ``suspects`` ranks samples by it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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
    """Accumulates checkpoint maps per sample; ``scores()`` gives per-sample, per-structure signals.

    Feed every sample at one checkpoint before any sample at the next (what a trainer's checkpoint loop
    does): a checkpoint's gradient scale is complete when the next checkpoint starts."""

    def __init__(self, ids: list[int] | None = None):
        self.ids = ids  # class index c (1..C-1) -> structure id ids[c-1]; None: the index is the id
        self._grad: dict[str, Welford] = {}
        self._pending: dict[str, tuple[int, np.ndarray]] = {}  # sample -> (checkpoint, raw gradient map)
        self._abs_sum: dict[int, float] = {}  # checkpoint -> sum of |gradient| over every sample's voxels
        self._voxels: dict[int, int] = {}
        self._loss: dict[str, dict[int, list[float]]] = {}
        # sample -> bit sets: bit c % 64 of word c // 64 of a voxel is set once the network gave class c to it at
        # some checkpoint (8 bytes a voxel up to 63 classes, instead of one map per class: a CT with 60
        # structures would need 60 maps per sample)
        self._pred_bits: dict[str, list[np.ndarray]] = {}
        self._classes: dict[str, set[int]] = {}  # sample -> classes in its label or its predictions
        self._label: dict[str, np.ndarray] = {}

    def _sid(self, c: int) -> int:
        return int(self.ids[c - 1]) if self.ids else int(c)

    def _scale(self, k: int) -> float:
        return max(self._abs_sum[k] / max(self._voxels[k], 1), 1e-30)

    def _fold(self, sample: str) -> None:
        """Add the sample's waiting map, divided by its checkpoint's gradient scale, to its running variance."""
        k, g = self._pending.pop(sample)
        self._grad.setdefault(sample, Welford()).update(g / np.float32(self._scale(k)))

    def update(self, sample: str, grad: np.ndarray, ce: np.ndarray, pred: np.ndarray, label: np.ndarray) -> None:
        """One checkpoint of one sample: input-gradient map, per-voxel cross-entropy of the label, the
        network's prediction and the label (class indices, same shape)."""
        grad = np.asarray(grad, np.float32)
        if sample in self._pending:  # the previous checkpoint is complete: its scale is known
            self._fold(sample)
        w = self._grad.get(sample)
        if w is not None and w.mean.shape != grad.shape:
            raise ValueError(f"shape changed between updates: {w.mean.shape} then {grad.shape}")
        k = w.n if w is not None else 0  # this sample's checkpoint index: every earlier map is folded
        self._pending[sample] = (k, grad.copy())
        self._abs_sum[k] = self._abs_sum.get(k, 0.0) + float(np.abs(grad, dtype=np.float64).sum())
        self._voxels[k] = self._voxels.get(k, 0) + grad.size
        loss = self._loss.setdefault(sample, {})
        label = np.asarray(label)
        pred = np.asarray(pred)
        self._label[sample] = label.astype(np.int16) if label.size and 0 <= label.min() and label.max() < 2**15 else label
        classes = (set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {0}
        self._classes[sample] = self._classes.get(sample, set()) | classes
        bits = self._pred_bits.setdefault(sample, [])
        p64 = pred.astype(np.uint64)
        for w in range(int(pred.max()) // 64 + 1 if pred.size else 0):
            if w == len(bits):
                bits.append(np.zeros(pred.shape, np.uint64))
            sel = (p64 >> np.uint64(6)) == w
            bits[w] |= np.where(sel, np.left_shift(np.uint64(1), p64 & np.uint64(63)), np.uint64(0))
        for c in sorted(classes):
            loss.setdefault(c, []).append(float(ce[(label == c) | (pred == c)].mean()))

    @property
    def checkpoints(self) -> int:
        return max(((self._grad[s].n if s in self._grad else 0) + (s in self._pending) for s in self._label), default=0)

    def _pred_any(self, sample: str, c: int) -> np.ndarray:
        """Voxels the network gave to class ``c`` of ``sample`` at some checkpoint."""
        bits, w = self._pred_bits[sample], c // 64
        if w >= len(bits):
            return np.zeros(self._label[sample].shape, bool)
        return ((bits[w] >> np.uint64(c % 64)) & np.uint64(1)).astype(bool)

    def raw(self) -> dict[str, dict[int, dict]]:
        for s in list(self._pending):
            self._fold(s)
        out = {}
        for s, w in self._grad.items():
            var = w.variance()
            out[s] = {c: {"vog": float(var[reg].mean()), "loss": float(np.mean(self._loss[s][c]))}
                      for c, reg in self._vog_regions(s).items() if reg.any()}
        return out

    def _vog_regions(self, sample: str) -> dict[int, np.ndarray]:
        """Per class, the voxels whose label is in question: those the network gave to the structure at some
        checkpoint but the label does not, those of the structure the network never gave to it, and the label's
        surface (one voxel either side). Averaging over the whole structure instead dilutes an error on its
        boundary in its interior, where label and network agree."""
        label = self._label[sample]
        objs = ndimage.find_objects(label.astype(np.int64, copy=False))
        out = {}
        for c in sorted(self._classes[sample]):
            m = label == c
            reg = self._pred_any(sample, c) ^ m
            sl = objs[c - 1] if 0 < c <= len(objs) else None
            if sl is not None:
                box = tuple(slice(max(a.start - 1, 0), min(a.stop + 1, n)) for a, n in zip(sl, label.shape))
                mb = m[box]
                reg[box] |= ndimage.binary_dilation(mb) & ~ndimage.binary_erosion(mb)
            out[c] = reg
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


def suspects(signals: dict[str, dict], by: str = "loss", min_score: float | None = None, exclude=()) -> list[tuple[str, float]]:
    """Samples by suspicion, most suspect first (ties by id): ``[(sample, score), ...]``."""
    if by not in ("vog", "loss"):
        raise ValueError(f"unknown label-error signal {by!r}; choose vog or loss")
    ex = set(exclude)
    rows = [(s, float(d[by])) for s, d in signals.items() if s not in ex and d.get(by) is not None]
    if min_score is not None:
        rows = [r for r in rows if r[1] >= min_score]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def review_state(signals: dict[str, dict], final_labels: dict[str, str | None]) -> tuple[set[str], set[str]]:
    """(reviewed, gone): samples whose final label was saved again since the signals were taken (an annotator
    looked at it), and samples whose final label is no longer there (deleted: nobody reviewed it, but there is
    nothing left to review). ``final_labels``: sample -> path of its final label now (None: none)."""
    from labelsentinel.store import file_stamp

    reviewed, gone = set(), set()
    for s, rec in signals.items():
        path = final_labels.get(s)
        try:
            if path is None:
                gone.add(s)
            elif file_stamp(path) != rec.get("label_stamp"):
                reviewed.add(s)
        except OSError:
            gone.add(s)
    return reviewed, gone


def reviewed_since(signals: dict[str, dict], final_labels: dict[str, str | None]) -> set[str]:
    """Samples that are no longer suspects: final label saved again since the signals were taken, or gone
    (see :func:`review_state` to tell the two apart)."""
    reviewed, gone = review_state(signals, final_labels)
    return reviewed | gone


def auroc(scores, is_error) -> float:
    """Area under the ROC curve (Mann-Whitney), ties counted half."""
    s = np.asarray(scores, float)
    y = np.asarray(is_error, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
