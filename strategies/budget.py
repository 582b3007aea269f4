"""Labelling budgets: which corrections buy the most dataset quality.

Dataset quality = mean predicted Dice over every structure instance of the cases considered (each
structure of each case counts once; an expected structure missing from a label counts as Dice 0). Correcting a case makes its structures perfect, so its expected gain is
``sum over its structures of (1 - predicted Dice) / N`` with N the number of structure instances.

Cost model (annotator minutes, a project lead can override every part):
``base_minutes`` per case (open, review, save; default 2) + per structure ``review_minutes`` (0.3) +
``fix_minutes`` (8) x predicted error (1 - Dice) x a size factor ``clip(cbrt(voxels / 10000), 0.3, 3)``
(fixing a large structure takes longer than a small one); ``structure_minutes`` fixes the minutes of named
structures; ``minutes_per_case`` replaces the whole model by a flat cost.

Planning: with a budget in cases, the cases with the largest expected gains (ties by case id). With a
budget in minutes (and optionally a number of cases as well), a 0/1 knapsack solved by dynamic programming
over costs rounded up to a grid of 0.001 min, the cost model's own precision, so the plan is exact; only
when the table would exceed 20 million cells is the grid coarsened, and then the greedy plan by gain/cost
on the exact costs (with the best-single-case fix, at least half the optimum) is taken if it gains more.
With both limits the programme counts cases and minutes together. Cases at or above the good-enough
threshold are never planned; a case costing more than the whole budget is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from labelsentinel.strategies.ranking import _check, structures_of


def _minutes(name: str, v) -> float:
    """A number of minutes >= 0 (ValueError naming ``name`` otherwise)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number of minutes, got {v!r}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


@dataclass
class CostModel:
    base_minutes: float = 2.0
    review_minutes: float = 0.3
    fix_minutes: float = 8.0
    structure_minutes: dict = field(default_factory=dict)  # name -> minutes (overrides the formula)
    minutes_per_case: float | None = None

    def __post_init__(self):
        for k in ("base_minutes", "review_minutes", "fix_minutes", "minutes_per_case"):
            v = getattr(self, k)
            if v is None and k == "minutes_per_case":
                continue
            setattr(self, k, _minutes(k, v))
        if not isinstance(self.structure_minutes, dict):
            raise ValueError(f"structure_minutes must map structure names to minutes, got {self.structure_minutes!r}")
        self.structure_minutes = {str(n): _minutes(f"structure_minutes[{n!r}]", v) for n, v in self.structure_minutes.items()}

    def minutes(self, record: dict) -> float:
        if self.minutes_per_case is not None:
            return float(self.minutes_per_case)
        total = self.base_minutes
        for s in structures_of(record):
            name = s.get("name")
            if name in self.structure_minutes:
                total += float(self.structure_minutes[name])
                continue
            size = min(3.0, max(0.3, (max(0, int(s.get("voxels") or 0)) / 10000.0) ** (1 / 3)))
            total += self.review_minutes + self.fix_minutes * (1.0 - _check(s["predicted_dice"])) * size
        return round(total, 3)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CostModel":
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"cost model must be a JSON object of minutes (e.g. {{\"base_minutes\": 3}}), got {d!r}")
        d = dict(d or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class PlannedCase:
    case_id: str
    gain: float  # expected increase of the dataset's mean Dice
    minutes: float


@dataclass
class BudgetPlan:
    cases: list[PlannedCase]
    budget_cases: int | None
    budget_minutes: float | None
    planned_cases: int  # what the plan will use once carried out (the budget used so far is the strategy's status)
    planned_minutes: float
    dataset_dice_before: float | None
    dataset_dice_after: float | None
    curve: list[tuple[int, float]]  # (corrected cases, expected dataset Dice), in plan order
    method: str
    candidates: int = 0  # unlabeled cases below the good-enough threshold the plan chose from

    def to_dict(self) -> dict:
        return {
            "cases": [c.__dict__ for c in self.cases],
            "budget_cases": self.budget_cases,
            "budget_minutes": self.budget_minutes,
            "planned_cases": self.planned_cases,
            "planned_minutes": self.planned_minutes,
            "candidates": self.candidates,
            "dataset_dice_before": self.dataset_dice_before,
            "dataset_dice_after": self.dataset_dice_after,
            "curve": self.curve,
            "method": self.method,
        }


def dataset_dice(records: list[dict]) -> float | None:
    vals = [_check(s["predicted_dice"]) for r in records for s in structures_of(r)]
    return sum(vals) / len(vals) if vals else None


def expected_gains(records: list[dict]) -> dict[str, float]:
    n = sum(len(structures_of(r)) for r in records)
    if n == 0:
        return {r["case"]: 0.0 for r in records}
    return {r["case"]: sum(1.0 - _check(s["predicted_dice"]) for s in structures_of(r)) / n for r in records}


MAX_BUDGET_MINUTES = 365 * 24 * 60.0
MAX_CELLS = 20_000_000  # size of the dynamic programming table (one byte a cell): about 20 MB at most
FINEST = 0.001  # minutes; the cost model rounds its costs to this


def _greedy(items, budget: float, max_cases: int | None):
    """Greedy by gain/cost on the exact costs, within both limits, or the best single case if that gains more
    (at least half the optimum with a budget in minutes alone)."""
    order = sorted(range(len(items)), key=lambda i: (-(items[i][1] / max(items[i][2], 1e-9)), items[i][0]))
    chosen, used = [], 0.0
    for i in order:
        if max_cases is not None and len(chosen) >= max_cases:
            break
        if used + items[i][2] <= budget + 1e-9:
            chosen.append(i)
            used += items[i][2]
    single = max((i for i in range(len(items)) if items[i][2] <= budget + 1e-9), key=lambda i: items[i][1],
                 default=None)
    if (max_cases is None or max_cases >= 1) and single is not None and \
            items[single][1] > sum(items[i][1] for i in chosen) + 1e-12:
        chosen = [single]
    return sorted(chosen)


def _knapsack(items: list[tuple[str, float, float]], budget: float, resolution: float | None = None,
              max_cases: int | None = None):
    """items (id, gain, cost): the subset with the largest total gain whose costs fit ``budget`` (and, with
    ``max_cases``, of at most that many cases).

    Dynamic programming over costs rounded *up* to a grid of ``resolution`` minutes (default: the cost
    model's own 0.001 min, coarsened only as far as needed to keep the table within ``MAX_CELLS``), so a plan
    never exceeds the budget and is exact when the costs lie on the grid. The greedy plan on the exact costs
    is also worked out, and whichever gains more is returned (rounding up can only lose a case that fits
    with no room to spare). Returns (chosen indices, method)."""
    import numpy as np

    n = len(items)
    if n == 0 or budget < 0:
        return [], "nothing fits the budget"
    k_max = None if max_cases is None or max_cases >= n else int(max_cases)
    layers = 1 if k_max is None else k_max + 1
    res = max(float(resolution or FINEST), FINEST)
    per_unit = n * layers
    if per_unit * (math.floor(budget / res + 1e-9) + 1) > MAX_CELLS:
        res = budget / max(MAX_CELLS // per_unit - 1, 1)
    units = int(math.floor(budget / res + 1e-9))
    greedy = _greedy(items, budget, max_cases)
    if units < 100 and res > FINEST:  # a grid this coarse would throw away most of the budget
        return greedy, "greedy gain/cost with best single case (>= 1/2 of optimum)"
    w = [max(0, int(math.ceil(c / res - 1e-9))) for _, _, c in items]
    if k_max is None:
        best = np.zeros(units + 1)
        take = np.zeros((n, units + 1), bool)
        for i, ((_, g, _), wi) in enumerate(zip(items, w)):
            if wi > units:
                continue
            cand = best[: units + 1 - wi] + g
            better = cand > best[wi:] + 1e-12
            take[i, wi:] = better
            best[wi:] = np.where(better, cand, best[wi:])
        chosen, u = [], units
        for i in range(n - 1, -1, -1):
            if take[i, u]:
                chosen.append(i)
                u -= w[i]
    else:  # best[k, u]: the largest gain of at most k cases costing at most u units
        best = np.zeros((layers, units + 1))
        take = np.zeros((n, layers, units + 1), bool)
        for i, ((_, g, _), wi) in enumerate(zip(items, w)):
            if wi > units:
                continue
            cand = best[:-1, : units + 1 - wi] + g
            better = cand > best[1:, wi:] + 1e-12
            take[i, 1:, wi:] = better
            best[1:, wi:] = np.where(better, cand, best[1:, wi:])
        chosen, k, u = [], k_max, units
        for i in range(n - 1, -1, -1):
            if take[i, k, u]:
                chosen.append(i)
                k -= 1
                u -= w[i]
    chosen = sorted(chosen)
    exact = res == FINEST and all(abs(c / res - round(c / res)) < 1e-6 for _, _, c in items)
    method = "exact dynamic programming" if exact else f"dynamic programming on costs rounded up to {res:.3g} min"
    if sum(items[i][1] for i in greedy) > sum(items[i][1] for i in chosen) + 1e-12:
        return greedy, "greedy gain/cost (better than the rounded dynamic programming)"
    return chosen, method


def plan_budget(records: list[dict], budget_cases: int | None = None, budget_minutes: float | None = None,
                cost_model: CostModel | None = None, threshold: float | None = None, aggregate_method: str = "min",
                exclude=(), resolution: float | None = None) -> BudgetPlan:
    """Choose the corrections that maximise the expected gain in dataset Dice within the budget."""
    from labelsentinel.strategies.ranking import aggregate

    if budget_cases is None and budget_minutes is None:
        raise ValueError("give a budget in cases or in minutes")
    if budget_cases is not None and (isinstance(budget_cases, bool) or not isinstance(budget_cases, (int, float))
                                     or not math.isfinite(budget_cases) or budget_cases < 0
                                     or int(budget_cases) != budget_cases):
        raise ValueError(f"budget in cases must be a whole number >= 0, got {budget_cases!r}")
    if budget_minutes is not None:
        budget_minutes = _minutes("budget in minutes", budget_minutes)
        if budget_minutes > MAX_BUDGET_MINUTES:
            raise ValueError(f"budget in minutes must be at most {MAX_BUDGET_MINUTES:g} (a year of full days), "
                             f"got {budget_minutes:g}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ValueError(f"good-enough threshold must be a predicted Dice in [0, 1], got {threshold!r}")
    cost_model = cost_model or CostModel()
    names = {s.get("name") for r in records for s in structures_of(r)}
    typos = sorted(n for n in cost_model.structure_minutes if n not in names)
    if records and typos:
        raise ValueError(f"cost model: structure_minutes names {', '.join(map(repr, typos))}, which no scored case has; "
                         f"the structures are: {', '.join(sorted(str(n) for n in names if n))}")
    gains = expected_gains(records)
    before = dataset_dice(records)
    excluded = set(exclude)
    cands = []
    for r in records:
        if r["case"] in excluded:
            continue
        agg = aggregate(r, aggregate_method)
        if agg is None or (threshold is not None and agg >= threshold) or gains[r["case"]] <= 0:
            continue
        cands.append((r["case"], gains[r["case"]], cost_model.minutes(r)))
    if budget_minutes is not None:
        fits = [c for c in cands if c[2] <= budget_minutes + 1e-9]
        idx, method = _knapsack(fits, budget_minutes, resolution, max_cases=budget_cases)
        chosen = [fits[i] for i in idx]
    else:
        chosen = sorted(cands, key=lambda c: (-round(c[1], 9), c[0]))[: int(budget_cases)]
        method = "largest expected gains"
    chosen.sort(key=lambda c: (-round(c[1], 9), c[0]))  # serve the biggest gains first
    curve, d = [(0, before)], before
    for k, c in enumerate(chosen, 1):
        d = d + c[1]
        curve.append((k, round(d, 6)))
    return BudgetPlan(
        cases=[PlannedCase(c[0], round(c[1], 6), c[2]) for c in chosen],
        budget_cases=None if budget_cases is None else int(budget_cases),
        budget_minutes=budget_minutes,
        planned_cases=len(chosen),
        planned_minutes=round(sum(c[2] for c in chosen), 3),
        dataset_dice_before=before,
        dataset_dice_after=d,
        curve=curve,
        method=method,
        candidates=len(cands),
    )
