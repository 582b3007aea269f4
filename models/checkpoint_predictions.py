"""Label errors the way a model makes them: predictions of the segmentation network at early checkpoints.

The synthetic degradations of :mod:`labelsentinel.models.degradations` are geometric; a real pseudo-label
source (nnU-Net, TotalSegmentator, the server's own model) errs differently: blobs that leak into a
neighbour of similar intensity, organs only partly found, speckle. Those errors are what an undertrained
network produces, so we make some: the app's ``small`` UNet is trained from scratch on the (image, good
label) pairs and, at a few early iterations, its prediction of every pair is kept. The true Dice of every
structure of a prediction against the good label is known, as for any degradation (kind
``model_checkpoint``).

Deterministic under a seed on the CPU (fixed torch seed, a seeded order of training volumes, whole volumes,
no augmentation). Costs about a second per iteration on 2 CPU cores with the real CT among the pairs.
No MONAI Label import.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

DEFAULT_ITERATIONS = (50, 100, 200, 400, 800)
PATCH = (64, 64, 32)  # training patch (voxels): iterations stay cheap whatever the volume
# A label set of more structures is left out: on the real CT's 61 structures the small network reached a mean
# Dice of 0.05 after 400 iterations (290 s on 2 CPU cores), predictions too poor to teach anything.
MAX_STRUCTURES = 16
KIND = "model_checkpoint"


def _pad8(a: np.ndarray, fill) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad every axis to a multiple of 8 (the UNet halves the grid three times)."""
    pads = [(0, (-n) % 8) for n in a.shape]
    return np.pad(a, pads, constant_values=fill), tuple(slice(0, n) for n in a.shape)


def _groups(volumes) -> list[list[int]]:
    """Pairs that label about the same structures train one network together (phantoms with or without a
    gallbladder, apart from a real CT with 61 structures): a pair joins the first group whose structure set
    overlaps its own by at least half (Jaccard), largest sets first."""
    sets = [frozenset(int(v) for v in np.unique(lab) if v) for _, lab in volumes]
    groups: list[tuple[set, list[int]]] = []
    for i in sorted(range(len(sets)), key=lambda i: (-len(sets[i]), i)):
        if not sets[i]:
            continue
        for ids, members in groups:
            if len(ids & sets[i]) / len(ids | sets[i]) >= 0.5:
                ids |= sets[i]
                members.append(i)
                break
        else:
            groups.append((set(sets[i]), [i]))
    return [sorted(m) for _, m in sorted(groups, key=lambda g: min(g[1]))]


def early_checkpoint_predictions(
    volumes: list[tuple[np.ndarray, np.ndarray]],
    iterations=DEFAULT_ITERATIONS,
    seed: int = 0,
    lr: float = 3e-3,
    patch=PATCH,
    progress: bool = True,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Train the ``small`` UNet from scratch on ``volumes`` ([(image HU, good label), ...], each pair on its
    own grid; one network per set of structure ids, on random patches) and yield ``(pair index, iteration,
    predicted label)`` for every pair at every iteration in ``iterations`` (whole-volume predictions, in the
    good labels' ids)."""
    iterations = sorted({int(i) for i in iterations if int(i) > 0})
    if not volumes or not iterations:
        return
    for gi, group in enumerate(_groups(volumes)):
        n_ids = len({int(v) for i in group for v in np.unique(volumes[i][1]) if v})
        if n_ids > MAX_STRUCTURES:
            if progress:
                print(f"  model checkpoints: {len(group)} pair(s) with {n_ids} structures left out (more than "
                      f"{MAX_STRUCTURES}: the small network learns too little of them in a few hundred iterations)",
                      file=sys.stderr, flush=True)
            continue
        yield from _train_group([volumes[i] for i in group], group, iterations, seed + 1000 * gi, lr, patch, progress)


def _train_group(volumes, index, iterations, seed, lr, patch, progress):
    from monai.losses import DiceCELoss

    from labelsentinel.models.segmentation import build_network, scale_hu

    ids = sorted({int(v) for _, lab in volumes for v in np.unique(lab) if v})
    lut = np.zeros(max(ids) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    back = np.asarray([0] + ids, np.int32)
    data, crops = [], []
    for img, lab in volumes:
        x = scale_hu(img)
        x, crop = _pad8(x, 0.0)
        y, _ = _pad8(lut[np.asarray(lab, np.int64)], 0)
        data.append((torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]))
        crops.append(crop)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network("small", len(ids) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t0 = time.time()
    for it in range(1, iterations[-1] + 1):
        x, y = data[int(rng.integers(len(data)))]
        # a random patch (a multiple of 8 on every axis, at most the padded volume)
        size = [min(p, n) for p, n in zip(patch, x.shape[2:])]
        lo = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, x.shape[2:])]
        sl = (slice(None), slice(None)) + tuple(slice(a, a + s) for a, s in zip(lo, size))
        net.train()
        opt.zero_grad()
        loss_fn(net(x[sl]), y[sl]).backward()
        opt.step()
        if it in iterations:
            net.eval()
            with torch.no_grad():
                for i, ((x_i, _), crop) in enumerate(zip(data, crops)):
                    yield index[i], it, back[net(x_i).argmax(1)[0].numpy()[crop]]
            if progress:
                print(f"  model checkpoints: {len(ids)} structures, iteration {it}/{iterations[-1]}, "
                      f"{len(data)} predictions ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
