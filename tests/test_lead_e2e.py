"""The project lead's CLI (`labelsentinel status|plan|report --server URL`) against a real server over 12 demo
studies: scoring progress while another scoring task runs, missing structures in the report, a new plan
replacing one, a training run in progress, and leases on deleted images."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from conftest import Server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("lead") / "studies")
    generate(d, cases=12, seed=0, real_ct=False, progress=False)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    # The demo's 3 final labels over pseudo-labels are corrections: with finetune_after 2 the first scoring also
    # fine-tunes the estimator (a minute or more). Auto scoring off: the tests decide when scoring runs.
    srv = Server(studies, str(tmp_path_factory.mktemp("leads")), conf={"finetune_after": 2},
                 env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.start()
    yield srv
    try:  # a training run a failed test left running
        requests.delete(f"{srv.url}/train/", timeout=30)
    except requests.RequestException:
        pass
    srv.stop()


def _cli(server, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args, "--server", server.url],
                          capture_output=True, text=True, timeout=timeout)


def _wait(what, fn, timeout=300):
    t_end = time.time() + timeout
    while time.time() < t_end:
        got = fn()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_running_task_and_scoring_progress_from_monai_labels_task_list():
    """MONAI Label runs a kind's tasks one at a time in the order submitted: a task queued behind another started
    when that one ended (its start_ts is when it was submitted)."""
    from labelsentinel.lead import running_task, scoring_progress

    prefix = "[2026-01-02 10:00:05,123] [4242] [MainThread] [INFO] (labelsentinel.models.estimator_finetune:168) - "
    tasks = [{"id": "a", "status": "DONE", "request": {"method": "quality"}, "start_ts": "2026-01-02 09:00:00",
              "end_ts": "2026-01-02 09:59:00", "details": ["x"]},
             {"id": "b", "status": "RUNNING", "request": {"method": "quality"}, "start_ts": "2026-01-02 09:30:00",
              "details": [prefix + "fine-tune (all) epoch 5/60: held-out real MAE 0.0673", ""]},
             {"id": "c", "status": "SUBMITTED", "request": {"method": "quality"}, "start_ts": "2026-01-02 09:31:00"},
             {"id": "d", "status": "SUBMITTED", "request": {"method": "quality"}, "start_ts": "2026-01-02 09:32:00"}]
    run = running_task(tasks)
    assert run["id"] == "b" and run["started"] == "2026-01-02 09:59:00" and run["queued"] == 2
    assert run["last_line"] == "fine-tune (all) epoch 5/60: held-out real MAE 0.0673"
    assert scoring_progress(tasks, "d") == ("queued (2 task(s) ahead); running: quality scoring since 2026-01-02 "
                                            "09:59:00 (server time): fine-tune (all) epoch 5/60: held-out real MAE 0.0673")
    assert scoring_progress(tasks, "b").startswith("running since 2026-01-02 09:59:00 (server time): fine-tune (all)")
    assert running_task(tasks[:1]) is None
    # a training run's output (MONAI's own log format) without its time and level
    train = [{"id": "t", "status": "RUNNING", "request": {"model": "segmentation"}, "start_ts": "2026-01-02 11:00:00",
              "details": ["2026-01-02 11:00:57,508 - INFO - Epoch: 10/1000, Iter: 1/4 -- train_loss: 0.0349"]}]
    assert running_task(train)["what"] == "segmentation"
    assert running_task(train)["last_line"] == "Epoch: 10/1000, Iter: 1/4 -- train_loss: 0.0349"


def test_score_shows_which_scoring_task_runs_since_when_and_its_last_line(server):
    """`status --score` while the server's scoring task is busy fine-tuning the estimator, with another scoring
    task queued behind it (as MONAI Label's auto scoring queues them): the progress says what runs and how far it
    is, not a bare SUBMITTED."""
    assert requests.post(f"{server.url}/scoring/quality", timeout=30).status_code == 200
    queued = requests.post(f"{server.url}/scoring/", timeout=30).json()  # MONAI Label's "run all": enqueues
    assert queued["quality"]["result"]["status"] == "SUBMITTED", queued
    r = _cli(server, "status", "--score", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("scoring: ")]
    # waiting: the running task, since when (server time), and its last output line (the fine-tuning epochs)
    waiting = [x for x in lines if x.startswith("scoring: queued (1 task(s) ahead); running: quality scoring since ")]
    assert any("(server time): fine-tune (" in x and " epoch " in x for x in waiting), lines[:40]
    # then its own run (everything is scored by then: it may end between two polls, so its own progress line is
    # not required here; the unit test above checks that line)
    assert all(x.startswith(("scoring: queued ", "scoring: running since ", "scoring: DONE")) for x in lines), lines
    assert lines[-1].startswith("scoring: DONE after "), lines[-5:]
    assert json.loads(r.stdout)["scored_labels"] == 12
    tasks = requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=30).json()
    assert [t["status"] for t in tasks] == ["DONE", "DONE"], [t["status"] for t in tasks]  # it joined the queued one


def test_report_lists_missing_structures_as_dice_0_like_the_case_figures(server, tmp_path):
    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()
    missing = {(r["image_id"], str(m["id"])) for r in q["records"] if r["record"]
               for m in r["record"].get("missing") or []}
    assert missing, "the demo studies have pseudo-labels that lack a structure"
    out = tmp_path / "report"
    r = _cli(server, "report", "--out", str(out))
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)
    rows = list(csv.DictReader(open(out / "structures.csv")))
    got = {(x["case"], x["label_id"]): x for x in rows if x.get("missing") == "1"}
    assert set(got) == missing, (sorted(got), sorted(missing))
    assert all(float(x["predicted_dice"]) == 0 and "missing" in x["flags"].split(";") for x in got.values())
    assert all(x["missing"] == "0" for x in rows if (x["case"], x["label_id"]) not in missing)
    # structures.csv and cases.csv agree: a case's worst structure (min) is its lowest row in structures.csv
    by_case: dict = {}
    for x in rows:
        by_case.setdefault(x["case"], []).append(float(x["predicted_dice"]))
    for c in csv.DictReader(open(out / "cases.csv")):
        assert abs(float(c["predicted_dice_min"]) - min(by_case[c["case"]])) < 1e-4, c
    page = (out / "report.html").read_text()
    assert f"{len(missing)} expected structure(s) missing from their labels are counted as predicted Dice 0" in page
    # the page names every CSV file written
    csv_line = page.split("<p>CSV: ", 1)[1].split("</p>", 1)[0]
    written = sorted(os.path.basename(p) for p in paths.values() if p.endswith(".csv"))
    assert "groups.csv" in written and sorted(csv_line.split(", ")) == written, (csv_line, written)


def test_a_new_plan_says_what_the_plan_it_replaces_had_used(server):
    from monailabel.client import MONAILabelClient

    from labelsentinel.store import Store, store_path

    store = Store(store_path(server.studies))
    for cid in list(store.leases()):
        store.release_lease(cid)
    r = _cli(server, "plan", "--cases", "3")
    assert r.returncode == 0, r.stderr
    assert "replacing the plan" not in r.stdout  # the first plan replaces none
    served = [requests.post(f"{server.url}/activelearning/budget", json={"client_id": f"b{i}"}, timeout=30).json()["id"]
              for i in range(3)]
    assert all(served) and len(set(served)) == 3, served
    MONAILabelClient(server.url).save_label(served[0], os.path.join(server.studies, "truth", f"{served[0]}.nii.gz"),
                                            tag="final")
    _wait("final label saved", lambda: requests.get(f"{server.url}/labelsentinel/budget", timeout=30).json()
          ["status"]["corrected_cases"] == 1, timeout=60)
    r = _cli(server, "plan", "--cases", "5")
    assert r.returncode == 0, r.stderr
    assert "replacing the plan of " in r.stdout and "(budget 3 cases), which had used 3 of 3 planned case(s), " in r.stdout, r.stdout
    assert "(1 corrected, 2 out with annotators)" in r.stdout, r.stdout
    assert "the new budget counts from now: used: " in r.stdout, r.stdout
    # the new plan's own count: planned cases still out under `budget` (b1, b2 hold theirs) count as used
    st = requests.get(f"{server.url}/labelsentinel/budget", timeout=30).json()["status"]
    assert f"used: {st['used_cases']} case(s)" in r.stdout and st["corrected_cases"] == 0, (st, r.stdout)
    if st["out_cases"]:
        assert f"({st['out_cases']} planned case(s) already out with annotators under `budget` count as used)" in r.stdout
    # --json: the replaced plan's figures and the new plan's status
    r = _cli(server, "plan", "--cases", "5", "--json")
    d = json.loads(r.stdout)
    assert d["budget_cases"] == 5 and d["replaced_plan"]["budget_cases"] == 5
    assert d["replaced_plan"]["status"]["used_cases"] == st["used_cases"] and d["budget_status"]["budget_cases"] == 5


def _train(server, **params):
    body = {"max_epochs": 1, "val_split": 0.0, "dataset": "Dataset", "tracking": "None", **params}
    r = requests.post(f"{server.url}/train/segmentation", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _train_task(server, task_id):
    return next(t for t in requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=30).json()
                if t["id"] == task_id)


def test_status_says_a_training_run_is_in_progress_next_to_the_last_finished_one(server):
    # the first run: no record yet (records are written when a run ends)
    first = _train(server, max_epochs=1000)
    _wait("training running", lambda: _train_task(server, first)["status"] == "RUNNING", timeout=60)
    r = _cli(server, "status")
    assert r.returncode == 0, r.stderr
    assert "  training now: a segmentation training run is in progress, started " in r.stdout, r.stdout
    assert "  training: no finished training run yet" in r.stdout, r.stdout
    now = json.loads(_cli(server, "status", "--json").stdout)["training_now"]
    assert now["model"] == "segmentation" and now["id"] == first and now["started"] >= _train_task(server, first)["start_ts"]
    requests.delete(f"{server.url}/train/", timeout=30)  # stopped: it leaves no record
    assert _train_task(server, first)["status"] == "STOPPED"
    # a finished run, then another in progress: both are told
    done = _train(server, max_epochs=1)
    _wait("short training run", lambda: _train_task(server, done)["status"] in ("DONE", "ERROR"), timeout=600)
    assert _train_task(server, done)["status"] == "DONE", _train_task(server, done)["details"][-5:]
    r = _cli(server, "status")
    assert "training now:" not in r.stdout and "  training: 1 run(s); last at " in r.stdout, r.stdout
    second = _train(server, max_epochs=1000)
    _wait("training running", lambda: _train_task(server, second)["status"] == "RUNNING", timeout=60)
    r = _cli(server, "status")
    assert "  training now: a segmentation training run is in progress, started " in r.stdout, r.stdout
    assert "  training: 1 run(s); last at " in r.stdout, r.stdout
    requests.delete(f"{server.url}/train/", timeout=30)


def test_status_does_not_count_leases_on_deleted_images(server):
    from labelsentinel.store import Store, store_path

    store = Store(store_path(server.studies))
    for cid in list(store.leases()):
        store.release_lease(cid)
    held = [requests.post(f"{server.url}/activelearning/first", json={"client_id": f"a{i}"}, timeout=30).json()["id"]
            for i in range(2)]
    assert all(held), held
    victim = held[0]
    # MONAI Label's older route (DELETE /datastore/?id=), still answered
    assert requests.delete(f"{server.url}/datastore/", params={"id": victim}, timeout=30).status_code == 200
    _wait("image deleted", lambda: victim not in requests.get(f"{server.url}/datastore/", params={"output": "all"},
                                                              timeout=30).json()["objects"])
    st = json.loads(_cli(server, "status", "--json").stdout)
    assert st["annotators"] == {"a1": [[held[1], st["annotators"]["a1"][0][1]]]}, st["annotators"]
    assert st["out_with_annotators"] == 1
    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()
    if victim in q["leases"]:  # the server still holds the lease: listed apart
        assert [c for c, _ in st["stale_leases"]["a0"]] == [victim], st["stale_leases"]
        text = _cli(server, "status").stdout
        assert "  out with annotators: 1\n" in text and f"leases on images deleted since (not counted above): a0: {victim}" in text, text
