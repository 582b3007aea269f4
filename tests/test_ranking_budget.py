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
    assert p.planned_cases == p.budget_cases and p.dataset_dice_after == pytest.approx(dataset_dice(recs) + (0.8 + 0.8) / 7)
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
    assert "big" not in [c.case_id for c in p.cases] and p.planned_minutes <= 15 and p.cases
    rng = np.random.default_rng(0)
    for trial in range(25):
        recs = [rec(f"c{i}", *rng.uniform(0.1, 1, rng.integers(1, 4)).round(3), voxels=int(rng.integers(100, 50000)))
                for i in range(7)]
        budget = float(rng.uniform(2, 25))
        p = plan_budget(recs, budget_minutes=budget, cost_model=cm, resolution=0.001)
        assert p.planned_minutes <= budget + 1e-6
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


def test_missing_structure_weighs_as_a_typical_one_in_volume_weighting():
    r = {"case": "c", "structures": [{"id": 2, "name": "spleen", "predicted_dice": 0.97, "voxels": 30000},
                                     {"id": 3, "name": "kidney_right", "predicted_dice": 0.96, "voxels": 20000}],
         "missing": [{"id": 5, "name": "liver"}]}
    # weights 30000, 20000 and the mean present one (25000) for the missing liver at Dice 0
    assert aggregate(r, "volume_weighted") == pytest.approx((0.97 * 30000 + 0.96 * 20000) / 75000)
    assert [c.case_id for c in rank_cases([r], "volume_weighted", threshold=0.9)] == ["c"]
    r2 = {"case": "d", "structures": r["structures"]}
    assert aggregate(r2, "volume_weighted", expected={2, 3, 5}) == pytest.approx(aggregate(r, "volume_weighted"))


def test_minute_budget_keeps_cases_that_fit_exactly():
    one = [{"case": "a", "structures": [{"id": 1, "name": "liver", "predicted_dice": 0.5, "voxels": 10000}]}]
    cost = CostModel().minutes(one[0])
    assert cost == pytest.approx(6.3)
    assert [c.case_id for c in plan_budget(one, budget_minutes=cost).cases] == ["a"]
    three = [rec(c, 0.5) for c in "abc"]
    p = plan_budget(three, budget_minutes=10.2, cost_model=CostModel(minutes_per_case=3.4))
    assert [c.case_id for c in p.cases] == ["a", "b", "c"] and p.planned_minutes == pytest.approx(10.2)
    assert p.method == "exact dynamic programming"
    # a large budget with many cases coarsens the grid but never plans past the budget
    many = [rec(f"c{i:04d}", 0.3 + 0.5 * (i % 7) / 7) for i in range(3000)]
    p = plan_budget(many, budget_minutes=6000.0)
    assert p.planned_minutes <= 6000.0 and len(p.cases) > 100


def test_cases_and_minutes_are_optimised_together():
    costs = {"A": 10.0, "B": 5.0, "C": 5.0}

    class CM(CostModel):
        def minutes(self, r):
            return costs[r["case"]]

    recs = [rec("A", 0.4), rec("B", 0.6), rec("C", 0.6)]
    p = plan_budget(recs, budget_cases=1, budget_minutes=10, cost_model=CM())
    assert [c.case_id for c in p.cases] == ["A"]  # gain 0.2 beats B's 0.133, and fits both limits
    rng = np.random.default_rng(1)
    cm = CostModel(base_minutes=1, review_minutes=0.2, fix_minutes=6)
    for trial in range(25):
        recs = [rec(f"c{i}", *rng.uniform(0.1, 1, rng.integers(1, 4)).round(3), voxels=int(rng.integers(100, 50000)))
                for i in range(7)]
        budget, k = float(rng.uniform(2, 25)), int(rng.integers(0, 5))
        p = plan_budget(recs, budget_cases=k, budget_minutes=budget, cost_model=cm)
        assert p.planned_minutes <= budget + 1e-6 and len(p.cases) <= k
        gains, costs2 = expected_gains(recs), {r["case"]: cm.minutes(r) for r in recs}
        best = max(sum(gains[c] for c in s) for n in range(k + 1) for s in itertools.combinations(gains, n)
                   if sum(costs2[c] for c in s) <= budget + 1e-9)
        assert sum(c.gain for c in p.cases) == pytest.approx(best, abs=1e-5)


class _Datastore:
    def __init__(self, cases):
        self.cases, self.final = list(cases), set()

    def get_unlabeled_images(self, *a):
        return [c for c in self.cases if c not in self.final]

    def get_labeled_images(self, *a):
        return sorted(self.final)

    def list_images(self):
        return list(self.cases)


def test_budget_strategy_gives_back_abandoned_cases_and_never_rewrites_the_plan(tmp_path):
    import time

    from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

    s, ds = Store(str(tmp_path / "db")), _Datastore("abc")
    for cid, d in (("a", 0.3), ("b", 0.5), ("c", 0.6)):
        s.put_quality(cid, "original", "x", "v", record={**rec(cid, d), "tag": "original", "estimator_version": "v"})
    strat = BudgetStrategy(lambda: s, 0.9)
    BudgetStrategy.make_plan(s, ds, budget_cases=2)
    short = {"lease_minutes": 0.5 / 60}  # a 0.5 s lease
    got = strat({"client_id": "alice", **short}, ds)
    assert got["id"] == "a" and got["used_cases"] == 1 and got["left_cases"] == 1
    # asking again without saving skips: alice gets b, and a goes back to the plan (she gets it only last)
    got = strat({"client_id": "alice", **short}, ds)
    assert got["id"] == "b" and got["used_cases"] == 1
    assert strat({"client_id": "bob", **short}, ds)["id"] == "a"
    assert "budget spent" in strat({"client_id": "carol"}, ds)["reason"]
    time.sleep(0.6)  # both let their case go without saving: the cases go back to the plan
    assert BudgetStrategy.status(s, ds)["used_cases"] == 0
    assert strat({"client_id": "carol"}, ds)["id"] == "a"
    ds.final.add("a")  # carol saved it: used for good
    assert BudgetStrategy.status(s, ds)["used_cases"] == 1
    # serving does not write the plan: a budget the lead sets meanwhile stays as set
    acquire = s.acquire_lease

    def lead_replans_meanwhile(*a, **k):
        BudgetStrategy.make_plan(s, ds, budget_cases=1)
        return acquire(*a, **k)

    s.acquire_lease = lead_replans_meanwhile
    strat({"client_id": "dave"}, ds)
    assert s.get_setting("budget_plan")["budget_cases"] == 1


def test_asking_again_skips_the_case_and_it_comes_back_only_when_nothing_else_is_left(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import QualityStrategy

    s, ds = Store(str(tmp_path / "db")), _Datastore("abc")
    for cid, d in (("a", 0.3), ("b", 0.5), ("c", 0.6)):
        s.put_quality(cid, "original", "x", "v", record={**rec(cid, d), "tag": "original", "estimator_version": "v"})
    q = QualityStrategy(lambda: s, 0.9)
    assert [q({"client_id": "ann"}, ds)["id"] for _ in range(4)] == ["a", "b", "c", "a"]
    assert set(s.leases()) == {"a"}  # one case out with the annotator at a time
    assert q({"client_id": "other"}, ds)["id"] == "b"  # what ann skipped is back for the others
    assert s.skipped_by("ann") == {"a", "b", "c"} and s.skipped_by("other") == set()


def test_random_and_first_never_serve_an_open_case_to_another_annotator(tmp_path):
    import threading

    from labelsentinel.strategies.monailabel_adapters import FirstStrategy, RandomStrategy

    class DS(_Datastore):
        info = {}

        def get_image_info(self, image_id):
            return self.info.get(image_id, {})

    s, ds = Store(str(tmp_path / "db")), DS("abcdefgh")
    # 8 annotators at once, random: 8 different cases; a 9th is told why it gets none
    got = {}

    def ask(who):
        got[who] = RandomStrategy(lambda: s)({"client_id": who, "strategy": "random"}, ds)

    threads = [threading.Thread(target=ask, args=(f"ann{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(g["id"] for g in got.values()) == list("abcdefgh"), got
    late = FirstStrategy(lambda: s)({"client_id": "late"}, ds)
    assert not late.get("id") and "all 8 unlabeled case(s) are out" in late["reason"]
    # first: by id among the free ones; asking again lets go (the case comes back to that annotator last)
    s2 = Store(str(tmp_path / "db2"))
    first = FirstStrategy(lambda: s2)
    assert [first({"client_id": "x"}, ds)["id"] for _ in range(3)] == ["a", "b", "c"]
    assert first({"client_id": "y"}, ds)["id"] == "a"  # what x let go is free for the others
    assert first({}, ds)["id"] == "b" and first({}, ds)["client_id"] == "anonymous"
    ds.final.update("abcdefgh")
    assert "none of the 8 image(s) is a readable case without a final label" in first({"client_id": "z"}, ds)["reason"]
    # random: a case served long ago is likelier than one served just now (stock weights, plus one)
    import time

    ds3, now = DS("pq"), int(time.time())
    ds3.info = {"p": {"strategy": {"random": {"ts": now}}}, "q": {"strategy": {"random": {"ts": now - 3600}}}}
    picks = [RandomStrategy(lambda: Store(str(tmp_path / f"r{i}")))({"client_id": "r"}, ds3)["id"] for i in range(40)]
    assert picks.count("q") >= 35, picks


def test_cost_model_naming_a_structure_no_case_has_is_refused():
    """A lead's override for a misspelt structure would silently change nothing."""
    from labelsentinel.strategies.ranking import unknown_structures

    recs = [rec("a", 0.3, 0.5), rec("b", 0.6)]
    with pytest.raises(ValueError, match=r"'livr'.*no scored case has.*s1, s2"):
        plan_budget(recs, budget_minutes=30, cost_model=CostModel(structure_minutes={"livr": 100, "s1": 3}))
    assert plan_budget(recs, budget_minutes=30, cost_model=CostModel(structure_minutes={"s2": 3})).cases
    assert plan_budget([], budget_minutes=30, cost_model=CostModel(structure_minutes={"livr": 1})).cases == []
    # the structure filter of the strategies: names (any case) or ids
    assert unknown_structures(recs, ["S1", "2", "livr"]) == ["livr"]
    assert unknown_structures([], ["livr"]) == [] and unknown_structures(recs, None) == []


def test_quality_strategy_refuses_a_structure_filter_no_case_has(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import QualityStrategy

    s, ds = Store(str(tmp_path / "db")), _Datastore("ab")
    for cid, d in (("a", 0.3), ("b", 0.5)):
        s.put_quality(cid, "original", "x", "v", record={**rec(cid, d, 0.9), "tag": "original", "estimator_version": "v"})
    q = QualityStrategy(lambda: s, 0.9)
    with pytest.raises(ValueError, match=r"option structures: no scored case has 'livr'.*s1, s2"):
        q({"client_id": "x", "structures": "livr"}, ds)
    assert q({"client_id": "x", "structures": "s2"}, ds).get("reason")  # s2 is good enough everywhere
    assert q({"client_id": "y", "structures": "s1"}, ds)["id"] == "a"


def test_budget_says_when_every_case_needing_a_human_is_used_before_the_budget(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

    s, ds = Store(str(tmp_path / "db")), _Datastore("abcd")
    for cid, d in (("a", 0.3), ("b", 0.5), ("c", 0.95), ("d", 0.97)):
        s.put_quality(cid, "original", "x", "v", record={**rec(cid, d), "tag": "original", "estimator_version": "v"})
    strat = BudgetStrategy(lambda: s, 0.9)
    BudgetStrategy.make_plan(s, ds, budget_cases=10, threshold=0.9)  # only a and b need a human
    assert {strat({"client_id": c}, ds)["id"] for c in ("p", "q")} == {"a", "b"}
    got = strat({"client_id": "r"}, ds)
    assert not got.get("id") and got["left_cases"] == 8
    assert "budget spent" not in got["reason"] and "nothing left to correct" in got["reason"], got
    BudgetStrategy.make_plan(s, ds, budget_cases=1)
    ds.final.add("a")
    assert "budget spent" in strat({"client_id": "r"}, ds)["reason"]
