"""Recalibration of the quality estimator from real (predicted Dice, true Dice) pairs.

Every time an annotator saves a ``final`` label over a case that had an ``original`` (pseudo) label, the
true Dice of every structure of that original label becomes known. Those real pairs are what the synthetic
training data cannot give: the error profile of *this* project's pseudo-label source. Two things are fitted:

- a **monotone map** (isotonic regression by pool-adjacent-violators, blended with the identity while there
  are few pairs) from the raw prediction to the expected true Dice. Monotone, so the ranking of the labels of
  one structure never changes, only the values do;
- **per-structure offsets**: what is left after the map, averaged per structure and shrunk towards 0
  (``sum of residuals / (n_structure + GROUP_PRIOR)``): a source that over-segments costs a small structure
  more Dice than a large one, which one monotone map over all structures cannot follow;
- **conformal residual quantiles** (split-conformal on the absolute residuals of the calibrated
  prediction): with ``n >= ceil(1 / alpha) - 1`` pairs, ``P(true >= calibrated - q_alpha) >= 1 - alpha`` for
  a new label from the same source (with fewer, the prior bound is kept). ``lower_bound`` is what the
  pseudo-label selection trusts.

The calibration is judged by cross-validation over the corrected cases and applied only when it lowers the
estimator's error there (by 5%, from 3 corrected cases on): on a source the estimator already judges well, a
few corrections would otherwise bend good predictions (on the demo studies, whose pseudo-labels are of the kinds
the estimator was trained on, an always-applied calibration raised the error of new labels from 0.069 to 0.073
to 0.088). The conformal bound is then the raw estimator's.

A calibration is a small dict (JSON), kept in the record store next to the estimator version it belongs to.
No MONAI Label import; numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_PAIRS = 3  # below this the map is the identity and the bound is the estimator's validation error
PRIOR_PAIRS = 10.0  # the map is blended with the identity with weight PRIOR_PAIRS / (PRIOR_PAIRS + n)
GROUP_PRIOR = 5.0  # a structure's offset is shrunk as if GROUP_PRIOR more of its pairs had a residual of 0
MIN_CASES = 3  # corrected labels needed before a calibration is applied
MIN_GAIN = 0.05  # and it must lower the cross-validated error by this fraction


def isotonic_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators). Returns knots (xs, ys)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    # Equal x values are one block (their weighted mean): otherwise the fit, and the map between them, would
    # depend on the order of tied predictions (common: predictions are rounded and clipped to 0 and 1).
    x, inv = np.unique(x, return_inverse=True)
    wsum = np.bincount(inv, weights=w, minlength=len(x))
    y = np.bincount(inv, weights=w * y, minlength=len(x)) / np.where(wsum > 0, wsum, 1.0)
    w = wsum
    # blocks: [sum_wy, sum_w, x_lo, x_hi]
    vals, wts, lo, hi = [], [], [], []
    for xi, yi, wi in zip(x, y, w):
        vals.append(yi * wi)
        wts.append(wi)
        lo.append(xi)
        hi.append(xi)
        while len(vals) > 1 and vals[-2] / wts[-2] > vals[-1] / wts[-1]:
            v, ww, h = vals.pop(), wts.pop(), hi.pop()
            lo.pop()
            vals[-1] += v
            wts[-1] += ww
            hi[-1] = h
    xs, ys = [], []
    for v, ww, a, b in zip(vals, wts, lo, hi):
        m = v / ww
        xs.extend([a, b] if b > a else [a])
        ys.extend([m, m] if b > a else [m])
    return np.asarray(xs), np.asarray(ys)


def structure_key(structure: dict) -> str:
    """The group a structure's calibration offset is kept under: its name, else its id as text."""
    return structure.get("name") or str(structure["id"])


@dataclass
class Calibration:
    """Monotone map + conformal residual quantiles; ``identity(mae)`` when there are no real pairs yet."""

    xs: list = field(default_factory=list)
    ys: list = field(default_factory=list)
    n: int = 0
    prior_mae: float = 0.1  # the estimator's validation MAE: the bound used before real pairs exist
    residuals: list = field(default_factory=list)  # sorted |true - calibrated| of the fitting pairs
    mae_before: float | None = None  # on the fitting pairs, raw predictions
    mae_after: float | None = None  # on the fitting pairs, calibrated predictions cross-validated by case
    offsets: dict = field(default_factory=dict)  # structure (name or id, as text) -> additive correction
    conformal_pairs: int | None = None  # pairs the residuals come from (those the weights were not trained on)
    applied: bool = True  # False: the map and offsets did not beat the raw estimator in cross-validation
    cases: int | None = None  # corrected labels the pairs come from

    @classmethod
    def identity(cls, prior_mae: float = 0.1) -> "Calibration":
        return cls(prior_mae=float(prior_mae))

    @classmethod
    def _fit_map(cls, p, t, g, prior_mae) -> "Calibration":
        """The map and the per-structure offsets of these pairs (no conformal part)."""
        xs, ys = isotonic_fit(p, t)
        c = cls(xs=xs.tolist(), ys=ys.tolist(), n=len(p), prior_mae=float(prior_mae))
        if g is not None:
            r = t - c.apply(p)
            c.offsets = {k: float(r[g == k].sum()) / (int((g == k).sum()) + GROUP_PRIOR) for k in np.unique(g)}
        return c

    @classmethod
    def fit(cls, predicted, true, prior_mae: float = 0.1, groups=None, conformal=None, cases=None) -> "Calibration":
        """``groups``: the structure of every pair (name or id); per-structure offsets are fitted when given.

        ``cases``: the corrected label every pair comes from. The calibration is judged by cross-validation
        over cases (each case's pairs predicted by the map and offsets fitted on the other cases: pairs of one
        label share its error, so leaving out one pair at a time flatters the fit), and it is only *applied*
        when there are at least ``MIN_CASES`` cases and it lowers the cross-validated error by ``MIN_GAIN``
        (5%) or more; otherwise predictions stay as the estimator made them (a source the estimator already
        judges well is not bent by a few noisy corrections). Without ``cases`` every pair is its own case.

        ``conformal``: per pair, whether the estimator's weights were *not* trained on it. A fine-tuned
        estimator fits its own training pairs better than new labels, so their residuals would make the bound
        too tight (in the recalibration benchmark its 90% bound covered only 73% to 84% of new labels). Only
        the pairs marked here give the conformal residuals, ``mae_before``/``mae_after`` and the decision to
        apply; the map and offsets use all. The residuals are the cross-validated ones when the calibration is
        applied, the raw estimator's otherwise. With fewer than ``MIN_PAIRS`` of them the bound falls back to
        the prior one."""
        p = np.clip(np.asarray(predicted, float), 0, 1)
        t = np.clip(np.asarray(true, float), 0, 1)
        if len(p) != len(t):
            raise ValueError(f"{len(p)} predictions but {len(t)} true values")
        g = None if groups is None else np.asarray([str(x) for x in groups])
        if g is not None and len(g) != len(p):
            raise ValueError(f"{len(p)} predictions but {len(g)} structures")
        use = np.ones(len(p), bool) if conformal is None else np.asarray(conformal, bool)
        if len(use) != len(p):
            raise ValueError(f"{len(p)} predictions but {len(use)} conformal flags")
        case = np.arange(len(p)).astype(str) if cases is None else np.asarray([str(x) for x in cases])
        if len(case) != len(p):
            raise ValueError(f"{len(p)} predictions but {len(case)} cases")
        n = len(p)
        if n < MIN_PAIRS:
            c = cls.identity(prior_mae)
            c.n = n
            return c
        c = cls._fit_map(p, t, g, prior_mae)
        # Cross-validation by case: a case never calibrates itself.
        cv = np.full(n, np.nan)
        ucases = np.unique(case)
        if len(ucases) >= 2:
            for k in ucases:
                out = case == k
                if (~out).sum() < MIN_PAIRS:
                    continue
                cv[out] = cls._fit_map(p[~out], t[~out], None if g is None else g[~out], prior_mae).apply(
                    p[out], None if g is None else g[out])
        judged = use & ~np.isnan(cv)
        raw_err = np.abs(t - p)
        cv_err = np.abs(t - cv)
        c.cases = int(len(ucases))
        c.conformal_pairs = int(use.sum())
        c.mae_before = float(np.mean(raw_err[use])) if use.any() else None
        c.mae_after = float(np.mean(cv_err[judged])) if judged.any() else None
        c.applied = bool(len(ucases) >= MIN_CASES and judged.sum() >= MIN_PAIRS
                         and np.mean(cv_err[judged]) <= (1.0 - MIN_GAIN) * np.mean(raw_err[judged]))
        if c.applied:
            c.residuals = sorted(cv_err[judged].tolist())
        else:
            c.residuals = sorted(raw_err[use].tolist()) if use.sum() >= MIN_PAIRS else []
        return c

    def apply(self, predicted, group=None):
        """Calibrated predicted Dice (same shape as ``predicted``); ``group``: the structure (name or id), one
        for all or one per prediction, adds its offset (none for a structure without real pairs)."""
        p = np.clip(np.asarray(predicted, float), 0, 1)
        if self.n < MIN_PAIRS or not self.xs or not self.applied:
            return p if p.ndim else float(p)
        mapped = np.interp(p, np.asarray(self.xs), np.asarray(self.ys))
        a = PRIOR_PAIRS / (PRIOR_PAIRS + self.n)
        out = a * p + (1 - a) * mapped
        if group is not None and self.offsets:
            if p.ndim and not isinstance(group, (str, int)):
                out = out + np.array([self.offsets.get(str(k), 0.0) for k in group])
            else:
                out = out + self.offsets.get(str(group), 0.0)
        out = np.clip(out, 0, 1)
        return out if out.ndim else float(out)

    def quantile(self, alpha: float = 0.1) -> float:
        """Half-width q with P(|true - calibrated| <= q) >= 1 - alpha (split conformal), guaranteed once there
        are at least ceil(1 / alpha) - 1 residuals (9 at alpha 0.1); with fewer, the prior bound from the
        estimator's validation MAE (or the largest residual, if wider), which carries no such guarantee."""
        r = self.residuals
        prior = 2.0 * self.prior_mae  # about the 90% point of a half-normal with the estimator's validation MAE
        if len(r) < MIN_PAIRS:
            return prior  # no real pairs yet
        k = math.ceil((len(r) + 1) * (1 - alpha))
        if k > len(r):
            # Too few pairs for a finite split-conformal quantile at this alpha (it would be infinite): the
            # largest residual alone covers only n / (n + 1). Keep the prior bound, or the largest residual if
            # that is wider, until there are enough pairs.
            return float(max(prior, r[-1]))
        return float(r[k - 1])

    def lower_bound(self, predicted, alpha: float = 0.1, group=None):
        b = np.clip(np.asarray(self.apply(predicted, group)) - self.quantile(alpha), 0, 1)
        return b if b.ndim else float(b)

    def to_dict(self) -> dict:
        return {"xs": self.xs, "ys": self.ys, "n": self.n, "prior_mae": self.prior_mae, "residuals": self.residuals,
                "mae_before": self.mae_before, "mae_after": self.mae_after, "offsets": self.offsets,
                "conformal_pairs": self.conformal_pairs, "applied": self.applied, "cases": self.cases}

    @classmethod
    def from_dict(cls, d: dict | None, prior_mae: float = 0.1) -> "Calibration":
        if not d:
            return cls.identity(prior_mae)
        return cls(**{k: d[k] for k in ("xs", "ys", "n", "prior_mae", "residuals", "mae_before", "mae_after", "offsets",
                                          "conformal_pairs", "applied", "cases")
                      if k in d})
