import itertools
import math

import numpy as np
import pytest

from labelsentinel.store import Store
from labelsentinel.strategies.budget import CostModel, dataset_dice, expected_gains, plan_budget
from labelsentinel.strategies.ranking import aggregate, good_enough_threshold, rank_cases, worth_correcting


def rec(case, *dices, voxels=1000):
    return {"case": case, "structures": [{"id": i + 1, "name": f"s{i + 1}", "predicted_dice": d, "voxels": voxels}
                                          for i, d in enumerate(dices)]}


def test_aggregation_methods_subset_and_missing():
    r = {"case": "a", "structures": [{"id": 1, "name": "liver", "predicted_dice": 0.9, "voxels": 9000},
                                     {"id": 2, "name": "aorta", "predicted_dice": 0.5, "voxels": 1000}]}
    assert aggregate(r, "min") == 0.5
    assert aggregate(r, "mean") == pytest.approx(0.7)
    assert aggregate(r, "volume_weighted") == pytest.approx(0.86)
    assert aggregate(r, "min", structures=["liver"]) == 0.9
    assert aggregate(r, "min", structures=["spleen"]) is None
    assert aggregate(r, "mean", expected={1, 2, 3}) == pytest.approx(1.4 / 3)
    assert aggregate({"case": "e", "structures": []}) is None
    with pytest.raises(ValueError):
        aggregate(r, "median")
    with pytest.raises(ValueError):
        aggregate(rec("x", float("nan")))


def test_ranking_ties_threshold_and_exclusions():
    recs = [rec("b", 0.5, 0.9), rec("a", 0.5, 0.8), rec("c", 0.95), rec("d", 0.2)]
    ranked = rank_cases(recs, "min", threshold=0.9)
    assert [r.case_id for r in ranked] == ["d", "a", "b"]  # tie on 0.5 broken by case id; c is good enough
    assert ranked[0].worst[0]["predicted_dice"] == 0.2
    assert [r.case_id for r in rank_cases(recs, exclude={"d"})][:1] == ["a"]
    assert rank_cases([]) == []


def test_good_enough_threshold_follows_estimator_error():
    assert good_enough_threshold(0.05) == pytest.approx(0.9)
    assert good_enough_threshold(0.0) == 0.97  # capped
    assert good_enough_threshold(0.6) == 0.0
    assert not worth_correcting(0.93, 0.05) and worth_correcting(0.85, 0.05)
    with pytest.raises(ValueError):
        good_enough_threshold(-1)


def test_budget_in_cases_takes_largest_gains():
    recs = [rec("a", 0.9, 0.9), rec("b", 0.3, 0.9), rec("c", 0.6, 0.6), rec("d", 0.99)]
    g = expected_gains(recs)
    assert g["b"] == pytest.approx(0.8 / 7)
    p = plan_budget(recs, budget_cases=2)
    assert [c.case_id for c in p.cases] == ["b", "c"]
    assert p.left_cases == 0 and p.dataset_dice_after == pytest.approx(dataset_dice(recs) + (0.8 + 0.8) / 7)
    assert p.curve[0] == (0, dataset_dice(recs)) and len(p.curve) == 3
    assert plan_budget(recs, budget_cases=0).cases == []
    e = plan_budget([], budget_cases=5)
    assert e.cases == [] and e.dataset_dice_before is None
    assert [c.case_id for c in plan_budget(recs, budget_cases=10, threshold=0.85).cases] == ["b", "c"]


def test_budget_errors():
    with pytest.raises(ValueError):
        plan_budget([rec("a", 0.5)])
    with pytest.raises(ValueError):
        plan_budget([rec("a", 0.5)], budget_cases=-1)
    with pytest.raises(ValueError):
        plan_budget([rec("a", 0.5)], budget_minutes=float("nan"))
    with pytest.raises(ValueError):
        CostModel(base_minutes=-1)


def test_minute_budget_skips_too_expensive_cases_and_is_optimal():
    cm = CostModel(minutes_per_case=None, base_minutes=1, review_minutes=0, fix_minutes=10)
    big = {"case": "big", "structures": [{"id": 1, "name": "liver", "predicted_dice": 0.0, "voxels": 10**6}]}
    recs = [big, rec("a", 0.5), rec("b", 0.6)]
    p = plan_budget(recs, budget_minutes=15, cost_model=cm)
    assert "big" not in [c.case_id for c in p.cases] and p.used_minutes <= 15 and p.cases
    rng = np.random.default_rng(0)
    for trial in range(25):
        recs = [rec(f"c{i}", *rng.uniform(0.1, 1, rng.integers(1, 4)).round(3), voxels=int(rng.integers(100, 50000)))
                for i in range(7)]
        budget = float(rng.uniform(2, 25))
        p = plan_budget(recs, budget_minutes=budget, cost_model=cm, resolution=0.001)
        assert p.used_minutes <= budget + 1e-6
        gains, costs = expected_gains(recs), {r["case"]: cm.minutes(r) for r in recs}
        best = max(sum(gains[c] for c in s) for k in range(8) for s in itertools.combinations(gains, k)
                   if sum(costs[c] for c in s) <= budget)
        assert sum(c.gain for c in p.cases) == pytest.approx(best, abs=1e-5)


def test_cost_model_overrides():
    r = {"case": "a", "structures": [{"id": 5, "name": "liver", "predicted_dice": 0.5, "voxels": 10000}]}
    assert CostModel().minutes(r) == pytest.approx(2 + 0.3 + 8 * 0.5)
    assert CostModel(structure_minutes={"liver": 10}).minutes(r) == 12
    assert CostModel(minutes_per_case=7).minutes(r) == 7
    assert CostModel.from_dict({"base_minutes": 1, "unknown": 3}).base_minutes == 1


def test_leases_keep_annotators_apart_and_expire(tmp_path):
    s = Store(str(tmp_path / "db"))
    assert s.acquire_lease("c1", "alice", ttl=60, now=0)
    assert not s.acquire_lease("c1", "bob", ttl=60, now=10)
    assert s.acquire_lease("c1", "alice", ttl=60, now=10)  # own case again
    assert s.leased_by_others("bob", now=20) == {"c1"} and s.leased_by_others("alice", now=20) == set()
    assert s.acquire_lease("c1", "bob", ttl=60, now=71)  # expired
    s.release_lease("c1", "bob")
    assert s.leases(now=72) == {}


def test_missing_expected_structures_count_as_zero():
    r = {"case": "a", "structures": [{"id": 1, "name": "liver", "predicted_dice": 0.9, "voxels": 100}],
         "missing": [{"id": 52, "name": "aorta"}]}
    assert aggregate(r, "mean") == pytest.approx(0.45)
    assert rank_cases([r])[0].worst[0]["name"] == "aorta"
    assert expected_gains([r])["a"] == pytest.approx((0.1 + 1.0) / 2)
