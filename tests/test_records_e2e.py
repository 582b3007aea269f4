"""On the real server: deleting images and labels takes their scores and correction pairs with it, the budget
counts only its own work, and a plan is made only from a label tag that exists, with the app's calibration
prior."""

from __future__ import annotations

import os
import time

import pytest
import requests

from conftest import Server, run_scoring

pytestmark = pytest.mark.server


def _score(url, timeout=600):
    st = run_scoring(url, timeout)
    assert st["status"] == "DONE", st
    return st


def _listed(url) -> dict:
    d = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    return {i: set((o.get("labels") or {}).keys()) for i, o in d["objects"].items()}


def _wait(url, ok, timeout=30):
    t_end = time.time() + timeout
    while time.time() < t_end:
        if ok(_listed(url)):
            return
        time.sleep(0.3)
    raise AssertionError(f"datastore did not change: {_listed(url)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("rec") / "studies")
    generate(d, cases=8, seed=0, real_ct=False, progress=False)
    srv = Server(d, str(tmp_path_factory.mktemp("recs")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    _score(srv.url)
    yield srv
    srv.stop()


def _quality(url):
    return requests.get(f"{url}/labelsentinel/quality", timeout=60).json()


def test_deleted_images_labels_and_final_labels_take_their_records_with_them(server):
    from labelsentinel.store import Store, store_path

    url = server.url
    q = _quality(url)
    assert {r["image_id"] for r in q["records"]} >= {"case_005", "case_006", "case_007"}
    assert q["corrections"]["cases"] == 3 and q["corrections"]["calibration"]["cases"] == 3  # finals of 000-002
    assert requests.delete(f"{url}/datastore/image", params={"id": "case_007"}, timeout=30).status_code == 200
    assert requests.delete(f"{url}/datastore/label", params={"id": "case_006", "tag": "original"}, timeout=30).status_code == 200
    assert requests.delete(f"{url}/datastore/label", params={"id": "case_000", "tag": "final"}, timeout=30).status_code == 200
    # a pseudo-label removed outside the server (the folder is watched): gone at the next scoring at the latest
    os.remove(os.path.join(server.studies, "labels", "original", "case_005.nii.gz"))
    _wait(url, lambda ds: "case_007" not in ds and "original" not in ds.get("case_006", {"original"})
          and "final" not in ds["case_000"] and "original" not in ds["case_005"])
    q = _quality(url)
    ids = {r["image_id"] for r in q["records"]}
    assert not ids & {"case_005", "case_006", "case_007"}, ids
    assert {p["image_id"] for p in q["corrections"]["pairs"]} == {"case_001", "case_002"}
    assert q["corrections"]["cases"] == 2 and q["corrections"]["calibration"]["cases"] == 2  # refitted
    st = _score(url)
    assert not any("case_007" in d and "not found" in d for d in st["details"])
    store = Store(store_path(server.studies))
    left = {(r["image_id"], r["tag"]) for r in store.quality(include_errors=True)}
    assert not {i for i, _ in left} & {"case_005", "case_006", "case_007"}, left
    assert {r["image_id"] for r in store.corrections()} == {"case_001", "case_002"}
    assert store.get_setting(f"calibration:{q['corrections']['estimator_version']}")["cases"] == 2
    # the lead's status agrees
    from labelsentinel.lead import summarize

    s = summarize(_quality(url))
    assert s["images"] == 7 and s["scored_labels"] == len(ids) and s["corrections"]["corrected_labels"] == 2


def test_budget_counts_its_own_cases_and_skips_deleted_ones(server):
    url = server.url
    scored = {r["image_id"] for r in _quality(url)["records"] if r["record"] and not r["has_final"]}
    assert scored == {"case_000", "case_003", "case_004"}, scored
    # unknown tag: refused, naming the tags there are; the plan stays
    r = requests.put(f"{url}/labelsentinel/budget", json={"cases": 3, "tag": "nonexistent"}, timeout=60)
    assert r.status_code == 422 and "original" in r.json()["detail"], r.text
    plan = requests.put(f"{url}/labelsentinel/budget", json={"cases": 3, "good_enough": 0.999}, timeout=60).json()
    assert {c["case_id"] for c in plan["cases"]} == scored
    r = requests.put(f"{url}/labelsentinel/budget", json={"cases": 3, "tag": "nonexistent"}, timeout=60)
    assert r.status_code == 422
    assert requests.get(f"{url}/labelsentinel/budget", timeout=30).json()["plan"]["ts"] == plan["ts"]
    # the app's calibration prior (the estimator's validation MAE), not the default 0.1
    import torch

    from labelsentinel.models.estimator import DEFAULT_WEIGHTS

    mae = float(torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)["validation"]["estimator"]["mae"])
    assert plan["prior_mae"] == pytest.approx(mae) and abs(mae - 0.1) > 1e-6
    # two annotators hold cases under `quality`: not the budget's
    held = {requests.post(f"{url}/activelearning/quality", json={"client_id": c, "good_enough": 0.999},
                          timeout=30).json()["id"] for c in ("q1", "q2")}
    assert len(held) == 2 and held <= scored
    got = requests.post(f"{url}/activelearning/budget", json={"client_id": "b1"}, timeout=30).json()
    assert got["id"] == (scored - held).pop() and got["used_cases"] == 1 and got["left_cases"] == 2, got
    got = requests.post(f"{url}/activelearning/budget", json={"client_id": "b2"}, timeout=30).json()
    assert not got.get("id") and "budget spent" not in got["reason"] and got["used_cases"] == 1, got
    # a planned image deleted: neither served nor counted
    victim = sorted(held)[0]
    assert requests.delete(f"{url}/datastore/image", params={"id": victim}, timeout=30).status_code == 200
    _wait(url, lambda ds: victim not in ds)
    got = requests.post(f"{url}/activelearning/budget", json={"client_id": "b3"}, timeout=30).json()
    assert got.get("id") != victim and victim in got["deleted_cases"] and got["used_cases"] == 1, got
    # a planned case whose pseudo-label (not its image) is deleted before it was corrected: skipped, not counted
    other = sorted(held)[1]
    r = requests.delete(f"{url}/datastore/label", params={"id": other, "tag": "original"}, timeout=30)
    assert r.status_code == 200
    _wait(url, lambda ds: "original" not in ds[other])
    requests.post(f"{url}/activelearning/quality", json={"client_id": "q2", "good_enough": 0.999}, timeout=30)
    got = requests.post(f"{url}/activelearning/budget", json={"client_id": "b4"}, timeout=30).json()
    assert not got.get("id") and sorted(got["deleted_cases"]) == sorted(held) and got["used_cases"] == 1, got
    assert "set the budget again" in got["reason"] and other in got["reason"], got


def test_the_older_delete_route_takes_the_records_with_it_too(server):
    """MONAI Label also deletes an image with ``DELETE /datastore/?id=`` (deprecated, still used by older
    clients): its scores, correction pairs and lease go at once, as with ``/datastore/image``."""
    from labelsentinel.store import Store, store_path

    store = Store(store_path(server.studies))
    assert store.get_quality("case_001", "original") and any(r["image_id"] == "case_001" for r in store.corrections())
    assert store.acquire_lease("case_001", "someone", 600)
    r = requests.delete(f"{server.url}/datastore/", params={"id": "case_001"}, timeout=30)
    assert r.status_code == 200, r.text
    assert store.get_quality("case_001", "original") is None
    assert not any(r["image_id"] == "case_001" for r in store.corrections())
    assert "case_001" not in store.leases()
