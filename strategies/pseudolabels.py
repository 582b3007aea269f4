"""Which pseudo-labels the segmentation trainer may learn from (no MONAI Label import).

A pseudo-label is a candidate when its case has no ``final`` label and it was scored. Its case quality is the
aggregate (default: the worst structure, missing expected structures count as 0) of the *calibrated*
predicted Dice. Rules:

- ``lower_bound`` (default): keep it when the conformal lower bound of its calibrated quality is at least
  ``threshold`` (default 0.85): with the estimator's measured error (its validation MAE before any human
  correction, the conformal residual quantile of real corrections afterwards) the true quality is at least
  the threshold for about ``1 - alpha`` (default 90%) of the kept labels. Conservative on purpose: a wrong
  pseudo-label teaches the model the wrong thing, a missing one only costs some data.
- ``threshold``: keep it when the calibrated quality itself is at least ``threshold``.
- ``topk``: keep the ``k`` best (default 10), whatever their value.
- ``none``: final labels only.

``weighting=True`` also gives each kept pseudo-label a loss weight equal to its calibrated quality (final
labels weigh 1).
"""

from __future__ import annotations

from labelsentinel.models.calibration import Calibration, structure_key
from labelsentinel.strategies.ranking import aggregate

RULES = ("lower_bound", "threshold", "topk", "none")
DEFAULTS = {"rule": "lower_bound", "threshold": 0.85, "k": 10, "alpha": 0.1, "aggregate": "min", "weighting": False}


def select_pseudo_labels(records: list[dict], rule: str = "lower_bound", threshold: float = 0.85, k: int = 10,
                         alpha: float = 0.1, calibration: Calibration | None = None, aggregate_by: str = "min",
                         expected=None, weighting: bool = False, exclude=()) -> list[dict]:
    """Chosen pseudo-labels, best first: ``{"case", "tag", "quality", "lower_bound", "weight", "reason"}``.

    ``records``: raw quality records (``labelsentinel.strategies.scoring``); ``calibration`` maps raw
    predictions to calibrated ones (identity with a prior error when None).
    """
    if rule not in RULES:
        raise ValueError(f"unknown pseudo-label rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "none":
        return []
    cal = calibration or Calibration.identity()
    q = cal.quantile(alpha)
    excluded = set(exclude)
    cands = []
    for r in records:
        if r["case"] in excluded:
            continue
        structs = [{**s, "predicted_dice": float(cal.apply(s["predicted_dice"], structure_key(s)))}
                   for s in r.get("structures", [])]
        quality = aggregate({**r, "structures": structs}, aggregate_by, expected=expected)
        if quality is None:
            continue
        cands.append((quality, r))
    cands.sort(key=lambda c: (-c[0], c[1]["case"]))
    out = []
    for quality, r in cands:
        lb = max(0.0, quality - q)
        if rule == "lower_bound" and lb < threshold:
            continue
        if rule == "threshold" and quality < threshold:
            continue
        if rule == "topk" and len(out) >= int(k):
            break
        reason = {
            "lower_bound": f"lower bound {lb:.3f} >= {threshold} ({aggregate_by} of calibrated predicted Dice "
                           f"{quality:.3f} - conformal quantile {q:.3f}, alpha {alpha})",
            "threshold": f"calibrated predicted Dice ({aggregate_by}) {quality:.3f} >= {threshold}",
            "topk": f"among the {int(k)} best: calibrated predicted Dice ({aggregate_by}) {quality:.3f}",
        }[rule]
        out.append({"case": r["case"], "tag": r.get("tag", "original"), "quality": round(quality, 4),
                    "lower_bound": round(lb, 4), "weight": round(quality, 4) if weighting else 1.0, "reason": reason})
    return out
