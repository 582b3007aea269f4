"""Case-level quality from per-structure predictions, ranking, and the "good enough" threshold.

Records are plain dicts as the quality scoring stores them::

    {"case": "case_003", "structures": [{"id": 5, "name": "liver", "predicted_dice": 0.91, "voxels": 12000,
                                          "flags": []}, ...]}

Aggregation (``method``):
- ``min``: the worst structure decides (default: one bad structure is enough to need a human);
- ``mean``: plain mean over structures;
- ``volume_weighted``: mean weighted by voxels (big organs dominate, as in a voxel-wise Dice); a missing
  structure weighs as much as the mean present one.
``structures`` restricts the aggregation to a subset (names or ids). A structure the project expects but
the label lacks (listed in the record's ``missing``, written by the scoring, or passed as ``expected``)
counts as Dice 0: the estimator cannot score what is not there, and a missing organ needs a human.

Good enough: a label is not worth a correction when its predicted Dice is so close to perfect that the
predicted gain ``1 - d`` is within the estimator's own error. With the estimator's measured mean absolute
error ``mae``, the threshold is ``1 - k * mae`` (``k`` = 2 by default: for a roughly Laplace-shaped error,
MAE x 2 covers about 86% of errors, so a label above the threshold is within noise of perfect), capped by
``cap`` (0.97) so that a very accurate estimator does not demand perfection. See :func:`good_enough_threshold`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METHODS = ("min", "mean", "volume_weighted")


@dataclass
class RankedCase:
    case_id: str
    score: float  # aggregated predicted Dice (lower = needs a human more)
    worst: list[dict] = field(default_factory=list)  # the worst structures: {"id", "name", "predicted_dice"}
    record: dict | None = None


def structures_of(record: dict) -> list[dict]:
    """The record's scored structures plus its missing expected ones (predicted Dice 0, flag "missing")."""
    out = list(record.get("structures") or [])
    for m in record.get("missing") or []:
        m = m if isinstance(m, dict) else {"id": m, "name": None}
        out.append({"id": m["id"], "name": m.get("name"), "predicted_dice": 0.0, "voxels": 0, "flags": ["missing"]})
    return out


def _selected(structures: list[dict], subset) -> list[dict]:
    if not subset:
        return list(structures)
    keys = {str(s).strip().lower() for s in subset}
    return [s for s in structures if str(s.get("id")) in keys or str(s.get("name") or "").lower() in keys]


def unknown_structures(records: list[dict], subset) -> list[str]:
    """The entries of a structure filter (names or ids) that match no structure of any of ``records`` (a typo:
    the filter would silently leave every case out). Nothing is unknown when there are no records."""
    if not subset or not records:
        return []
    known = set()
    for r in records:
        for s in structures_of(r):
            known.add(str(s.get("id")))
            known.add(str(s.get("name") or "").lower())
    return [x for x in subset if str(x).strip().lower() not in known]


def _check(d) -> float:
    d = float(d)
    if math.isnan(d) or d < 0 or d > 1:
        raise ValueError(f"predicted Dice must be in [0, 1], got {d}")
    return d


def aggregate(record: dict, method: str = "min", structures=None, expected=None) -> float | None:
    """The case's predicted quality, or None when none of the chosen structures is there."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(METHODS)}")
    allst = structures_of(record)
    sel = _selected(allst, structures)
    # A missing structure has no voxels to weigh by: for ``volume_weighted`` it weighs as much as the mean of
    # the structures that are there (weight 1 would make a missing liver all but invisible).
    there = [max(1, int(s.get("voxels") or 1)) for s in sel if "missing" not in (s.get("flags") or ())]
    typical = sum(there) / len(there) if there else 1.0
    vals = [(_check(s["predicted_dice"]), typical if "missing" in (s.get("flags") or ()) else max(1, int(s.get("voxels") or 1)))
            for s in sel]
    present = {int(s["id"]) for s in allst}
    for i in sorted(set(expected or ()) - present):
        if not structures or str(i) in {str(x) for x in structures}:
            vals.append((0.0, typical))  # an expected structure that is missing: Dice 0
    if not vals:
        return None
    if method == "min":
        return min(v for v, _ in vals)
    if method == "mean":
        return sum(v for v, _ in vals) / len(vals)
    w = sum(n for _, n in vals)
    return sum(v * n for v, n in vals) / w


def good_enough_threshold(estimator_mae: float, k: float = 2.0, cap: float = 0.97) -> float:
    if estimator_mae is None or math.isnan(estimator_mae) or estimator_mae < 0:
        raise ValueError(f"estimator MAE must be a number >= 0, got {estimator_mae}")
    return max(0.0, min(cap, 1.0 - k * estimator_mae))


def worth_correcting(predicted_dice: float, estimator_mae: float, k: float = 2.0) -> bool:
    """True when the predicted gain of a correction is larger than the estimator's noise."""
    return (1.0 - _check(predicted_dice)) > k * estimator_mae


def rank_cases(records: list[dict], method: str = "min", structures=None, threshold: float | None = None,
               exclude=(), expected=None, worst_n: int = 3) -> list[RankedCase]:
    """Cases by need of a human: lowest aggregated predicted Dice first, ties by case id.

    Cases in ``exclude`` and cases at or above ``threshold`` (good enough) are left out, as are cases with
    none of the chosen structures.
    """
    out = []
    excluded = set(exclude)
    for r in records:
        cid = r["case"]
        if cid in excluded:
            continue
        score = aggregate(r, method, structures, expected)
        if score is None or (threshold is not None and score >= threshold):
            continue
        sel = sorted(_selected(structures_of(r), structures), key=lambda s: (s["predicted_dice"], str(s["id"])))
        worst = [{"id": s["id"], "name": s.get("name"), "predicted_dice": s["predicted_dice"]} for s in sel[:worst_n]]
        out.append(RankedCase(cid, float(score), worst, r))
    out.sort(key=lambda c: (c.score, c.case_id))
    return out
