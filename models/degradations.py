"""Label degradations with a known true Dice.

Turns a good multi-label segmentation into a worse one, one structure at a time, and reports the Dice of
the degraded structure against the input. Used to train the label-quality estimator (image + mask +
structure name -> Dice) and to make pseudo-labels of graded quality for the demo studies.

All kinds work on a crop around the structure (its bounding box plus a margin) and paste the result back,
so their cost depends on the structure's size, not the volume's. Distances are in millimetres and respect
anisotropic spacing (axis 2 is z). Every function is deterministic for a given ``np.random.Generator``
state; the input array is never modified.

Kinds (``severity`` in [0, 1]: 0 = barely changed, 1 = very bad):

- ``identity``: unchanged (Dice 1), anchors the top of the scale.
- ``erode_mm`` / ``dilate_mm``: the boundary moves in / out by a distance in mm (up to ~60% of the
  structure's half-thickness inward, ~1.5x outward), as an under- or over-segmenting model does.
- ``shift``: translation by up to half the structure's mean extent, in a random direction.
- ``rotate``: rotation about the centroid, up to 40 degrees, mostly about z.
- ``scale``: isotropic scaling about the centroid by 1 +/- up to 45%.
- ``boundary_noise``: the signed distance map plus a smooth random field, thresholded: a wobbly boundary.
- ``missing_slices``: a share of the z-slices inside the structure's extent emptied (isolated or in runs).
- ``truncate_z``: the z-extent cut from the top or the bottom (10% to 70% of it).
- ``sparse_slices``: only every n-th slice (n = 2 ... 8) annotated, the gaps filled by linear
  interpolation of 2D signed distance maps, as slice-interpolation tools do.
- ``merge_neighbour``: the nearest other structure is absorbed into this one.
- ``swap``: the structure and its left/right partner (``kidney_left`` <-> ``kidney_right``, by name) or,
  without a partner, its nearest neighbour exchange ids.
- ``false_positive``: blobs of this structure added in background far from it (inside the body when an
  image is given).
- ``holes``: spherical holes punched inside.
- ``cut_part``: the part beyond a random plane cut away.
- ``empty``: the structure removed (Dice 0).
- ``coarse``: the mask down-sampled by 2 to 4 (majority) and up-sampled back (nearest): blocky edges.

The errors a network makes (leaks into a neighbour of similar intensity, organs found in part, speckle) come
from :mod:`labelsentinel.models.checkpoint_predictions` (kind ``model_checkpoint``): the predictions of the
segmentation network at early training checkpoints, with their true Dice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

KINDS: tuple[str, ...] = (
    "identity",
    "erode_mm",
    "dilate_mm",
    "shift",
    "rotate",
    "scale",
    "boundary_noise",
    "missing_slices",
    "truncate_z",
    "sparse_slices",
    "merge_neighbour",
    "swap",
    "false_positive",
    "holes",
    "cut_part",
    "empty",
    "coarse",
)

# Kinds a segmentation model's pseudo-label typically shows (used by degrade_case); the strong ones move
# Dice a lot at high severity, the others stay mild and are used only for the better labels.
STRONG_PSEUDO_LABEL_KINDS = ("erode_mm", "dilate_mm", "shift", "missing_slices", "truncate_z", "cut_part",
                             "merge_neighbour", "scale")
PSEUDO_LABEL_KINDS = STRONG_PSEUDO_LABEL_KINDS + ("boundary_noise", "false_positive", "holes", "coarse")


@dataclass
class Degradation:
    label: np.ndarray
    structure_id: int
    kind: str
    severity: float
    params: dict = field(default_factory=dict)
    true_dice: float = 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Binary Dice; both empty -> 1.0, one empty -> 0.0."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    if s == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / s


def structure_dice(pred: np.ndarray, ref: np.ndarray, ids=None) -> dict[int, float]:
    """Dice per structure id present in ``ref`` or ``pred`` (or the given ids)."""
    if ids is None:
        ids = sorted(set(np.unique(ref).tolist()) | set(np.unique(pred).tolist()) - {0})
    return {int(i): dice(pred == i, ref == i) for i in ids if int(i) != 0}


# ---------------------------------------------------------------------------------------------------------
# helpers


def _bbox(mask: np.ndarray):
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    return [(int(a[0]), int(a[-1]) + 1) for a in idx]


def _crop(shape, bbox, spacing, margin_mm):
    sl = []
    for (lo, hi), n, sp, m in zip(bbox, shape, spacing, margin_mm):
        pad = int(np.ceil(m / sp)) + 1
        sl.append(slice(max(0, lo - pad), min(n, hi + pad)))
    return tuple(sl)


def _edt(mask, spacing):
    return ndimage.distance_transform_edt(mask, sampling=spacing)


def _sdf(mask, spacing):
    """Signed distance in mm: negative inside."""
    if not mask.any():
        return np.full(mask.shape, 1e3)
    return _edt(~mask, spacing) - _edt(mask, spacing)


def _half_thickness(mask, spacing) -> float:
    return float(_edt(np.pad(mask, 1), spacing).max()) if mask.any() else 0.0


def _extent_mm(mask, spacing):
    bb = _bbox(mask)
    return np.array([(hi - lo) * sp for (lo, hi), sp in zip(bb, spacing)])


def _affine_mask(mask, spacing, matrix_mm, center_vox, shift_mm=(0, 0, 0)):
    """Apply y = M (x - c) + c + t (mm) to a mask with nearest-neighbour resampling."""
    sp = np.asarray(spacing, float)
    inv = np.linalg.inv(matrix_mm)
    # output voxel o -> input voxel i: i = S^-1 (M^-1 (S o - S c - t) + S c)
    m = np.diag(1 / sp) @ inv @ np.diag(sp)
    c = np.asarray(center_vox, float)
    offset = c - m @ (c + np.asarray(shift_mm) / sp)
    return ndimage.affine_transform(mask.astype(np.uint8), m, offset=offset, order=0, mode="constant", cval=0) > 0


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _partner(sid: int, label: np.ndarray, names: dict | None, spacing, present) -> int | None:
    if names and sid in names:
        n = str(names[sid])
        for a, b in (("left", "right"), ("right", "left")):
            if a in n:
                want = n.replace(a, b)
                for k, v in names.items():
                    if str(v) == want and k in present and k != sid:
                        return int(k)
    return _nearest_structure(sid, label, spacing)


def _nearest_structure(sid: int, label: np.ndarray, spacing) -> int | None:
    m = label == sid
    bb = _bbox(m)
    ext = _extent_mm(m, spacing)
    for grow in (0.5, 1.5, 4.0):
        sl = _crop(label.shape, bb, spacing, np.maximum(ext * grow, 20.0))
        sub = label[sl]
        others = (sub != 0) & (sub != sid)
        if others.any():
            dist = ndimage.distance_transform_edt(sub != sid, sampling=spacing)
            return int(sub[others][np.argmin(dist[others])])
    return None


# ---------------------------------------------------------------------------------------------------------
# the kinds: each takes (mask crop, ctx) and returns a new mask crop (same shape)


def _k_erode(m, ctx):
    r = ctx["sev"] * 0.6 * ctx["half"] + 0.3 * min(ctx["spacing"])
    ctx["params"]["distance_mm"] = round(float(r), 2)
    return _edt(m, ctx["spacing"]) > r


def _k_dilate(m, ctx):
    r = ctx["sev"] * max(1.5 * ctx["half"], 1.2 * max(ctx["spacing"])) + 0.5 * min(ctx["spacing"])
    ctx["params"]["distance_mm"] = round(float(r), 2)
    return _edt(~m, ctx["spacing"]) <= r


def _k_shift(m, ctx):
    rng = ctx["rng"]
    v = rng.normal(size=3)
    v /= np.linalg.norm(v) + 1e-9
    mag = ctx["sev"] * 0.5 * float(ctx["extent"].mean()) + 0.5 * min(ctx["spacing"])
    t = v * mag
    ctx["params"]["shift_mm"] = [round(float(x), 2) for x in t]
    return _affine_mask(m, ctx["spacing"], np.eye(3), ctx["center"], t)


def _k_rotate(m, ctx):
    rng = ctx["rng"]
    axis = 2 if rng.uniform() < 0.6 else int(rng.integers(0, 2))
    ang = np.deg2rad(ctx["sev"] * 40 + 2) * (1 if rng.uniform() < 0.5 else -1)
    ctx["params"].update(axis=axis, degrees=round(float(np.rad2deg(ang)), 2))
    return _affine_mask(m, ctx["spacing"], _rotation(axis, ang), ctx["center"])


def _k_scale(m, ctx):
    f = 1 + (0.45 * ctx["sev"] + 0.02) * (1 if ctx["rng"].uniform() < 0.5 else -1)
    ctx["params"]["factor"] = round(float(f), 3)
    return _affine_mask(m, ctx["spacing"], np.eye(3) * f, ctx["center"])


def _k_noise(m, ctx):
    sp = ctx["spacing"]
    sigma = [max(1.0, 0.12 * e / s) for e, s in zip(ctx["extent"], sp)]
    f = ndimage.gaussian_filter(ctx["rng"].standard_normal(m.shape), sigma)
    f /= np.abs(f).max() + 1e-9
    amp = ctx["sev"] * 1.2 * ctx["half"] + 0.5 * min(sp)
    ctx["params"]["amplitude_mm"] = round(float(amp), 2)
    return _sdf(m, sp) + amp * f < 0


def _z_range(m):
    z = np.flatnonzero(m.any(axis=(0, 1)))
    return int(z[0]), int(z[-1]) + 1


def _k_missing(m, ctx):
    z0, z1 = _z_range(m)
    n = z1 - z0
    k = max(1, int(round((0.08 + 0.55 * ctx["sev"]) * n)))
    rng = ctx["rng"]
    out = m.copy()
    if rng.uniform() < 0.5:  # isolated slices
        zs = rng.choice(np.arange(z0, z1), size=min(k, n), replace=False)
    else:  # one run of consecutive slices inside the extent
        start = int(rng.integers(z0, max(z0 + 1, z1 - k + 1)))
        zs = np.arange(start, min(z1, start + k))
    out[:, :, zs] = False
    ctx["params"]["slices"] = sorted(int(z) for z in zs)
    return out


def _k_truncate(m, ctx):
    z0, z1 = _z_range(m)
    n = z1 - z0
    k = max(1, int(round((0.1 + 0.6 * ctx["sev"]) * n)))
    out = m.copy()
    top = bool(ctx["rng"].uniform() < 0.5)
    if top:
        out[:, :, z1 - k : z1] = False
    else:
        out[:, :, z0 : z0 + k] = False
    ctx["params"].update(side="top" if top else "bottom", slices_removed=k)
    return out


def _k_sparse(m, ctx):
    z0, z1 = _z_range(m)
    n = 2 + int(round(ctx["sev"] * 6))
    keep = list(range(z0, z1, n))
    if keep[-1] != z1 - 1:
        keep.append(z1 - 1)
    out = np.zeros_like(m)
    sdfs = {z: _sdf(m[:, :, z], ctx["spacing"][:2]) for z in keep}
    for a, b in zip(keep[:-1], keep[1:]):
        for z in range(a, b + 1):
            w = (z - a) / (b - a) if b > a else 0.0
            out[:, :, z] = (1 - w) * sdfs[a] + w * sdfs[b] < 0
    ctx["params"]["every_nth"] = n
    return out


def _k_holes(m, ctx):
    sp = np.asarray(ctx["spacing"])
    inner = _edt(m, sp)
    rng = ctx["rng"]
    out = m.copy()
    k = 1 + int(round(ctx["sev"] * 4))
    r = max(0.5 * ctx["half"], 1.1 * float(sp.max())) * (0.6 + 0.6 * ctx["sev"])
    cand = np.argwhere(inner >= min(r * 0.5, inner.max()))
    if len(cand) == 0:
        cand = np.argwhere(m)
    grid = np.indices(m.shape).reshape(3, -1).T * sp
    for c in cand[rng.choice(len(cand), size=min(k, len(cand)), replace=False)]:
        d = np.linalg.norm(grid - c * sp, axis=1).reshape(m.shape)
        out &= d > r
    ctx["params"].update(holes=int(k), radius_mm=round(float(r), 2))
    return out


def _k_cut(m, ctx):
    sp = np.asarray(ctx["spacing"])
    pts = np.argwhere(m) * sp
    v = ctx["rng"].normal(size=3)
    v /= np.linalg.norm(v) + 1e-9
    proj = pts @ v
    q = 1 - (0.08 + 0.6 * ctx["sev"])  # share of the structure kept
    thr = np.quantile(proj, q)
    allp = (np.indices(m.shape).reshape(3, -1).T * sp) @ v
    ctx["params"].update(normal=[round(float(x), 3) for x in v], kept_fraction=round(float(q), 3))
    return m & (allp.reshape(m.shape) <= thr)


def _k_coarse(m, ctx):
    f = 2 + int(round(ctx["sev"] * 2))
    shp = m.shape
    pad = [(0, (-s) % f) for s in shp]
    mp = np.pad(m, pad).astype(np.float32)
    blocks = mp.reshape(mp.shape[0] // f, f, mp.shape[1] // f, f, mp.shape[2] // f, f).mean(axis=(1, 3, 5)) >= 0.5
    up = blocks.repeat(f, 0).repeat(f, 1).repeat(f, 2)[: shp[0], : shp[1], : shp[2]]
    ctx["params"]["factor"] = f
    return up


_MASK_KINDS = {
    "erode_mm": _k_erode,
    "dilate_mm": _k_dilate,
    "shift": _k_shift,
    "rotate": _k_rotate,
    "scale": _k_scale,
    "boundary_noise": _k_noise,
    "missing_slices": _k_missing,
    "truncate_z": _k_truncate,
    "sparse_slices": _k_sparse,
    "holes": _k_holes,
    "cut_part": _k_cut,
    "coarse": _k_coarse,
}


def _margin_mm(kind, extent, half, spacing):
    if kind in ("dilate_mm", "boundary_noise"):
        return np.full(3, 2.0 * half + 2 * max(spacing))
    if kind in ("shift", "rotate", "scale"):
        return np.maximum(extent * 0.75, 2 * max(spacing))
    return np.full(3, 2 * max(spacing))


def degrade(label, structure_id, kind, spacing, rng, *, severity=None, names=None, image=None) -> Degradation:
    """Degrade one structure of a multi-label array; see the module docstring for the kinds."""
    label = np.asarray(label)
    sid = int(structure_id)
    if kind not in KINDS:
        raise ValueError(f"unknown degradation kind {kind!r}; choose one of {', '.join(KINDS)}")
    orig = label == sid
    if not orig.any():
        raise ValueError(f"structure {sid} is not present in the label")
    spacing = tuple(float(s) for s in spacing)
    sev = float(rng.uniform()) if severity is None else float(np.clip(severity, 0.0, 1.0))
    out = label.copy()
    params: dict = {}

    if kind == "identity":
        pass
    elif kind == "empty":
        out[orig] = 0
    elif kind in ("merge_neighbour", "swap"):
        present = set(np.unique(label).tolist()) - {0}
        other = _partner(sid, label, names, spacing, present) if kind == "swap" else _nearest_structure(sid, label, spacing)
        if other is None:  # a lone structure: nothing to merge or swap with
            params["note"] = "no other structure"
        else:
            params["other_id"] = int(other)
            if kind == "merge_neighbour":
                out[label == other] = sid
            else:
                out[orig] = other
                out[label == other] = sid
    elif kind == "false_positive":
        _false_positive(out, orig, sid, spacing, rng, sev, image, params)
    else:
        extent = _extent_mm(orig, spacing)
        bb = _bbox(orig)
        sl0 = _crop(label.shape, bb, spacing, np.full(3, 2 * max(spacing)))
        half = _half_thickness(orig[sl0], spacing)
        sl = _crop(label.shape, bb, spacing, _margin_mm(kind, extent, half, spacing))
        m = orig[sl]
        center = ndimage.center_of_mass(m)
        ctx = {"sev": sev, "spacing": spacing, "rng": rng, "extent": extent, "half": half,
               "center": center, "params": params}
        new = _MASK_KINDS[kind](m, ctx)
        sub = out[sl]
        sub[(sub == sid) & ~new] = 0
        sub[new & (sub == 0)] = sid
    d = dice(out == sid, orig)
    return Degradation(label=out, structure_id=sid, kind=kind, severity=sev, params=params, true_dice=d)


def _false_positive(out, orig, sid, spacing, rng, sev, image, params):
    sp = np.asarray(spacing)
    vol = float(orig.sum() * np.prod(sp))
    k = 1 + int(round(sev * 3))
    r = (3 * vol / (4 * np.pi)) ** (1 / 3) * (0.25 + 0.45 * sev)
    r = max(r, 1.5 * float(sp.max()))
    allowed = out == 0
    if image is not None:
        allowed &= np.asarray(image) > -500  # inside the body
    far = ndimage.distance_transform_edt(~orig, sampling=sp) > 2 * r + 10
    cand = np.argwhere(allowed & far)
    if len(cand) == 0:
        cand = np.argwhere(out == 0)
    if len(cand) == 0:
        params["note"] = "no background"
        return
    rad = np.ceil(r / sp).astype(int)
    centers = cand[rng.choice(len(cand), size=min(k, len(cand)), replace=False)]
    for c in centers:
        lo = np.maximum(c - rad, 0)
        hi = np.minimum(c + rad + 1, out.shape)
        g = np.indices(hi - lo).reshape(3, -1).T + lo
        inside = np.linalg.norm((g - c) * sp, axis=1) <= r
        g = g[inside]
        sub = out[g[:, 0], g[:, 1], g[:, 2]]
        keep = sub == 0
        out[g[keep, 0], g[keep, 1], g[keep, 2]] = sid
    params.update(blobs=int(len(centers)), radius_mm=round(float(r), 2))


def random_degradation(label, spacing, rng, *, names=None, kinds=None, structure_ids=None, image=None) -> Degradation:
    """A random structure, kind and severity. Severities lean mild so true Dice is spread over [0.4, 1]."""
    label = np.asarray(label)
    ids = list(structure_ids) if structure_ids is not None else sorted(int(i) for i in np.unique(label) if i)
    if not ids:
        raise ValueError("the label has no structure to degrade")
    sid = int(ids[rng.integers(len(ids))])
    kinds = tuple(kinds) if kinds else KINDS
    p = np.array([0.25 if k == "empty" else 0.6 if k in ("identity", "swap") else 1.0 for k in kinds])
    kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
    sev = float(rng.uniform() ** 1.3)
    return degrade(label, sid, kind, spacing, rng, severity=sev, names=names, image=image)


def degrade_case(label, spacing, rng, *, quality: float, names=None, image=None) -> tuple[np.ndarray, dict[int, float]]:
    """A pseudo-label of overall quality ``quality`` (1 = very good, 0 = clearly wrong).

    Every structure is degraded (per-structure quality varies around ``quality``); returns the new label
    and the true Dice of every structure of the input against it.
    """
    label = np.asarray(label)
    ids = sorted(int(i) for i in np.unique(label) if i)
    out = label.copy()
    for sid in ids:
        if not (out == sid).any():
            continue  # absorbed by an earlier merge
        q = float(np.clip(quality + rng.normal(0, 0.12), 0.0, 1.0))
        if q < 0.12 and rng.uniform() < 0.4:
            kind = "empty"
        elif q > 0.93 and rng.uniform() < 0.5:
            kind = "identity"
        else:
            pool = PSEUDO_LABEL_KINDS if q > 0.5 else STRONG_PSEUDO_LABEL_KINDS
            kind = pool[rng.integers(len(pool))]
        sev = float(np.clip(1.0 - q + rng.normal(0, 0.05), 0.0, 1.0))
        out = degrade(out, sid, kind, spacing, rng, severity=sev, names=names, image=image).label
    return out, structure_dice(out, label, ids)
