"""The learned label-quality estimator: image + multi-label mask + structure names -> predicted Dice per structure.

How a structure is seen
-----------------------
For every structure present in the mask the estimator looks at

* a 3D crop of the structure's bounding box **enlarged by a generous margin** (in x/y: 35 % of the extent,
  at least 15 mm; in z: 75 % of the extent, at least 25 mm), so that it also sees what the mask *misses*
  (an organ that goes on above a truncated label, a missing slab, a neighbour that was merged in), resampled by
  area averaging to a fixed grid of ``INPUT_SIZE`` voxels with 5 channels: CT in a soft-tissue window
  (W400/L40), CT in a wide window (W1600/L-200), this structure's mask, the other structures' mask, and
  "inside the image" (0 where the crop leaves the volume);
* cheap global features of the mask at full resolution (``FEATURE_NAMES``): volume in ml, extent in mm,
  connected components, empty slices inside the z-range, how abruptly the mask ends at its first/last
  slice, boundary smoothness, holes, where it lies in the volume, and the CT values inside and just outside;
* the structure's **name**, as a sentence embedding (``models/data/name_embeddings.npz``, made by
  ``scripts/make_name_embeddings.py``); an id without a known name gets a generic fallback embedding and
  the flag ``unknown_name``; the default checkpoint carries a second, name-free network for those (trained
  with ``--name-dropout``, see :func:`attach_unknown_name_network`): an estimate from the image and mask alone.

Array axes are taken as (x, y, z) of the file (z = the slice axis of an axial CT), with ``spacing`` per axis.

A small MONAI ``Regressor`` CNN encodes the crop; its code, the normalised global features and a projection of
the name embedding go through an MLP to a sigmoid: the predicted Dice in [0, 1].

Flags (cheap and exact, not predictions): ``tiny`` (< 64 voxels), ``touches_border`` (the mask reaches a
face of the volume, so part of the structure may lie outside the image), ``multiple_components`` (more than one
26-connected component), ``z_gaps`` (empty slices between the first and last slice of the mask),
``unknown_name``.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from labelsentinel.io import VolumeError

# Bumped whenever the inputs the network sees (features, crop, channels) or its architecture change: a
# checkpoint with another value is refused instead of giving silently wrong numbers.
ESTIMATOR_VERSION = "1.0"
INPUT_SIZE = (24, 24, 32)  # x, y, z voxels of the resampled crop
CHANNELS = ("ct_soft", "ct_wide", "mask", "other_structures", "inside_image")
MARGIN_XY = (0.35, 15.0)  # fraction of extent, minimum mm
MARGIN_Z = (0.75, 25.0)
TINY_VOXELS = 64
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "estimator_default.pt")

FEATURE_NAMES = (
    "log_volume_ml",
    "log_extent_x_mm",
    "log_extent_y_mm",
    "log_extent_z_mm",
    "fill_ratio_bbox",
    "log_components",
    "largest_component_fraction",
    "z_gap_fraction",
    "has_z_gaps",
    "first_slice_area_ratio",
    "last_slice_area_ratio",
    "slice_area_roughness",
    "boundary_ratio",
    "hole_fraction",
    "touches_z_border",
    "touches_xy_border",
    "centroid_x",
    "centroid_y",
    "centroid_z",
    "hu_inside_mean",
    "hu_inside_std",
    "hu_shell_mean",
    "hu_contrast",
    "air_inside_fraction",
    "bone_inside_fraction",
    "shell_other_fraction",
)
N_FEATURES = len(FEATURE_NAMES)
_CC26 = np.ones((3, 3, 3), dtype=bool)


@dataclass
class StructureSample:
    """What the estimator sees of one structure (also the unit of training)."""

    id: int
    voxels: int
    crop: np.ndarray  # (C, *INPUT_SIZE) float16
    features: np.ndarray  # (N_FEATURES,) float32
    flags: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Input checks


def validate_inputs(image, label, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Image float32 without NaN, label int32 >= 0, same shape, 3 positive spacings; VolumeError otherwise."""
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 3 or label.ndim != 3:
        raise VolumeError(f"expected 3D image and label, got image shape {image.shape}, label shape {label.shape}")
    if image.shape != label.shape:
        raise VolumeError(
            f"label and image are on different grids: image shape {tuple(image.shape)}, label shape {tuple(label.shape)}"
        )
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise VolumeError(f"image must be numeric, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        n = int((~np.isfinite(image)).sum())
        raise VolumeError(f"image contains {n} NaN or infinite voxel(s)")
    if np.issubdtype(label.dtype, np.bool_):
        label = label.astype(np.int32)
    elif not np.issubdtype(label.dtype, np.integer):
        if not np.issubdtype(label.dtype, np.floating):
            raise VolumeError(f"label must hold integer ids, got dtype {label.dtype}")
        if not np.isfinite(label).all():
            raise VolumeError("label contains NaN or infinite values")
        frac = np.mod(label, 1) != 0
        if frac.any():
            raise VolumeError(
                f"label values must be integers, found {int(frac.sum())} non-integer value(s) such as {float(label[frac].flat[0]):g}"
            )
    if label.size and label.min() < 0:
        raise VolumeError(f"label values must be >= 0, found {int(label.min())}")
    if label.size and label.max() > 2**31 - 1:
        raise VolumeError(f"label value {label.max()} is too large")
    label = label.astype(np.int32, copy=False)
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise VolumeError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return image, label, sp  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Features


def _pool_bins(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the ``size`` bins that area averaging of ``n`` voxels uses: those of
    ``torch.nn.functional.adaptive_avg_pool3d`` (bin i covers floor(i*n/size) .. ceil((i+1)*n/size))."""
    i = np.arange(size, dtype=np.int64)
    return (i * n) // size, -((-(i + 1) * n) // size)


def _integral(channels: torch.Tensor) -> np.ndarray:
    """Summed-volume table of ``channels`` (C, X, Y, Z): (C, X+1, Y+1, Z+1) float64, a zero plane first on each
    axis, so that the sum over any box is 8 look-ups (float64: exact to ~1e-10 on volumes of millions of voxels)."""
    c, x, y, z = channels.shape
    out = torch.zeros((c, x + 1, y + 1, z + 1), dtype=torch.float64)
    out[:, 1:, 1:, 1:] = channels
    for ax in (1, 2, 3):
        torch.cumsum(out, dim=ax, out=out)
    return out.numpy()


def _box_sums(table: np.ndarray, clo, chi, origin, extent) -> np.ndarray:
    """Sums of the table's channels over the ``INPUT_SIZE`` area-averaging bins of the crop ``clo:chi`` (volume
    coordinates): (C, *INPUT_SIZE). The table covers ``origin .. origin+extent`` and is zero outside (bins are
    clipped to it). Each bin's sum is the signed sum of the table at its 8 corners (one gather per corner)."""
    c, x1, y1, z1 = table.shape
    flat = table.reshape(c, -1)
    stride = (y1 * z1, z1, 1)
    ends = []
    for ax in range(3):
        s, e = _pool_bins(int(chi[ax] - clo[ax]), INPUT_SIZE[ax])
        shape = [1, 1, 1]
        shape[ax] = INPUT_SIZE[ax]
        ends.append([(np.clip(clo[ax] + v - origin[ax], 0, extent[ax]) * stride[ax]).reshape(shape) for v in (s, e)])
    out = np.zeros((c, int(np.prod(INPUT_SIZE))), dtype=np.float64)
    for a in (0, 1):
        for b in (0, 1):
            for d in (0, 1):
                corner = np.take(flat, (ends[0][a] + ends[1][b] + ends[2][d]).ravel(), axis=1)
                if (a + b + d) % 2:
                    out += corner
                else:
                    out -= corner
    return out.reshape(c, *INPUT_SIZE)


class _CaseTables:
    """Per case, once: summed-volume tables of the structure-independent crop channels (CT soft window, CT wide
    window, any structure) over the part of the volume the wanted crops reach. A structure's crop is then a few
    thousand look-ups instead of cropping, windowing and pooling its context box: the same numbers as area
    averaging the padded crop (outside the volume every one of these channels is 0: -1024 HU is below both
    windows, and the label is 0 there)."""

    def __init__(self, image: np.ndarray, label: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]]):
        shape = np.array(label.shape)
        self.shape = shape
        self.origin = np.maximum(np.min([b[0] for b in boxes], axis=0), 0)
        stop = np.minimum(np.max([b[1] for b in boxes], axis=0), shape)
        self.extent = stop - self.origin
        region = tuple(slice(int(a), int(b)) for a, b in zip(self.origin, stop))
        img = torch.from_numpy(np.ascontiguousarray(image[region]))
        ch = torch.empty((3, *img.shape), dtype=torch.float32)
        torch.clamp((img + 160.0) / 400.0, 0.0, 1.0, out=ch[0])
        torch.clamp((img + 1000.0) / 1600.0, 0.0, 1.0, out=ch[1])
        ch[2].copy_(torch.from_numpy(np.ascontiguousarray(label[region])) > 0)
        self.table = _integral(ch)

    def crop(self, sub: np.ndarray, lo: np.ndarray, clo: np.ndarray, chi: np.ndarray) -> np.ndarray:
        """The ``CHANNELS`` of the context crop ``clo:chi`` of the structure whose mask in its bounding box
        (starting at ``lo``) is ``sub``, area-averaged to ``INPUT_SIZE`` (float16)."""
        soft, wide, anything = _box_sums(self.table, clo, chi, self.origin, self.extent)
        mine = _box_sums(_integral(torch.from_numpy(sub)[None].float()), clo, chi, lo, np.array(sub.shape))[0]
        denom = np.ones(INPUT_SIZE)
        inside = np.ones(INPUT_SIZE)
        for ax in range(3):
            s, e = _pool_bins(int(chi[ax] - clo[ax]), INPUT_SIZE[ax])
            shape = [1, 1, 1]
            shape[ax] = INPUT_SIZE[ax]
            n = (e - s).astype(np.float64)
            a = np.clip(clo[ax] + s, 0, self.shape[ax])
            b = np.clip(clo[ax] + e, 0, self.shape[ax])
            denom = denom * n.reshape(shape)
            inside = inside * ((b - a) / n).reshape(shape)
        out = np.stack([soft, wide, mine, anything - mine]) / denom
        return np.concatenate([out, inside[None]]).astype(np.float16)


def _context_box(spacing: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The context crop of a bounding box ``lo:hi``: the box grown by the margins (may leave the volume)."""
    ext_mm = (hi - lo) * spacing
    margin_mm = np.array(
        [max(MARGIN_XY[0] * ext_mm[0], MARGIN_XY[1]), max(MARGIN_XY[0] * ext_mm[1], MARGIN_XY[1]), max(MARGIN_Z[0] * ext_mm[2], MARGIN_Z[1])]
    )
    mv = np.ceil(margin_mm / spacing).astype(int)
    return lo - mv, hi + mv


def _hole_voxels(sub: np.ndarray) -> int:
    """Voxels that ``ndimage.binary_fill_holes(sub)`` would fill (background not 6-connected to the box's faces),
    by one labelling pass instead of fill_holes' iterative propagation (about 2.5x faster on large organs)."""
    bg, n = ndimage.label(~sub)
    if n == 0:
        return 0
    reached = np.zeros(n + 1, dtype=bool)
    reached[0] = True
    for ax in range(3):
        reached[np.unique(np.take(bg, 0, axis=ax))] = True
        reached[np.unique(np.take(bg, -1, axis=ax))] = True
    return int((~reached[bg]).sum())


def _structure_sample(image, label, spacing, sid: int, sl: tuple, count: int, tables: _CaseTables) -> StructureSample:
    shape = label.shape
    sp = np.asarray(spacing, dtype=np.float64)
    lo = np.array([s.start for s in sl])
    hi = np.array([s.stop for s in sl])
    size = hi - lo
    ext_mm = size * sp

    sub = label[sl] == sid
    # Connected components (26-connected).
    cc, ncomp = ndimage.label(sub, structure=_CC26)
    if ncomp > 1:
        sizes = np.bincount(cc.ravel())[1:]
        largest = float(sizes.max()) / count
    else:
        largest = 1.0
    # Slice profile along z.
    areas = sub.sum(axis=(0, 1)).astype(np.float64)
    amax = float(areas.max())
    gaps = int((areas == 0).sum())
    rough = float(np.abs(np.diff(areas)).mean() / amax) if len(areas) > 1 else 1.0
    # Boundary and holes.
    eroded = ndimage.binary_erosion(sub)
    boundary = float(count - int(eroded.sum())) / count
    holes = float(_hole_voxels(sub)) / count
    touches_z = bool(lo[2] == 0 or hi[2] == shape[2])
    touches_xy = bool(lo[0] == 0 or lo[1] == 0 or hi[0] == shape[0] or hi[1] == shape[1])
    idx = np.nonzero(sub)
    centroid = [(float(i.mean()) + l + 0.5) / n for i, l, n in zip(idx, lo, shape)]

    # Intensities inside and in a 1-voxel shell just outside the mask (6-connected, inside the volume): worked
    # out on the bounding box grown by one voxel, not the whole context crop (same voxels, far fewer to visit).
    hu_in = image[sl][sub]
    lo1, hi1 = np.maximum(lo - 1, 0), np.minimum(hi + 1, shape)
    near = tuple(slice(a, b) for a, b in zip(lo1, hi1))
    lab1 = label[near]
    m1 = lab1 == sid
    shell = ndimage.binary_dilation(m1) & ~m1
    hu_shell = image[near][shell]
    in_mean = float(hu_in.mean())
    in_std = float(hu_in.std())
    sh_mean = float(hu_shell.mean()) if hu_shell.size else in_mean
    shell_other = float((lab1[shell] > 0).mean()) if hu_shell.size else 0.0

    feats = np.array(
        [
            math.log(count * float(np.prod(sp)) / 1000.0 + 1e-3),
            math.log(ext_mm[0] + 1.0),
            math.log(ext_mm[1] + 1.0),
            math.log(ext_mm[2] + 1.0),
            count / float(np.prod(size)),
            math.log(ncomp),
            largest,
            gaps / float(size[2]),
            float(gaps > 0),
            areas[0] / amax,
            areas[-1] / amax,
            rough,
            boundary,
            holes,
            float(touches_z),
            float(touches_xy),
            *centroid,
            in_mean / 200.0,
            in_std / 200.0,
            sh_mean / 200.0,
            (in_mean - sh_mean) / 200.0,
            float((hu_in < -400).mean()),
            float((hu_in > 400).mean()),
            shell_other,
        ],
        dtype=np.float32,
    )

    clo, chi = _context_box(sp, lo, hi)
    crop = tables.crop(sub, lo, clo, chi)
    flags = []
    if count < TINY_VOXELS:
        flags.append("tiny")
    if touches_z or touches_xy:
        flags.append("touches_border")
    if ncomp > 1:
        flags.append("multiple_components")
    if gaps > 0:
        flags.append("z_gaps")
    return StructureSample(id=int(sid), voxels=int(count), crop=crop, features=feats, flags=flags)


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def extract_samples(image, label, spacing, ids=None, validate=True, workers: int | None = None) -> list[StructureSample]:
    """One :class:`StructureSample` per structure present (or per id in ``ids`` that is present), by id.

    Structures are independent: with several, they are worked out on ``workers`` threads (default: the cores
    this process may use, at most 4). The array work (numpy, scipy, torch) runs outside Python's lock, so on
    2 cores the real CT's 61 structures take about 0.33 s instead of 0.50 s on one (medians of 10); the result
    is the same. The crop channels come from summed-volume tables made once per case (:class:`_CaseTables`):
    0.33 s instead of 0.43 s with a padded, pooled crop per structure (real CT, 2 threads, medians of 10)."""
    if validate:
        image, label, spacing = validate_inputs(image, label, spacing)
    objs = ndimage.find_objects(label)
    if not objs:
        return []
    counts = np.bincount(label.ravel(), minlength=len(objs) + 1)
    wanted = range(1, len(objs) + 1) if ids is None else sorted(int(i) for i in ids)
    jobs = [(sid, objs[sid - 1], int(counts[sid])) for sid in wanted
            if 1 <= sid <= len(objs) and objs[sid - 1] is not None and counts[sid] > 0]
    if not jobs:
        return []
    sp = np.asarray(spacing, dtype=np.float64)
    tables = _CaseTables(image, label, [_context_box(sp, np.array([x.start for x in j[1]]), np.array([x.stop for x in j[1]]))
                                        for j in jobs])
    n = min(len(jobs), workers or _default_workers())
    if n <= 1:
        return [_structure_sample(image, label, spacing, *j, tables) for j in jobs]
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda j: _structure_sample(image, label, spacing, *j, tables), jobs))


# ----------------------------------------------------------------------------------------------------------
# Network


class EstimatorNet(nn.Module):
    """CNN over the context crop + MLP over global features + name embedding -> Dice in [0, 1]."""

    def __init__(self, in_channels=len(CHANNELS), n_features=N_FEATURES, emb_dim=384, input_size=INPUT_SIZE,
                 channels=(16, 32, 64), hidden=64, emb_proj=16):
        super().__init__()
        from monai.networks.nets import Regressor

        self.cnn = Regressor(
            in_shape=(in_channels, *input_size), out_shape=(hidden,), channels=tuple(channels),
            strides=(2,) * len(channels), num_res_units=1, norm="batch", dropout=0.1,
        )
        self.feat = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.name = nn.Sequential(nn.Linear(emb_dim, emb_proj), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(2 * hidden + emb_proj, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, crop, feats, emb):
        return self.from_code(self.cnn(crop), feats, emb)

    def from_code(self, code, feats, emb):
        """The layers after the CNN, from its output ``code`` (fine-tuning of those layers alone works out the
        codes once)."""
        h = torch.cat([F.relu(code), self.feat(feats), self.name(emb)], dim=1)
        return torch.sigmoid(self.head(h)).squeeze(1)


def net_config() -> dict:
    return {
        "input_size": list(INPUT_SIZE),
        "channels": list(CHANNELS),
        "margin_xy": list(MARGIN_XY),
        "margin_z": list(MARGIN_Z),
        "feature_names": list(FEATURE_NAMES),
        "cnn_channels": [16, 32, 64, 128],
        "hidden": 96,
        "emb_proj": 16,
    }


def build_net(cfg: dict, emb_dim: int) -> EstimatorNet:
    return EstimatorNet(
        in_channels=len(cfg["channels"]), n_features=len(cfg["feature_names"]), emb_dim=emb_dim,
        input_size=tuple(cfg["input_size"]), channels=tuple(cfg["cnn_channels"]), hidden=cfg["hidden"],
        emb_proj=cfg["emb_proj"],
    )


# ----------------------------------------------------------------------------------------------------------
# The scorer


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_version(weights: str | None = None) -> str:
    """The version string of a weights file (what ``QualityEstimator.load(weights).version`` will be),
    without loading the network: lets incremental scoring decide that nothing changed cheaply."""
    path = weights or DEFAULT_WEIGHTS
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: {'weights' if weights else 'default weights'} file not found")
    return "est-" + _sha256(path)[:12]


def save_checkpoint(ckpt: dict, out: str) -> None:
    """Write a checkpoint atomically: a scoring process never reads a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = out + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, out)


def attach_unknown_name_network(main: str, name_free: str, out: str) -> dict:
    """Write ``out``: the checkpoint ``main`` plus the network of ``name_free`` (a checkpoint trained with
    ``--name-dropout``, so it learned to estimate without the structure name) as the network that scores the
    structures whose name is not in the table. The main network, and so every named prediction, is unchanged."""
    a, b = QualityEstimator.load(main).checkpoint, QualityEstimator.load(name_free).checkpoint  # both validated
    if a["input_config"] != b["input_config"] or list(a["name_embeddings"]["names"]) != list(b["name_embeddings"]["names"]):
        raise VolumeError(f"{name_free}: another input configuration or name table than {main}")
    if not b.get("training", {}).get("name_dropout"):
        raise VolumeError(f"{name_free}: was not trained with --name-dropout (it never saw a sample without a name)")
    a = dict(a)
    a["unknown_names"] = {k: b[k] for k in ("state_dict", "feature_mean", "feature_std", "validation", "training")}
    save_checkpoint(a, out)
    return a


class QualityEstimator:
    """Scores labels. ``QualityEstimator.load()`` reads the shipped default weights."""

    def __init__(self, net: EstimatorNet, table, feat_mean, feat_std, checkpoint: dict, version: str,
                 device: str = "cpu", weights_path: str | None = None, unknown_names=None):
        self.net = net.eval().to(device)
        self.table = table
        self.feat_mean = np.asarray(feat_mean, dtype=np.float32)
        self.feat_std = np.asarray(feat_std, dtype=np.float32)
        self.checkpoint = checkpoint
        self.version = version
        self.device = device
        self.weights_path = weights_path
        # (net, feature mean, feature std) of the name-free network that scores structures whose name is not in
        # the table (see ``attach_unknown_name_network``); None: the main network scores them too.
        self.unknown_names = None
        if unknown_names is not None:
            unet, um, us = unknown_names
            self.unknown_names = (unet.eval().to(device), np.asarray(um, np.float32), np.asarray(us, np.float32))

    # -- loading
    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str = "cpu", version: str | None = None, weights_path=None):
        from labelsentinel.models.name_embedding import NameEmbeddings

        if ckpt.get("format") != "labelsentinel-estimator":
            raise VolumeError(f"{weights_path or 'checkpoint'}: not a Label Sentinel estimator checkpoint")
        if ckpt.get("estimator_version") != ESTIMATOR_VERSION:
            raise VolumeError(
                f"{weights_path or 'checkpoint'}: estimator version {ckpt.get('estimator_version')!r} does not match "
                f"this code ({ESTIMATOR_VERSION!r}); retrain with `labelsentinel train-estimator`"
            )
        cfg = ckpt["input_config"]
        if list(cfg["feature_names"]) != list(FEATURE_NAMES) or tuple(cfg["input_size"]) != INPUT_SIZE:
            raise VolumeError(f"{weights_path or 'checkpoint'}: input configuration differs from this code; retrain")
        table = NameEmbeddings.from_state(
            {"names": ckpt["name_embeddings"]["names"], "embeddings": ckpt["name_embeddings"]["embeddings"].float().numpy()}
        )
        net = build_net(cfg, table.dim)
        net.load_state_dict(ckpt["state_dict"])
        unknown = None
        if ckpt.get("unknown_names"):
            un = ckpt["unknown_names"]
            unet = build_net(cfg, table.dim)
            unet.load_state_dict(un["state_dict"])
            unknown = (unet, un["feature_mean"].numpy(), un["feature_std"].numpy())
        if version is None:
            version = "est-" + hashlib.sha256(repr(sorted((k, v.float().sum().item()) for k, v in ckpt["state_dict"].items())).encode()).hexdigest()[:12]
        return cls(net, table, ckpt["feature_mean"].numpy(), ckpt["feature_std"].numpy(), ckpt, version, device,
                   weights_path, unknown_names=unknown)

    @classmethod
    def load(cls, weights: str | None = None, device: str = "cpu") -> "QualityEstimator":
        path = weights or DEFAULT_WEIGHTS
        if not os.path.isfile(path):
            what = "weights file" if weights else "default weights file"
            raise VolumeError(f"{path}: {what} not found" + ("" if weights else " (train one with `labelsentinel train-estimator`)"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VolumeError("--device cuda requested but CUDA is not available")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VolumeError(f"{path}: cannot be read as an estimator checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ckpt, dict):
            raise VolumeError(f"{path}: not a Label Sentinel estimator checkpoint")
        return cls.from_checkpoint(ckpt, device=device, version=weights_version(path), weights_path=path)

    # -- scoring
    def embed(self, names: list[str | None]) -> tuple[np.ndarray, list[bool]]:
        vecs, known = [], []
        for n in names:
            v, k = self.table.lookup(n)
            vecs.append(v)
            known.append(k)
        return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, self.table.dim), np.float32), known

    @torch.no_grad()
    def _run(self, net, fmean, fstd, crops, feats, embs, batch_size):
        out = []
        for i in range(0, len(crops), batch_size):
            c = torch.from_numpy(np.asarray(crops[i : i + batch_size], dtype=np.float32)).to(self.device)
            f = torch.from_numpy(((feats[i : i + batch_size] - fmean) / fstd).astype(np.float32)).to(self.device)
            e = torch.from_numpy(np.asarray(embs[i : i + batch_size], dtype=np.float32)).to(self.device)
            out.append(net(c, f, e).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, crops: np.ndarray, feats: np.ndarray, embs: np.ndarray, batch_size: int = 256,
              known=None) -> np.ndarray:
        """Raw network scoring of stacked samples (crops float16 (N,C,...), feats (N,F), embs (N,D)).
        ``known``: per sample, whether its name is in the table (from :meth:`embed`); the samples whose name is
        not are scored by the name-free network when the checkpoint has one."""
        if known is None or self.unknown_names is None or all(known):
            return self._run(self.net, self.feat_mean, self.feat_std, crops, feats, embs, batch_size)
        k = np.asarray(known, bool)
        out = np.empty(len(k), np.float32)
        if k.any():
            out[k] = self._run(self.net, self.feat_mean, self.feat_std, crops[k], feats[k], embs[k], batch_size)
        out[~k] = self._run(*self.unknown_names, crops[~k], feats[~k], embs[~k], batch_size)
        return out

    def predict_batch(self, items, batch_size: int = 256) -> list[list[dict]]:
        """``items``: iterable of ``(image, label, spacing, names)``; returns one result list per item."""
        per_item, samples, namelist = [], [], []
        for image, label, spacing, names in items:
            names = names or {}
            s = extract_samples(image, label, spacing)
            per_item.append(len(s))
            samples.extend(s)
            namelist.extend(names.get(x.id) for x in s)
        preds = np.zeros(0, np.float32)
        known: list[bool] = []
        if samples:
            embs, known = self.embed(namelist)
            preds = self.score(np.stack([s.crop for s in samples]), np.stack([s.features for s in samples]), embs,
                               batch_size, known=known)
        results, k = [], 0
        for n in per_item:
            res = []
            for j in range(k, k + n):
                s = samples[j]
                flags = list(s.flags) + ([] if known[j] else ["unknown_name"])
                res.append(
                    {"id": s.id, "name": namelist[j], "predicted_dice": round(float(np.clip(preds[j], 0.0, 1.0)), 4),
                     "voxels": s.voxels, "flags": flags}
                )
            results.append(res)
            k += n
        return results

    def predict(self, image: np.ndarray, label: np.ndarray, spacing, names: dict[int, str] | None = None) -> list[dict]:
        """``[{"id", "name", "predicted_dice", "voxels", "flags"}, ...]`` for every structure present, by id."""
        return self.predict_batch([(image, label, spacing, names)])[0]

    # -- the trivial baseline stored with the weights (for the benchmark)
    def baseline_predict(self, feats: np.ndarray) -> np.ndarray:
        b = self.checkpoint.get("baseline")
        if not b:
            raise ValueError("this checkpoint has no baseline")
        x = (np.asarray(feats, np.float32) - self.feat_mean) / self.feat_std
        return np.clip(x @ b["coef"].numpy() + float(b["intercept"]), 0.0, 1.0)
