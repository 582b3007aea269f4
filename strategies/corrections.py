"""Real (predicted, true) Dice pairs from human corrections, and the recalibration they feed.

When an annotator saves a ``final`` label for a case that has a pseudo-label (``original`` tag, or a stored
model prediction), the true Dice of every structure of that pseudo-label is known: it is its overlap with the
final label. ``record_correction`` stores these pairs (with the Dice the estimator had predicted for that
label) in the record store; ``recalibrate`` fits the estimator's calibration (monotone map + conformal
quantiles, :mod:`labelsentinel.models.calibration`) from every pair of the current estimator version and keeps
it in the store under ``calibration:<version>``; ``calibrate_records`` applies it to quality records at read
time (the raw prediction stays in the record). No MONAI Label import.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from labelsentinel.io import VolumeError, check_same_grid, load_label
from labelsentinel.models.calibration import Calibration, structure_key
from labelsentinel.store import Store, file_stamp

logger = logging.getLogger(__name__)


def true_dice_per_structure(pseudo: np.ndarray, final: np.ndarray) -> dict[int, float]:
    """Dice of every structure present in either label (absent from both is not a structure here)."""
    ids = sorted((set(np.unique(pseudo).tolist()) | set(np.unique(final).tolist())) - {0})
    out = {}
    for i in ids:
        a, b = pseudo == i, final == i
        s = int(a.sum()) + int(b.sum())
        out[int(i)] = 2.0 * int(np.logical_and(a, b).sum()) / s if s else 1.0
    return out


def record_correction(store: Store, image_id: str, tag: str, pseudo_path: str, final_path: str,
                      names: dict[int, str] | None = None, force: bool = False) -> dict | None:
    """Store the real pairs of one corrected pseudo-label; skip when both files are unchanged since last time.

    Returns ``{"image_id", "tag", "structures": [...], "skipped": bool}`` or raises VolumeError.
    """
    q = store.get_quality(image_id, tag)
    rec = (q or {}).get("record") or {}
    pseudo_stamp = file_stamp(pseudo_path)
    # The prediction belongs to this pseudo-label only if the quality record was made from this very file: a
    # pseudo-label replaced since its last scoring has no prediction yet (its pairs come with the next scoring).
    scored_stamp = (q or {}).get("label_stamp") or ""
    if rec and (scored_stamp.split("|") + [""])[1] != pseudo_stamp:
        rec = {}
    # the pair is redone when either file changed or the pseudo-label was rescored (by another estimator, or
    # at last for this file)
    stamp = f"{pseudo_stamp}|{file_stamp(final_path)}|{rec.get('estimator_version')}|{scored_stamp if rec else ''}"
    if not force and store.correction_stamp(image_id, tag) == stamp:
        return {"image_id": image_id, "tag": tag, "skipped": True}
    pseudo, final = load_label(pseudo_path), load_label(final_path)
    check_same_grid(pseudo, final)
    true = true_dice_per_structure(pseudo.array, final.array)
    predicted = {int(s["id"]): float(s["predicted_dice"]) for s in rec.get("structures", [])}
    version = rec.get("estimator_version")
    names = names or {}
    rows = []
    for sid, t in true.items():
        rows.append({"id": sid, "name": names.get(sid), "predicted": predicted.get(sid), "true_dice": t,
                     # a structure the pseudo-label lacks was never predicted: it has no pair for calibration
                     "estimator_version": version if sid in predicted else None})
    store.put_corrections(image_id, tag, stamp, rows)
    n_pairs = sum(r["predicted"] is not None for r in rows)
    logger.info(f"correction of {image_id}/{tag}: {len(rows)} structures, {n_pairs} real (predicted, true) pairs")
    return {"image_id": image_id, "tag": tag, "structures": rows, "skipped": False}


def calibration_key(version: str) -> str:
    return f"calibration:{version}"


def recalibrate(store: Store, version: str, prior_mae: float, trained_cases=()) -> dict:
    """Fit the calibration of estimator ``version`` from all its real pairs and keep it in the store.

    ``trained_cases``: cases a fine-tuned ``version`` was trained on; their pairs fit the map but give no
    conformal residuals (the weights know them: the bound would be too tight)."""
    pairs = [r for r in store.corrections(version) if r["predicted"] is not None]
    p = np.array([r["predicted"] for r in pairs], float)
    t = np.array([r["true_dice"] for r in pairs], float)
    groups = [structure_key(r) for r in pairs]
    trained = set(trained_cases or ())
    cal = Calibration.fit(p, t, prior_mae=prior_mae, groups=groups,
                          conformal=[r["image_id"] not in trained for r in pairs],
                          cases=[f"{r['image_id']}/{r['tag']}" for r in pairs])
    d = cal.to_dict()
    d.update(version=version, ts=time.time(), cases=len({(r["image_id"], r["tag"]) for r in pairs}))
    store.set_setting(calibration_key(version), d)
    return d


def load_calibration(store: Store, version: str, prior_mae: float = 0.1) -> Calibration:
    return Calibration.from_dict(store.get_setting(calibration_key(version)), prior_mae)


def calibrate_records(records: list[dict], cal_for_version) -> list[dict]:
    """Copies of quality records whose ``predicted_dice`` is calibrated (raw kept as ``raw_predicted_dice``).

    ``cal_for_version(version) -> Calibration``; records of a version without real pairs stay as they are.
    """
    out = []
    cache: dict = {}
    for rec in records:
        v = rec.get("estimator_version")
        if v not in cache:
            cache[v] = cal_for_version(v)
        cal = cache[v]
        if cal is None or cal.n < 3:
            out.append(rec)
            continue
        structs = []
        for s in rec.get("structures", []):
            s = dict(s)
            s["raw_predicted_dice"] = s["predicted_dice"]
            group = structure_key(s)
            s["predicted_dice"] = round(float(cal.apply(s["predicted_dice"], group)), 4)
            s["lower_bound"] = round(float(cal.lower_bound(s["raw_predicted_dice"], group=group)), 4)
            structs.append(s)
        out.append({**rec, "structures": structs, "calibrated": bool(cal.applied)})
    return out


def _recorded_final_stamp(store: Store, image_id: str, tag: str) -> str | None:
    stamp = store.correction_stamp(image_id, tag)
    return stamp.split("|")[1] if stamp and stamp.count("|") >= 1 else None


def collect_corrections(pairs, store: Store, names=None) -> dict:
    """``pairs``: iterable of (image_id, tag, pseudo_path, final_path). Returns counts and errors.

    A final label replaced by a file that cannot be read takes its earlier pairs with it (``removed``): they
    measured a label that is no longer there. A read error on a final label unchanged since its pairs were
    recorded (or a file that cannot even be looked at) keeps them: it may pass."""
    done, skipped, errors, removed = 0, 0, {}, []
    for image_id, tag, pseudo, final in pairs:
        try:
            r = record_correction(store, image_id, tag, pseudo, final, names)
            skipped += bool(r and r.get("skipped"))
            done += bool(r and not r.get("skipped"))
        except (VolumeError, OSError) as e:
            errors[f"{image_id}/{tag}"] = str(e)
            logger.error(f"correction of {image_id}/{tag} not recorded: {e}")
            if isinstance(e, VolumeError):
                old = _recorded_final_stamp(store, image_id, tag)
                try:
                    now = file_stamp(final)
                except OSError:
                    now = old
                if old is not None and now != old and store.remove_corrections(image_id, tag):
                    removed.append(f"{image_id}/{tag}")
                    logger.info(f"correction pairs of {image_id}/{tag} removed: its final label was replaced by "
                                "one that cannot be read")
    return {"recorded": done, "unchanged": skipped, "errors": errors, "removed": removed}


def prune_corrections(store: Store, with_final) -> list[str]:
    """Remove the pairs of images that no longer have a final label (``with_final``: the image ids that have one,
    from a successful listing of the datastore). Returns the removed ``image/tag`` pairs."""
    keep = set(with_final)
    gone = sorted({(r["image_id"], r["tag"]) for r in store.corrections() if r["image_id"] not in keep})
    for image_id, tag in gone:
        store.remove_corrections(image_id, tag)
    if gone:
        logger.info(f"correction pairs removed, their final label is gone: {[f'{i}/{t}' for i, t in gone]}")
    return [f"{i}/{t}" for i, t in gone]
