"""Demo studies for Label Sentinel: synthetic CT-like phantoms with known truth, plus the real CT.

``labelsentinel sample-data --out DIR [--cases N] [--seed S]`` writes a MONAI Label studies folder::

    DIR/case_000.nii.gz ...            images (int16 HU, anisotropic spacing)
    DIR/totalseg_ct.nii.gz             the real CT shipped in sample-apps/totalseg-ct (Apache-2.0, see NOTICE)
    DIR/labels/original/<id>.nii.gz    pseudo-labels of graded quality (the real CT: TotalSegmentator's prediction)
    DIR/labels/final/<id>.nii.gz       a few approved labels (= truth) so that training can start
    DIR/truth/<id>.nii.gz              the true labels, kept aside (not a datastore tag)
    DIR/truth/pseudo_label_quality.csv the true Dice of every structure of every pseudo-label
    DIR/truth/cases.csv                per case: quality grade, patient sex and age (for group reports)
    DIR/label_names.json               id -> structure name (TotalSegmentator ids)
    DIR/.labelsentinel-sample-data.json   the settings it was written with (written first)

The same seed gives the same bytes. It never overwrites a file: DIR must be new or empty, or a folder it wrote
before with the same settings (then it writes only the files missing there); anything else is refused before
a file is written, so a folder of real studies is never touched.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import shutil
import sys
import time

import numpy as np
from scipy import ndimage

from labelsentinel.io import save_nifti

# TotalSegmentator ids, so that names and ids agree with the real CT.
PHANTOM_LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    52: "aorta",
    63: "inferior_vena_cava",
}

SHAPE = (96, 80, 48)
SPACING = (3.2, 3.2, 5.0)
REAL_CT_ID = "totalseg_ct"
N_FINAL = 3  # cases that start with an approved label

_REPO_SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample-apps", "totalseg-ct")


def _affine() -> np.ndarray:
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(SHAPE, SPACING)]
    return aff


def _grid():
    aff = _affine()
    axes = [aff[i, 3] + np.arange(SHAPE[i]) * SPACING[i] for i in range(3)]
    return np.meshgrid(*axes, indexing="ij")  # world mm: x = patient left, y = anterior, z = superior


def _smooth_field(rng: np.random.Generator, coarse=(7, 6, 5)) -> np.ndarray:
    """A smooth random field in about [-1, 1] on the full grid (cubic upsampling of coarse noise)."""
    c = rng.standard_normal(coarse)
    f = ndimage.zoom(c, [s / k for s, k in zip(SHAPE, coarse)], order=3, mode="nearest")
    f = f[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return f / (np.abs(f).max() + 1e-6)


def _ellipsoid(X, Y, Z, center, radii, angle=0.0, warp=None, warp_amp=0.0):
    """Implicit ellipsoid rotated about z; value < 1 inside; ``warp`` bends the surface."""
    x, y, z = X - center[0], Y - center[1], Z - center[2]
    ca, sa = np.cos(angle), np.sin(angle)
    xr, yr = ca * x + sa * y, -sa * x + ca * y
    f = (xr / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (z / radii[2]) ** 2
    if warp is not None:
        f = f + warp_amp * warp
    return f


def make_phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """One CT-like volume (HU, int16) and its true label (uint8 ids from PHANTOM_LABELS)."""
    X, Y, Z = _grid()
    warp = [_smooth_field(rng) for _ in range(3)]
    texture = _smooth_field(rng, coarse=(24, 20, 12))
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    scale = u(0.88, 1.12)
    meta = {"scale": scale}

    img = np.full(SHAPE, -1000.0, dtype=np.float32)
    lab = np.zeros(SHAPE, dtype=np.uint8)

    # Body, subcutaneous fat, muscle wall, visceral fat.
    brx, bry, byc = u(125, 145), u(92, 108), u(-8, 4)
    body = ((X / brx) ** 2 + ((Y - byc) / bry) ** 2 + 0.04 * warp[0]) < 1
    fat_t = u(12, 28)
    inner = ((X / (brx - fat_t)) ** 2 + ((Y - byc) / (bry - fat_t)) ** 2) < 1
    cavity = ((X / (brx - fat_t - 10)) ** 2 + ((Y - byc) / (bry - fat_t - 10)) ** 2) < 1
    img[body] = -100
    img[inner] = 50
    img[cavity] = -70 + 45 * texture[cavity]  # visceral fat and bowel
    # Diaphragm and lungs at the top.
    zd = u(45, 85)
    dome = zd - 0.0025 * (np.abs(X) - 60) ** 2 + 8 * warp[1]
    lung = cavity & (Z > dome) & (Y < byc + 55) & (np.abs(X - 8) > 22 + 10 * warp[2])
    img[lung] = -850 + 30 * texture[lung]
    # Spine (bone, not labelled) with discs.
    sy = byc - bry + fat_t + u(22, 30)
    vb = (X**2 + (Y - sy) ** 2) < u(15, 19) ** 2
    disc = (np.mod(Z + u(0, 30), 32) < 6)
    img[vb] = np.where(disc[vb], 80, 250 + 350 * (0.5 + 0.5 * texture[vb]))
    canal = (X**2 + (Y - sy + 24) ** 2) < 7**2
    img[canal] = 20

    def place(sid, mask, hu, tex=15.0):
        m = mask & cavity & ~lung
        lab[m] = sid
        img[m] = hu + tex * texture[m]

    organs = {}
    below = Z < dome - 3
    # Liver (right = -x), under the diaphragm.
    c = (u(-75, -55), u(-5, 15), zd - u(30, 45))
    organs[5] = _ellipsoid(X, Y, Z, c, (75 * scale, 72 * scale, 60 * scale), u(-0.2, 0.2), warp[0], 0.25) < 1
    place(5, organs[5] & below, u(55, 70))
    # Stomach (left, anterior), partly air-filled.
    c = (u(30, 50), u(25, 45), zd - u(30, 45))
    st = (_ellipsoid(X, Y, Z, c, (40 * scale, 30 * scale, 38 * scale), u(-0.4, 0.4), warp[1], 0.3) < 1) & below
    place(6, st, 40)
    air = st & (Y > c[1] + u(5, 15)) & ndimage.binary_erosion(st, iterations=2)
    img[air] = -900
    # Spleen (left, posterior).
    c = (u(72, 85), u(-32, -18), zd - u(25, 40))
    place(1, (_ellipsoid(X, Y, Z, c, (22 * scale, 42 * scale, 45 * scale), u(0.3, 0.8), warp[2], 0.3) < 1) & below, u(45, 55))
    # Kidneys: cortex enhanced, medulla darker, hilum notch toward the spine.
    for sid, side in ((2, -1), (3, 1)):
        c = (side * u(46, 56), sy + u(20, 28), u(-40, 5) + (8 if side > 0 else 0))
        f = _ellipsoid(X, Y, Z, c, (21 * scale, 18 * scale, 45 * scale), side * u(0.3, 0.6), warp[1], 0.15)
        hilum = (np.abs(X - (c[0] - side * 16)) < 9) & (np.abs(Z - c[2]) < 14)
        k = (f < 1) & ~hilum
        place(sid, k, 170, 20)
        med = k & (f < 0.45)
        img[med] = 100 + 15 * texture[med]
    # Gallbladder (absent after cholecystectomy in some cases).
    meta["gallbladder_removed"] = bool(rng.uniform() < 0.15)
    if not meta["gallbladder_removed"]:
        c = (u(-45, -30), u(25, 40), zd - u(80, 100))
        place(4, _ellipsoid(X, Y, Z, c, (14, 13, 28), u(-0.5, 0.5), warp[2], 0.2) < 1, 12, 6)
    # Vessels: aorta (contrast, left of the spine) and IVC (right), slightly curved tubes.
    ax, ay = u(10, 20), sy + u(28, 36)
    ar = u(9, 13)
    aorta = ((X - ax - 4 * np.sin(Z / 60)) ** 2 + (Y - ay) ** 2) < ar**2
    ix, iy = -u(18, 28), sy + u(30, 40)
    ivc = (((X - ix) / 1.2) ** 2 + (Y - iy) ** 2 < u(8, 11) ** 2) & (Z < dome + 5)
    place(63, ivc, u(90, 120), 8)
    place(52, aorta, u(170, 230), 8)

    # Partial volume and noise.
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0.4))
    img += rng.normal(0, 12, SHAPE).astype(np.float32)
    meta["structures"] = sorted(int(i) for i in np.unique(lab) if i)
    return np.clip(np.round(img), -1024, 3071).astype(np.int16), lab, meta


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


MANIFEST = ".labelsentinel-sample-data.json"  # written first: marks a folder as this generator's, with its settings


class SampleDataError(ValueError):
    """A request the generator refuses (bad settings, or a folder that holds other data); nothing was written."""


def planned_files(cases: int, real_ct: bool = True) -> list[str]:
    """The files (relative paths) that ``generate`` writes, the manifest aside."""
    files = []
    for i in range(cases):
        cid = f"case_{i:03d}"
        files += [f"{cid}.nii.gz", f"truth/{cid}.nii.gz", f"labels/original/{cid}.nii.gz"]
        if i < N_FINAL:
            files.append(f"labels/final/{cid}.nii.gz")
    files += ["truth/pseudo_label_quality.csv", "truth/cases.csv"]
    if real_ct:
        files += [f"{REAL_CT_ID}.nii.gz", f"labels/original/{REAL_CT_ID}.nii.gz", f"NOTICE-{REAL_CT_ID}.txt"]
    return files + ["label_names.json"]


def _settings(cases: int, seed: int, real_ct: bool, grades) -> dict:
    return {"generator": "labelsentinel sample-data", "format": 1, "cases": int(cases), "seed": int(seed),
            "real_ct": bool(real_ct), "grades": None if grades is None else [float(g) for g in grades]}


def _describe(s: dict) -> str:
    return (f"{s.get('cases')} case(s), seed {s.get('seed')}, {'with' if s.get('real_ct') else 'without'} the real CT"
            + (", own grades" if s.get("grades") is not None else ""))


def check_out_folder(out: str, settings: dict) -> bool:
    """Whether ``out`` may receive these demo studies: True for a new or empty folder, False for a folder this
    generator wrote before with the same settings (only its missing files are written again). Anything else
    (a file, a folder of other data, demo studies of other settings) raises SampleDataError."""
    if not os.path.exists(out):
        return True
    if not os.path.isdir(out):
        raise SampleDataError(f"{out!r} exists and is not a folder")
    entries = sorted(os.listdir(out))
    if not entries:
        return True
    manifest = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            mine = {k: v for k, v in before.items() if k != "files"}
            if mine == settings:
                return False
            raise SampleDataError(
                f"{out!r} holds demo studies written with other settings ({_describe(mine)}; asked for "
                f"{_describe(settings)}); nothing was written. Choose a new or empty folder, or remove {out!r} first."
            )
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise SampleDataError(
        f"{out!r} already holds files that `labelsentinel sample-data` did not write ({shown}); it never writes "
        "demo studies into a folder of other data, so nothing was written. Choose a new or empty folder."
    )


def generate(out: str, cases: int = 12, seed: int = 0, real_ct: bool = True, progress=True, grades=None) -> dict:
    """Write the sample studies folder; returns a summary dict.

    ``grades``: the pseudo-label quality of each case (1 = very good, 0 = clearly wrong); default evenly
    spread from 0.95 to 0.1 in a seeded order.

    ``out`` must be new or empty, or a folder written before by this function with the same settings (then
    only its missing files are written). An existing file is never overwritten: a folder of other data
    raises SampleDataError (a ValueError) before anything is written.
    """
    if isinstance(cases, bool) or not isinstance(cases, numbers.Integral) or cases < 1:
        raise SampleDataError(f"--cases must be a whole number of at least 1, got {cases!r}")
    if grades is not None and len(grades) != cases:
        raise SampleDataError(f"{len(grades)} grades for {cases} cases")
    settings = _settings(cases, seed, real_ct, grades)
    fresh = check_out_folder(out, settings)
    files = planned_files(cases, real_ct)
    missing = [f for f in files if not os.path.exists(os.path.join(out, f))]
    if not fresh and not missing:
        if progress:
            print(f"{out} already holds these demo studies ({_describe(settings)}): nothing to write", file=sys.stderr)
        return {"out": out, "cases": cases, "real_ct": real_ct, "seconds": 0.0, "written": 0, "kept": len(files)}

    from labelsentinel.models.degradations import degrade_case

    t0 = time.time()
    os.makedirs(os.path.join(out, "truth"), exist_ok=True)
    if fresh:
        with open(os.path.join(out, MANIFEST), "w") as f:
            json.dump({**settings, "files": files}, f, indent=1)
    written = []

    def put(rel: str, write) -> None:
        """Write ``rel`` with ``write(path)`` unless it exists (an existing file is never overwritten)."""
        path = os.path.join(out, rel)
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path)
        written.append(rel)

    rng0 = np.random.default_rng(seed)
    if grades is None:
        grades = np.linspace(0.95, 0.1, cases)
        rng0.shuffle(grades)
    # The cases with approved labels are the first ones; their pseudo-labels exist too (real correction pairs).
    quality_rows, case_rows = [], []
    aff = _affine()
    for i in range(cases):
        cid = f"case_{i:03d}"
        rng = np.random.default_rng([seed, i])
        img, truth, meta = make_phantom(rng)
        q = float(grades[i])
        pseudo, dices = degrade_case(truth, SPACING, rng, quality=q, names=PHANTOM_LABELS)
        put(f"{cid}.nii.gz", lambda p: save_nifti(p, img, aff))
        put(f"truth/{cid}.nii.gz", lambda p: save_nifti(p, truth, aff))
        put(f"labels/original/{cid}.nii.gz", lambda p: save_nifti(p, pseudo.astype(np.uint8), aff))
        if i < N_FINAL:
            put(f"labels/final/{cid}.nii.gz", lambda p: save_nifti(p, truth, aff))
        for sid in sorted(dices):
            quality_rows.append([cid, sid, PHANTOM_LABELS.get(sid, str(sid)), f"{dices[sid]:.4f}"])
        sex = "F" if rng.uniform() < 0.5 else "M"
        age = int(rng.integers(22, 88))
        mean_d = float(np.mean(list(dices.values()))) if dices else 1.0
        case_rows.append([cid, f"{q:.3f}", f"{mean_d:.4f}", sex, age, int(i < N_FINAL), int(meta["gallbladder_removed"])])
        if progress:
            print(f"[{i + 1}/{cases}] {cid}: grade {q:.2f}, mean true Dice of pseudo-label {mean_d:.3f}", file=sys.stderr)
    put("truth/pseudo_label_quality.csv",
        lambda p: _write_csv(p, ["case", "label_id", "name", "true_dice"], quality_rows))
    put("truth/cases.csv", lambda p: _write_csv(
        p, ["case", "grade", "mean_true_dice", "sex", "age", "has_final", "gallbladder_removed"], case_rows))
    names = dict(PHANTOM_LABELS)
    if real_ct:
        src = _REPO_SAMPLE
        put(f"{REAL_CT_ID}.nii.gz", lambda p: shutil.copyfile(os.path.join(src, "ct.nii.gz"), p))
        put(f"labels/original/{REAL_CT_ID}.nii.gz", lambda p: shutil.copyfile(os.path.join(src, "seg_fast.nii.gz"), p))
        put(f"NOTICE-{REAL_CT_ID}.txt", lambda p: shutil.copyfile(os.path.join(src, "NOTICE"), p))
        with open(os.path.join(src, "label_names.json")) as f:
            names.update({int(k): v for k, v in json.load(f).items()})

    def write_names(p):
        with open(p, "w") as f:
            json.dump({str(k): names[k] for k in sorted(names)}, f, indent=1)

    put("label_names.json", write_names)  # last: `make run` takes it as the sign of a complete folder
    summary = {"out": out, "cases": cases, "real_ct": real_ct, "seconds": round(time.time() - t0, 2),
               "written": len(written), "kept": len(files) - len(written)}
    if progress:
        what = f"{cases} phantom studies{' and the real CT' if real_ct else ''}"
        if fresh:
            print(f"wrote {what} to {out} in {summary['seconds']} s", file=sys.stderr)
        else:
            print(f"completed {what} in {out}: wrote {len(written)} missing file(s), kept {summary['kept']} "
                  f"in {summary['seconds']} s", file=sys.stderr)
    return summary


def _positive_int(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def cmd_sample_data(args) -> int:
    try:
        generate(args.out, args.cases, args.seed, not args.no_real_ct)
    except SampleDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample-data", help="write demo studies (synthetic phantoms with known truth + the real CT)")
    p.add_argument("--out", required=True,
                   help="studies folder to write: new or empty (or written before with the same settings)")
    p.add_argument("--cases", type=_positive_int, default=12, help="number of synthetic cases (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--no-real-ct", action="store_true", help="leave out the real CT study")
    p.set_defaults(func=cmd_sample_data)
