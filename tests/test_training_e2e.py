"""Semi-supervised training, label-error signals, the review strategy, recalibration from corrections and
refurbishment, on the real server over generated sample studies."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import Server, wait_status as _wait

pytestmark = pytest.mark.server
FINALS = ["case_000", "case_001", "case_002"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("t") / "studies")
    generate(d, cases=7, seed=5, real_ct=False, progress=False)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    # fine-tune the estimator once 5 cases are corrected (default 10)
    srv = Server(studies, str(tmp_path_factory.mktemp("ts")), conf={"finetune_after": 5},
                 env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return MONAILabelClient(server.url)


def _score(url):
    assert requests.post(f"{url}/scoring/quality", timeout=30).status_code == 200
    st = _wait(lambda: requests.get(f"{url}/scoring/", timeout=30).json(), "scoring")
    assert st["status"] == "DONE", st
    return st


def _train(client, server, **params):
    req = {"max_epochs": 2, "val_split": 0.0, "dataset": "Dataset", "tracking": "None", **params}
    client.train_start("segmentation", req)
    st = _wait(lambda: client.train_status(), "training")
    assert st["status"] == "DONE", f"training ended as {st['status']}:\n{server.log()[-4000:]}"


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_training_uses_chosen_pseudo_labels_and_flags_final_labels(server, client, store, studies):
    _score(server.url)
    # The finals' own pseudo-labels are corrections already: scoring turned them into real pairs.
    assert {r["image_id"] for r in store.corrections()} == set(FINALS)
    _train(client, server, pseudo_labels="topk", pseudo_topk=2, signal_checkpoints=2)

    run = store.get_setting("training_runs")[-1]
    assert run["finals"] == 3 and len(run["pseudo_labels"]) == 2
    # CUDA with mixed precision where there is a GPU, CPU without (the server's process sees the same devices)
    import torch

    gpu = torch.cuda.is_available()
    assert run["device"].startswith("cuda") == gpu and run["amp"] == gpu, run
    assert ("with mixed precision" in server.log()) == gpu
    assert run["options"]["pseudo_labels"] == "topk" and run["options"]["refurbish_signal"] == "vog"
    with open(os.path.join(server.model_dir, "segmentation", "train_data.json")) as f:
        assert json.load(f)["pseudo_labels"] == run["pseudo_labels"]
    # the two chosen are the best-rated unlabeled pseudo-labels (calibrated worst structure)
    from labelsentinel.strategies.monailabel_adapters import calibrated_records
    from labelsentinel.strategies.ranking import aggregate

    recs = [r for r in calibrated_records(store, "original", 0.06) if r["case"] not in FINALS]
    best = sorted(recs, key=lambda r: (-aggregate(r, "min"), r["case"]))[:2]
    assert [p["case"] for p in run["pseudo_labels"]] == [r["case"] for r in best]
    for p in run["pseudo_labels"]:
        assert p["label"].endswith(f"labels/original/{p['case']}.nii.gz") and "among the 2 best" in p["reason"]
        assert 0 <= p["quality"] <= 1

    sig = store.signals()
    assert set(sig) == set(FINALS)
    for s in sig.values():
        assert s["checkpoints"] == 2 and s["structures"] and all("vog_z" in x for x in s["structures"])
    # The lead sees the run: which pseudo-labels it used, and the final labels flagged as suspect.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "labelsentinel.cli", "status", "--json", "--server", server.url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["training"]
    assert t["runs"] >= 1 and [p["case"] for p in t["last_pseudo_labels"]] == [p["case"] for p in run["pseudo_labels"]]
    flagged = [c for c, d in sig.items() if d["loss"] >= 2.0]
    assert sorted(x["case"] for x in t["suspect_final_labels"]) == sorted(flagged)

    # review: the most suspect final label first, then the next one to another annotator, never the same
    order = sorted(FINALS, key=lambda c: (-sig[c]["loss"], c))
    # one client per annotator, as the Slicer plugin does (its client_id goes with every request)
    def ann(i):
        return MONAILabelClient(server.url, client_id=f"ann-{i}")

    a = ann(1).next_sample("review", {"min_score": -1e9})
    b = ann(2).next_sample("review", {"min_score": -1e9})
    assert [a["id"], b["id"]] == order[:2] and a["signal"] == "loss" and a["suspect_structures"]
    by_vog = ann(3).next_sample("review", {"signal": "vog", "min_score": -1e9})
    assert by_vog["id"] == order[2] and by_vog["signal"] == "vog"
    none = ann(4).next_sample("review", {"min_score": 1e9})
    assert none["id"] == "" and "nothing to review" in none["reason"]
    info = client.info()
    assert "review" in info["strategies"] and "pseudo_labels" in info["trainers"]["segmentation"]["config"]


def test_saving_final_labels_adds_real_pairs_and_changes_calibration(server, client, store, studies):
    from labelsentinel.models.estimator import weights_version

    key = f"calibration:{weights_version()}"
    before = store.get_setting(key)
    n_pairs = len(store.corrections())
    for case in ("case_003", "case_004"):
        res = client.save_label(case, os.path.join(studies, "truth", f"{case}.nii.gz"), tag="final",
                                params={"label_info": [{"name": "liver", "idx": 5}]})
        assert res["corrections"]["recorded"] == 1, res
    after = store.get_setting(key)
    assert len(store.corrections()) > n_pairs
    assert after["n"] > before["n"] and after["cases"] == before["cases"] + 2
    assert (after["xs"], after["ys"]) != (before["xs"], before["ys"])
    assert after["mae_before"] is not None and after["mae_after"] is not None
    # The lead's view (status, report, plan) is the calibrated one the strategies serve by, raw value kept.
    import requests

    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=30).json()
    recs = [r["record"] for r in q["records"] if r.get("record")]
    applied = after.get("applied", True)
    assert recs and all(r.get("calibrated") == applied for r in recs)
    s = recs[0]["structures"][0]
    assert "raw_predicted_dice" in s and "lower_bound" in s
    assert q["corrections"]["calibration"]["applied"] == applied and q["corrections"]["cases"] >= 2


def test_refurbishment_trains_on_predictions_and_never_touches_final_labels(server, client, store, studies, tmp_path):
    finals = {c: os.path.join(studies, "labels", "final", f"{c}.nii.gz") for c in FINALS + ["case_003", "case_004"]}
    md5 = {c: _md5(p) for c, p in finals.items()}
    # An annotator reviews one flagged label and saves it again as it was: it is their word now.
    import shutil

    same = str(tmp_path / "reviewed.nii.gz")
    shutil.copyfile(finals[FINALS[0]], same)
    client.save_label(FINALS[0], same, tag="final")
    _train(client, server, max_epochs=1, pseudo_labels="none", refurbish=True, suspect_threshold=-1e9,
           signal_checkpoints=2)
    run = store.get_setting("training_runs")[-1]
    # the previous run's signals cover the 3 older finals: all flagged at this threshold; the reviewed one is
    # trained on as saved, the other two are refurbished
    assert sorted(r["case"] for r in run["refurbished"]) == FINALS[1:]
    for r in run["refurbished"]:
        assert os.path.isfile(r["refurbished"]) and "/labels/refurbished/" in r["refurbished"]
        assert r["final"] == finals[r["case"]]
    assert {c: _md5(p) for c, p in finals.items()} == md5  # byte-identical human labels
    labels = requests.get(f"{server.url}/datastore/?output=all", timeout=10).json()
    assert all("final" in labels["objects"][c]["labels"] for c in finals)


def test_fine_tuning_after_enough_corrections(server, store):
    """5 corrected cases now (3 at start + 2 saved above): the next scoring fine-tunes the estimator on them,
    keeps the result only if it beats the current weights on held-out corrected cases, and rescoring uses it."""
    from labelsentinel.models.estimator import weights_version
    from labelsentinel.models.estimator_finetune import MIN_GAIN, MIN_REL_GAIN

    ROUNDING = 1e-4  # the result records both MAEs rounded to 4 decimals

    _score(server.url)
    last = store.get_setting("estimator_finetune_last")
    assert last and last["cases"] == 5, last
    res = last["result"]
    assert res["real_samples"] > 0 and res["held_out_real_samples"] > 0 and "mae_before" in res
    need = max(MIN_GAIN, MIN_REL_GAIN * res["mae_before"])
    if res["accepted"]:
        assert res["mae_after"] <= res["mae_before"] - need + ROUNDING
        assert store.get_setting("estimator_finetuned")["version"] == res["version"] != weights_version()
        _score(server.url)  # the next scoring rescores every label with the fine-tuned weights
        assert {r["estimator_version"] for r in store.quality("original")} == {res["version"]}
    else:
        # kept only for a held-out gain of at least MIN_GAIN and MIN_REL_GAIN of the current MAE
        assert res["mae_after"] > res["mae_before"] - need - ROUNDING and store.get_setting("estimator_finetuned") is None
        assert {r["estimator_version"] for r in store.quality("original")} == {weights_version()}
    print("fine-tune result:", res)
