"""A training run stopped with DELETE /train (MONAI Label kills its process with SIGKILL) leaves nothing behind
that looks like a finished run's product, on the real server: the model the server infers with, the
checkpoint the next run starts from, the labels saved under the ``refurbished`` tag and the label-error signals
stay those of the last run that finished; the human final labels are never touched; the next run starts from
the last finished run's model, and its products are published when it finishes."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import Server, wait_status

pytestmark = pytest.mark.server
FINALS = ["case_000", "case_001", "case_002"]
# fast runs: no pseudo-labels, no validation split, label-error signals at 2 checkpoints
TRAIN = {"pseudo_labels": "none", "val_split": 0.0, "tracking": "None", "dataset": "Dataset", "signal_checkpoints": 2}
REFURBISH = {"refurbish": True, "suspect_threshold": -1e9}  # every final label with signals is flagged


def _port() -> int:
    """A free loopback port among 8750-8759 (the ports these tests may use)."""
    for p in range(8750, 8760):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue
    pytest.skip("no free port in 8750-8759")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("tstop") / "studies")
    generate(d, cases=4, seed=0, real_ct=False, progress=False)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    srv = Server(studies, str(tmp_path_factory.mktemp("tstops")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.port = _port()
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv.log_path = os.path.join(os.path.dirname(srv.log_path), f"server-{srv.port}.log")
    srv.start()
    yield srv
    srv.stop()


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _train(server, **params) -> None:
    r = requests.post(f"{server.url}/train/segmentation", json={**TRAIN, **params}, timeout=60)
    assert r.status_code == 200, r.text
    st = wait_status(lambda: requests.get(f"{server.url}/train/", timeout=30).json(), "training")
    assert st["status"] == "DONE", server.log()[-4000:]


def _infer(server, tmp_path, case="case_003") -> np.ndarray:
    out, _ = MONAILabelClient(server.url, tmpdir=str(tmp_path)).infer("segmentation", case, {})
    try:
        return np.asarray(nib.load(out).dataobj)
    finally:
        os.unlink(out)


def _state(server, studies, store) -> dict:
    """Everything a run may leave for inference, the next run or the people using the server."""
    model_dir = server.model_dir
    ds = json.load(open(os.path.join(studies, "datastore_v2.json")))
    return {
        # every checkpoint outside a run's own unfinished work area: the published model and what the next run
        # may start from
        "checkpoints": {os.path.relpath(p, model_dir): _sha(p)
                        for p in glob.glob(os.path.join(model_dir, "**", "*.pt"), recursive=True)
                        if f"{os.sep}staging{os.sep}" not in p},
        "labels": {os.path.relpath(p, studies): _sha(p)
                   for p in glob.glob(os.path.join(studies, "labels", "*", "*.nii.gz"))},
        "refurbished_info": {c: o["labels"]["refurbished"] for c, o in ds["objects"].items()
                             if "refurbished" in o["labels"]},
        "runs": store.get_setting("training_runs"),
        "signals": store.signals(),
    }


def _diff(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return (a, b)


def test_a_stopped_run_changes_nothing_the_server_uses_and_the_next_run_publishes(server, studies, store, tmp_path):
    _train(server, max_epochs=2)  # a first run: label-error signals for the three final labels
    _train(server, max_epochs=1, **REFURBISH)  # a finished run that refurbishes them
    before = _state(server, studies, store)
    finished = before["runs"][-1]
    assert sorted(r["case"] for r in finished["refurbished"]) == FINALS
    assert sorted(before["refurbished_info"]) == FINALS
    assert "segmentation.pt" in before["checkpoints"]
    infer_before = _infer(server, tmp_path)

    # a long run with refurbishment, stopped after a few epochs (MONAI Label published its best model at every
    # epoch, and the run had saved its refurbished labels over the finished run's)
    assert requests.post(f"{server.url}/train/segmentation", json={**TRAIN, **REFURBISH, "max_epochs": 1000},
                         timeout=60).status_code == 200
    t_end = time.time() + 300
    while True:
        st = (requests.get(f"{server.url}/info/", timeout=30).json().get("train_stats") or {}).get("segmentation") or {}
        if st.get("total_epochs") == 1000 and st.get("epoch", 0) >= 3:
            break
        assert time.time() < t_end, server.log()[-4000:]
        time.sleep(0.5)
    stopped = requests.delete(f"{server.url}/train/", timeout=30).json()
    assert stopped["status"] == "STOPPED", stopped
    time.sleep(2)

    after = _state(server, studies, store)
    changed = {k: _diff(before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the stopped run changed: {json.dumps(changed, indent=1, default=str)[:4000]}"
    assert np.array_equal(_infer(server, tmp_path), infer_before)  # the server infers as before the stopped run

    # the next run starts from the last finished run's model, not from the stopped run's, and publishes its own
    # products when it finishes
    n_log = len(server.log())
    _train(server, max_epochs=1, **REFURBISH)
    log = server.log()[n_log:]
    loads = [line for line in log.splitlines() if "Load Path" in line]
    assert loads and loads[-1].rstrip().endswith(os.path.join(server.model_dir, "segmentation.pt")), loads
    last = _state(server, studies, store)
    run = last["runs"][-1]
    assert run["status"] == "finished" and len(last["runs"]) == len(before["runs"]) + 1
    assert last["checkpoints"]["segmentation.pt"] != before["checkpoints"]["segmentation.pt"]
    assert sorted(r["case"] for r in run["refurbished"]) == FINALS
    for r in run["refurbished"]:
        assert r["refurbished"] == os.path.join(studies, "labels", "refurbished", f"{r['case']}.nii.gz")
        assert last["refurbished_info"][r["case"]]["info"].get("run_id") == run["run_id"]
    # the human final labels were never touched, by any run
    finals = {k: v for k, v in before["labels"].items() if k.startswith(os.path.join("labels", "final"))}
    assert {k: last["labels"][k] for k in finals} == finals
    # no work area of the stopped run is left once the next run has ended
    staging = os.path.join(server.model_dir, "segmentation", "staging")
    assert not os.path.isdir(staging) or not os.listdir(staging), os.listdir(staging)


def test_a_run_killed_while_publishing_is_published_by_the_next_run(server, studies, store):
    """SIGKILL after a run finished training but before all its products were published: the next run publishes
    them first (the run counts as finished once its work area holds COMMITTED.json)."""
    import signal

    staging = os.path.join(server.model_dir, "segmentation", "staging")
    if not store.signals():  # run alone: a first run flags the final labels to refurbish
        _train(server, max_epochs=2)
    n_runs = len(store.get_setting("training_runs"))
    assert requests.post(f"{server.url}/train/segmentation", json={**TRAIN, **REFURBISH, "max_epochs": 2},
                         timeout=60).status_code == 200
    t_end, t_check, commit = time.time() + 300, 0.0, None
    while commit is None:  # watched closely: the run publishes within milliseconds of writing COMMITTED.json
        found = glob.glob(os.path.join(staging, "*", "COMMITTED.json"))
        if found:
            commit = found[0]
            break
        if time.time() > t_check:
            running = requests.get(f"{server.url}/train/", timeout=30).json()["status"] in ("SUBMITTED", "RUNNING")
            assert running and time.time() < t_end, \
                f"the run ended without a COMMITTED.json in {staging}:\n{server.log()[-2000:]}"
            t_check = time.time() + 0.5
        time.sleep(0.001)
    stage = os.path.dirname(commit)
    pid = int(os.path.basename(stage).rsplit("-", 1)[1])
    os.kill(pid, signal.SIGSTOP)  # frozen where it is, somewhere in publishing
    try:
        killed = json.load(open(commit))["run"] if os.path.exists(commit) else None
        moved = os.path.join(server.model_dir, "segmentation", "train_01", "model.pt")
        best = os.path.join(stage, "model.pt")
        model = _sha(best if os.path.exists(best) else moved)
    finally:
        os.kill(pid, signal.SIGKILL)
    st = wait_status(lambda: requests.get(f"{server.url}/train/", timeout=30).json(), "training")
    assert st["status"] in ("ERROR", "DONE"), st
    if killed is None:
        pytest.skip("the run had published everything before it could be stopped")

    # the next run publishes the killed run's products before it starts; it is stopped itself
    n_checked = server.log().count("training data:")
    assert requests.post(f"{server.url}/train/segmentation", json={**TRAIN, "max_epochs": 1000},
                         timeout=60).status_code == 200
    t_end = time.time() + 300
    while server.log().count("training data:") == n_checked:
        assert time.time() < t_end, server.log()[-4000:]
        time.sleep(0.5)
    assert requests.delete(f"{server.url}/train/", timeout=30).json()["status"] == "STOPPED"
    time.sleep(2)
    assert "while its products were being published: publishing them now" in server.log()

    runs = store.get_setting("training_runs")
    assert [r["run_id"] for r in runs[n_runs:]] == [killed["run_id"]] and runs[-1]["status"] == "finished", runs[n_runs:]
    assert _sha(os.path.join(server.model_dir, "segmentation.pt")) == model
    ds = json.load(open(os.path.join(studies, "datastore_v2.json")))
    for r in runs[-1]["refurbished"]:
        assert r["refurbished"] == os.path.join(studies, "labels", "refurbished", f"{r['case']}.nii.gz")
        assert ds["objects"][r["case"]]["labels"]["refurbished"]["info"]["run_id"] == killed["run_id"]


def _restart_after_crash(server) -> None:
    """The server process alone killed (a crash, the OOM killer): its training process, if any, goes on
    without it; then the server is started again on the same studies and model folder."""
    import signal

    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    server.start()


def test_a_run_left_running_by_a_crashed_server_is_not_doubled_and_a_killed_publish_completes_at_restart(
        server, studies, store):
    """Found by crash testing: (1) after a crash of the server alone, MONAI Label no longer knew its training
    process, which went on; a new POST /train started a second run on the same model at the same time (200), and
    whichever ended last was published. Now it answers 429 naming the process. (2) A run killed while publishing
    was published only when a next run started: until then the server inferred with its model while no record
    showed it. Now the server publishes it when it starts."""
    import signal

    staging = os.path.join(server.model_dir, "segmentation", "staging")
    # (1) a long run, and the server crashes under it (the work areas a stopped run of another test left are not
    # this run's)
    old = set(glob.glob(os.path.join(staging, "*", "owner.json")))
    assert requests.post(f"{server.url}/train/segmentation", json={**TRAIN, "max_epochs": 1000},
                         timeout=60).status_code == 200
    t_end = time.time() + 300
    while not set(glob.glob(os.path.join(staging, "*", "owner.json"))) - old:
        assert time.time() < t_end, server.log()[-4000:]
        time.sleep(0.2)
    stage = os.path.dirname((set(glob.glob(os.path.join(staging, "*", "owner.json"))) - old).pop())
    pid = int(os.path.basename(stage).rsplit("-", 1)[1])
    try:
        # frozen first: an orphan may end on its own a moment later (writing to its dead server's pipe), or not;
        # frozen, it is a live process the whole time, as one that goes on training is
        os.kill(pid, signal.SIGSTOP)
        _restart_after_crash(server)
        os.kill(pid, 0)  # the run outlived its server
        r = requests.post(f"{server.url}/train/segmentation", json={**TRAIN, "max_epochs": 1}, timeout=60)
        assert r.status_code == 429 and f"process {pid}" in r.json()["detail"], (r.status_code, r.text)
        # and the project lead sees it (it said "no finished training run yet", nothing in progress)
        import subprocess
        import sys

        st = subprocess.run([sys.executable, "-m", "labelsentinel.cli", "status", "--server", server.url],
                            capture_output=True, text=True, timeout=120)
        assert st.returncode == 0 and f"training run is in progress in process {pid}" in st.stdout, st.stdout + st.stderr
        assert os.path.isdir(stage)  # its work area is left alone while it runs
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_end = time.time() + 30
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        assert time.time() < t_end
        time.sleep(0.2)

    # (2) a run killed while publishing (COMMITTED.json written, frozen, killed), then the server restarts
    n_runs = len(store.get_setting("training_runs") or [])
    assert requests.post(f"{server.url}/train/segmentation", json={**TRAIN, "max_epochs": 2},
                         timeout=60).status_code == 200
    t_end, commit = time.time() + 300, None
    while commit is None:  # watched closely: the run publishes within milliseconds of writing COMMITTED.json
        found = glob.glob(os.path.join(staging, "*", "COMMITTED.json"))
        if found:
            commit = found[0]
            break
        assert time.time() < t_end, f"no COMMITTED.json in {staging}:\n{server.log()[-2000:]}"
        time.sleep(0.001)
    stage = os.path.dirname(commit)
    pid = int(os.path.basename(stage).rsplit("-", 1)[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        killed = json.load(open(commit))["run"] if os.path.exists(commit) else None
        recorded = [r["run_id"] for r in store.get_setting("training_runs") or []]
    finally:
        os.kill(pid, signal.SIGKILL)
    if killed is None or killed["run_id"] in recorded:
        pytest.skip("the run had published everything before it could be stopped")
    _restart_after_crash(server)
    t_end = time.time() + 60
    while not [r for r in store.get_setting("training_runs") or [] if r["run_id"] == killed["run_id"]]:
        assert time.time() < t_end, f"not published at restart:\n{server.log()[-3000:]}"
        time.sleep(0.5)
    assert "while its products were being published: publishing them now" in server.log()
    runs = store.get_setting("training_runs")
    assert [r["run_id"] for r in runs[n_runs:]] == [killed["run_id"]] and runs[-1]["status"] == "finished"
    t_end = time.time() + 30
    while os.path.isdir(stage):
        assert time.time() < t_end, os.listdir(stage)
        time.sleep(0.2)
    # a run starts again
    _train(server, max_epochs=1)
