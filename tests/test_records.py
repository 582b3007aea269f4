"""Records that must follow the datastore: scores of deleted images and labels, correction pairs of deleted
final labels, the budget's own accounting, the plan's tag and calibration prior, and which suspects are still
suspect (no server; a small stand-in datastore)."""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import numpy as np
import pytest

from labelsentinel.io import save_nifti
from labelsentinel.store import Store, file_stamp

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "sentinel")


def rec(case, *dices, tag="original", version="v"):
    return {"case": case, "tag": tag, "estimator_version": version,
            "structures": [{"id": i + 1, "name": f"s{i + 1}", "predicted_dice": d, "voxels": 1000}
                           for i, d in enumerate(dices)]}


class DS:
    """The parts of MONAI Label's datastore the adapters use: images with labels by tag (label id = image id)."""

    def __init__(self, root, labels: dict[str, dict[str, str]]):
        self.root = str(root)
        self.labels = {i: dict(t) for i, t in labels.items()}  # image -> tag -> path
        self.fail = False  # listing fails (a PACS outage)

    def list_images(self):
        if self.fail:
            raise ConnectionError("PACS down")
        return sorted(self.labels)

    def get_labels_by_image_id(self, image_id):
        return {t: image_id for t in self.labels.get(image_id, {})}

    def get_label_uri(self, label_id, tag):
        return self.labels[label_id][tag]

    def get_image_uri(self, image_id):
        return os.path.join(self.root, f"{image_id}.nii.gz")

    def get_labeled_images(self, *a):
        return sorted(i for i in self.list_images() if "final" in self.labels[i])

    def get_unlabeled_images(self, *a):
        return sorted(i for i in self.list_images() if "final" not in self.labels[i])


def _write(path, arr):
    save_nifti(str(path), np.asarray(arr).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))


class _Est:
    def predict(self, image, label, spacing, names):
        return [{"id": 1, "name": "s1", "predicted_dice": 0.6, "voxels": int((label == 1).sum()), "flags": []}]


# --- 1. scores of deleted images and labels ---------------------------------------------------------------------
def test_scoring_removes_records_of_deleted_images_and_labels_never_on_a_read_error(tmp_path):
    from labelsentinel.strategies.scoring import LabelItem, score_labels

    img = np.zeros((6, 6, 4), np.int16)
    lab = img.copy()
    lab[1:4, 1:4, 1:3] = 1
    items = []
    for c in ("a", "b", "c", "d"):
        _write(tmp_path / f"{c}.nii.gz", img)
        _write(tmp_path / f"{c}_lab.nii.gz", lab)
        items.append(LabelItem(c, "original", str(tmp_path / f"{c}.nii.gz"), str(tmp_path / f"{c}_lab.nii.gz")))
    s = Store(str(tmp_path / "db"))
    listed = {(i.image_id, "original") for i in items}
    r = score_labels(items, s, "v", _Est, {}, listed=listed)
    assert sorted(r["scored"]) == ["a/original", "b/original", "c/original", "d/original"] and r["removed"] == []
    # b's image deleted, c's pseudo-label deleted; d's label file cannot be read for a moment (still listed)
    os.remove(tmp_path / "b.nii.gz")
    os.rename(tmp_path / "d_lab.nii.gz", tmp_path / "d_lab.moved")
    now = {("a", "original"), ("d", "original")}
    r = score_labels([items[0], items[3]], s, "v", _Est, {}, listed=lambda: now)
    assert sorted(r["removed"]) == ["b/original", "c/original"]
    assert {q["image_id"] for q in s.quality("original", include_errors=True)} == {"a", "d"}
    assert s.get_quality("d", "original")["record"]  # a read error drops nothing
    # a failed listing (the function answers None) removes nothing either
    s.put_quality("e", "original", "x", "v", record=rec("e", 0.5))
    r = score_labels([items[0]], s, "v", _Est, {}, listed=lambda: None)
    assert r["removed"] == [] and s.get_quality("e", "original")
    # an image deleted while scoring runs (after it was listed) leaves no "file not found" record behind
    _write(tmp_path / "f.nii.gz", img)
    _write(tmp_path / "f_lab.nii.gz", lab)
    f = LabelItem("f", "original", str(tmp_path / "f.nii.gz"), str(tmp_path / "f_lab.nii.gz"))
    listing = {("a", "original"), ("d", "original"), ("f", "original")}

    def load():  # the estimator loads before any file is read: f goes meanwhile
        os.remove(tmp_path / "f.nii.gz")
        listing.discard(("f", "original"))
        return _Est()

    r = score_labels([items[0], f], s, "v", load, {}, listed=lambda: listing)
    assert r["removed"] == ["e/original", "f/original"] and "f/original" not in r["errors"]
    assert s.get_quality("f", "original") is None


def test_readers_leave_out_records_of_deleted_images_and_labels(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import BudgetStrategy, QualityStrategy

    s = Store(str(tmp_path / "db"))
    ds = DS(tmp_path, {c: {"original": "x"} for c in ("a", "b", "c", "d")})
    for c, d in (("a", 0.3), ("b", 0.2), ("c", 0.1), ("d", 0.5)):
        s.put_quality(c, "original", "x", "v", record=rec(c, d))
    del ds.labels["c"]  # image deleted
    del ds.labels["b"]["original"]  # pseudo-label deleted (the image stays)
    q = QualityStrategy(lambda: s, 0.9)
    _, ranked, *_ = q.candidates({}, ds)
    assert [r.case_id for r in ranked] == ["a", "d"]
    got = [q({"client_id": f"ann{i}"}, ds) for i in range(3)]
    assert [g.get("id") for g in got] == ["a", "d", "b"]
    assert got[2]["predicted_dice"] is None and "no original label" in got[2]["reason"]  # not its stale 0.2
    plan = BudgetStrategy.make_plan(s, ds, budget_cases=4)
    assert [c["case_id"] for c in plan["cases"]] == ["a", "d"]


# --- 2. correction pairs of deleted final labels -----------------------------------------------------------------
def _corrected(tmp_path, n=4):
    """n cases, each with a pseudo-label (scored 0.9) and a final label (true Dice 0.5 for structure 1)."""
    s = Store(str(tmp_path / "db"))
    final = np.zeros((8, 8, 4), np.int16)
    final[1:7, 1:7, 1:3] = 1
    pseudo = final.copy()
    pseudo[1:7, 1:4, 1:3] = 0  # half of it: Dice 2/3
    labels = {}
    for i in range(n):
        c = f"c{i}"
        _write(tmp_path / f"{c}_p.nii.gz", pseudo)
        _write(tmp_path / f"{c}_f.nii.gz", final)
        labels[c] = {"original": str(tmp_path / f"{c}_p.nii.gz"), "final": str(tmp_path / f"{c}_f.nii.gz")}
        s.put_quality(c, "original", f"img|{file_stamp(labels[c]['original'])}", "v", record=rec(c, 0.9 - 0.05 * i))
    return s, DS(tmp_path, labels)


def test_pairs_of_a_deleted_or_unreadable_final_label_no_longer_count(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import live_corrections, record_corrections

    s, ds = _corrected(tmp_path)
    res = record_corrections(s, ds, "v", 0.05)
    assert res["recorded"] == 4 and s.get_setting("calibration:v")["cases"] == 4
    # c0's final label deleted: its pairs are not counted at once, and go (with a refit) at the next pass
    del ds.labels["c0"]["final"]
    assert {p["image_id"] for p in live_corrections(s, ds)} == {"c1", "c2", "c3"}
    res = record_corrections(s, ds, "v", 0.05)
    assert res["removed"] == ["c0/original"]
    assert {p["image_id"] for p in s.corrections()} == {"c1", "c2", "c3"}
    assert s.get_setting("calibration:v")["cases"] == 3
    # c1's final label replaced by a file that cannot be read: its pairs measured a label that is gone
    time.sleep(0.01)
    with open(ds.labels["c1"]["final"], "wb") as f:
        f.write(b"\x1f\x8b not a label")
    res = record_corrections(s, ds, "v", 0.05)
    assert "c1/original" in res["removed"] and "c1/original" in res["errors"]
    assert s.get_setting("calibration:v")["cases"] == 2
    # a listing that fails removes nothing; an unchanged final label is not even read
    ds.fail = True
    with pytest.raises(ConnectionError):
        record_corrections(s, ds, "v", 0.05)
    ds.fail = False
    assert {p["image_id"] for p in s.corrections()} == {"c2", "c3"}
    # a final label saved again replaces its pairs (as before)
    _write(tmp_path / "c1_f.nii.gz", np.zeros((8, 8, 4), np.int16) + (np.arange(8)[:, None, None] > 0))
    res = record_corrections(s, ds, "v", 0.05)
    assert res["recorded"] == 1 and {p["image_id"] for p in s.corrections()} == {"c1", "c2", "c3"}


class _RemoteFinals(DS):
    """A DICOMweb-like datastore: some final labels are SEGs only in the PACS, listed as labeled but not among
    the image's labels until ``get_label_uri(image, "final")`` fetches them into the cache."""

    def __init__(self, root, labels, remote):
        super().__init__(root, labels)
        self.remote, self.fetched = dict(remote), []

    def get_labeled_images(self, *a):
        return sorted(set(super().get_labeled_images()) | set(self.remote))

    def get_label_uri(self, label_id, tag, image_id=""):
        if tag == "final" and "final" not in self.labels[label_id]:
            self.fetched.append(label_id)
            self.labels[label_id]["final"] = self.remote.pop(label_id)
        return super().get_label_uri(label_id, tag)


def test_a_final_label_only_in_the_pacs_is_fetched_and_its_correction_recorded(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import record_corrections

    s, ds = _corrected(tmp_path, n=3)
    remote = {"c2": ds.labels["c2"].pop("final")}  # c2's final label is a SEG in the PACS only
    ds = _RemoteFinals(tmp_path, ds.labels, remote)
    res = record_corrections(s, ds, "v", 0.05)
    assert res["recorded"] == 3 and ds.fetched == ["c2"], res
    assert {p["image_id"] for p in s.corrections()} == {"c0", "c1", "c2"}
    assert record_corrections(s, ds, "v", 0.05)["recorded"] == 0 and ds.fetched == ["c2"]  # fetched once


# --- 3. budget used -----------------------------------------------------------------------------------------------
def test_budget_counts_its_own_cases_not_other_strategies_and_skips_deleted_images(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import BudgetStrategy, QualityStrategy

    s = Store(str(tmp_path / "db"))
    cases = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5}
    ds = DS(tmp_path, {c: {"original": "x"} for c in cases})
    for c, d in cases.items():
        s.put_quality(c, "original", "x", "v", record=rec(c, d))
    BudgetStrategy.make_plan(s, ds, budget_cases=2)  # a and b
    q = QualityStrategy(lambda: s, 0.9)
    assert q({"client_id": "q1"}, ds)["id"] == "a"  # a planned case, out under quality
    assert q({"client_id": "q2"}, ds)["id"] == "b"
    assert q({"client_id": "q3"}, ds)["id"] == "c"
    st = BudgetStrategy.status(s, ds)
    assert st["used_cases"] == 0 and st["left_cases"] == 2 and sorted(st["out_elsewhere"]) == ["a", "b"]
    budget = BudgetStrategy(lambda: s, 0.9)
    got = budget({"client_id": "bud"}, ds)
    assert not got.get("id") and "budget spent" not in got["reason"] and "out with other annotators" in got["reason"]
    assert got["used_cases"] == 0
    # q1 saves a final label for a (under quality): corrected since the plan, so it counts
    ds.labels["a"]["final"] = "y"
    assert BudgetStrategy.status(s, ds)["used_cases"] == 1
    q({"client_id": "q2"}, ds)  # q2 lets b go
    got = budget({"client_id": "bud"}, ds)
    assert got["id"] == "b" and got["used_cases"] == 2 and got["left_cases"] == 0 and got["out_cases"] == 1
    assert s.leases()["b"]["strategy"] == "budget"
    assert "budget spent" in budget({"client_id": "bud2"}, ds)["reason"]
    # a planned case whose image was deleted is neither served nor counted
    ds.labels["b"]["final"] = "y"
    BudgetStrategy.make_plan(s, ds, budget_cases=2)  # now c (out with q3 under quality) and d
    del ds.labels["d"]
    got = budget({"client_id": "bud3"}, ds)
    assert not got.get("id") and got["deleted_cases"] == ["d"] and got["used_cases"] == 0
    assert "d" in got["reason"]
    # a planned case whose pseudo-label was deleted before it was corrected: not served, not counted
    q({"client_id": "q3"}, ds)  # q3 lets c go
    del ds.labels["c"]["original"]
    got = budget({"client_id": "bud3"}, ds)
    assert not got.get("id") and got["deleted_cases"] == ["c", "d"] and got["used_cases"] == 0, got
    assert "set the budget again" in got["reason"]
    # a corrected planned case stays counted when its pseudo-label is deleted afterwards
    BudgetStrategy.make_plan(s, ds, budget_cases=1)  # e
    ds.labels["e"]["final"] = "y"
    del ds.labels["e"]["original"]
    st = BudgetStrategy.status(s, ds)
    assert st["used_cases"] == 1 and st["deleted_cases"] == []


def test_leases_of_an_older_store_get_their_strategy_column(tmp_path):
    p = str(tmp_path / "old.db")
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE leases (case_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, expires REAL NOT NULL)")
    c.execute("INSERT INTO leases VALUES ('a', 'ann', ?)", (time.time() + 60,))
    c.commit()
    c.close()
    s = Store(p)
    assert s.leases()["a"] == {"client_id": "ann", "expires": pytest.approx(time.time() + 60, abs=5), "strategy": None}
    assert s.acquire_lease("b", "ann", 60, strategy="budget") and s.leases()["b"]["strategy"] == "budget"
    Store(p)  # opening it again changes nothing


# --- 4, 5. the plan's tag and calibration prior --------------------------------------------------------------------
def test_unknown_tag_is_refused_and_the_plan_kept(tmp_path):
    from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

    s = Store(str(tmp_path / "db"))
    ds = DS(tmp_path, {c: {"original": "x", "nnunet": "y"} for c in ("a", "b")})
    for c in ("a", "b"):
        s.put_quality(c, "original", "x", "v", record=rec(c, 0.3))
    plan = BudgetStrategy.make_plan(s, ds, budget_cases=2)
    for bad in ("nonexistent", "final", "", None, 3):
        with pytest.raises(ValueError) as e:
            BudgetStrategy.make_plan(s, ds, budget_cases=3, tag=bad)
        if bad == "nonexistent":
            assert "nnunet, original" in str(e.value)
    assert s.get_setting("budget_plan")["ts"] == plan["ts"] and s.get_setting("budget_plan")["budget_cases"] == 2


def test_plan_calibrates_with_the_prior_it_is_given(tmp_path, monkeypatch):
    import labelsentinel.strategies.monailabel_adapters as ad

    s = Store(str(tmp_path / "db"))
    ds = DS(tmp_path, {"a": {"original": "x"}})
    s.put_quality("a", "original", "x", "v", record=rec("a", 0.3))
    seen = []
    monkeypatch.setattr(ad, "load_calibration", lambda store, v, prior=0.1: seen.append(prior))
    plan = ad.BudgetStrategy.make_plan(s, ds, budget_cases=1, prior_mae=0.037)
    assert seen == [0.037] and plan["prior_mae"] == 0.037


# --- 6. suspects of the training payload ---------------------------------------------------------------------------
def test_training_payload_leaves_out_reviewed_suspects_and_names_their_run(tmp_path):
    sys.path.insert(0, APP)
    try:
        from lib.endpoints import training_payload
    finally:
        sys.path.remove(APP)
    s = Store(str(tmp_path / "db"))
    labels = {}
    for c in ("a", "b", "c", "d", "e"):
        _write(tmp_path / f"{c}_f.nii.gz", np.ones((4, 4, 2)))
        labels[c] = {"final": str(tmp_path / f"{c}_f.nii.gz")}
    ds = DS(tmp_path, labels)
    z = {"a": 5.0, "b": 4.0, "c": 0.1, "d": 0.0, "e": -1.0}
    s.put_signals("run1", {c: {"loss": v, "vog": 0.0, "structures": [], "label_stamp": file_stamp(labels[c]["final"])}
                           for c, v in z.items()})
    t1 = s.signals()["a"]["ts"]
    s.set_setting("training_runs", [{"run_id": "run1", "ts": t1}])
    t = training_payload(s, ds)
    assert [x["case"] for x in t["suspects"]] == ["a", "b"] and t["suspects_from_last_run"]
    assert t["signals_run"]["run_id"] == "run1" and t["suspects"][0]["run_id"] == "run1"
    # b's final label saved again: reviewed; a later run wrote no signals (fewer than 2 checkpoints)
    time.sleep(0.01)
    _write(tmp_path / "b_f.nii.gz", np.ones((4, 4, 2)) * 2)
    s.set_setting("training_runs", [{"run_id": "run1", "ts": t1}, {"run_id": "run2", "ts": t1 + 100}])
    t = training_payload(s, ds)
    assert [x["case"] for x in t["suspects"]] == ["a"]
    assert [x["case"] for x in t["reviewed_suspects"]] == ["b"]
    assert not t["suspects_from_last_run"] and t["signals_run"]["run_id"] == "run1"
    assert t["signals_run"]["ts"] == pytest.approx(t1) and t["last"]["run_id"] == "run2"
    # a's final label deleted: neither a suspect nor reviewed
    del ds.labels["a"]["final"]
    t = training_payload(s, ds)
    assert t["suspects"] == [] and [x["case"] for x in t["reviewed_suspects"]] == ["b"]
    assert [x["case"] for x in t["deleted_suspects"]] == ["a"]


# --- 7. the review strategy: who has the suspects, and deleted final labels ----------------------------------------
def test_review_says_the_suspects_are_out_and_does_not_call_a_deleted_label_reviewed(tmp_path):
    from labelsentinel.strategies.label_errors import review_state
    from labelsentinel.strategies.monailabel_adapters import ReviewStrategy

    s = Store(str(tmp_path / "db"))
    labels = {}
    for c in ("a", "b", "c"):
        _write(tmp_path / f"{c}_f.nii.gz", np.ones((4, 4, 2)))
        labels[c] = {"final": str(tmp_path / f"{c}_f.nii.gz")}
    ds = DS(tmp_path, labels)
    sig = {c: {"loss": v, "vog": 0.0, "structures": [], "label_stamp": file_stamp(labels[c]["final"])}
           for c, v in {"a": 5.0, "b": 4.0, "c": 0.1}.items()}
    s.put_signals("run1", sig)
    review = ReviewStrategy(lambda: s)
    assert review({"client_id": "r1"}, ds)["id"] == "a"
    assert review({"client_id": "r2"}, ds)["id"] == "b"
    got = review({"client_id": "r3"}, ds)
    assert not got.get("id") and "out with other annotators (a, b)" in got["reason"], got
    # b's final label deleted: not a suspect any more, and not "reviewed" either
    del ds.labels["b"]["final"]
    finals = {c: ds.labels[c].get("final") for c in sig}
    assert review_state(sig, finals) == (set(), {"b"})
    got = review({"client_id": "r3"}, ds)
    assert "(a)" in got["reason"] and "0 reviewed since the signals, 1 deleted" in got["reason"], got
    # a saved again: reviewed; nothing left at all
    time.sleep(0.01)
    _write(tmp_path / "a_f.nii.gz", np.ones((4, 4, 2)) * 2)
    got = review({"client_id": "r3"}, ds)
    assert got["reason"].startswith("nothing to review: no unreviewed") and "1 reviewed" in got["reason"], got
