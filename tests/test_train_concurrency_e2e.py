"""Training runs on the real server: simultaneous train requests start one run, and a run stopped with
DELETE /train leaves the files of the last run that ended as they were."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import requests

from conftest import Server, wait_status

pytestmark = pytest.mark.server
TRAIN = {"pseudo_labels": "none", "val_split": 0.0, "tracking": "None", "label_errors": False}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("tc") / "studies")
    generate(d, cases=4, seed=0, real_ct=False, progress=False)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    srv = Server(studies, str(tmp_path_factory.mktemp("tcs")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    yield srv
    srv.stop()


def _tasks(url) -> list[dict]:
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=30)
    return r.json() if r.status_code == 200 else []


def _stop_all(url, timeout=120) -> None:
    """DELETE /train until no run is running or queued (a queued run starts when the one before is stopped)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if not any(t["status"] in ("SUBMITTED", "RUNNING") for t in _tasks(url)):
            return
        if requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 200:
            requests.delete(f"{url}/train/", timeout=30)
        time.sleep(0.5)
    raise AssertionError(f"training runs still under way after {timeout} s: {_tasks(url)}")


def _post_train(url, params: dict, **query) -> requests.Response:
    return requests.post(f"{url}/train/segmentation", params=query, json=params, timeout=60)


def test_simultaneous_train_requests_start_one_run(server):
    n_before = len(_tasks(server.url))
    n = 5
    go = threading.Barrier(n)
    codes: list = []

    def send():
        with requests.Session() as s:  # connected before, so that the requests arrive together
            s.get(f"{server.url}/info/", timeout=60)
            go.wait()
            codes.append(s.post(f"{server.url}/train/segmentation", json={**TRAIN, "max_epochs": 1000}, timeout=60))

    threads = [threading.Thread(target=send) for _ in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        answers = sorted(r.status_code for r in codes)
        new = _tasks(server.url)[n_before:]
        assert answers == [200] + [429] * (n - 1), [(r.status_code, r.text[:200]) for r in codes]
        assert all("Already Running" in r.json()["detail"] for r in codes if r.status_code == 429)
        assert len(new) == 1 and new[0]["status"] in ("SUBMITTED", "RUNNING"), new
        # a later request: refused too, and enqueue=true still queues behind the run, as in MONAI Label
        assert _post_train(server.url, {**TRAIN, "max_epochs": 1000}).status_code == 429
        queued = _post_train(server.url, {**TRAIN, "max_epochs": 1000}, enqueue="true")
        assert queued.status_code == 200 and queued.json()["status"] == "SUBMITTED", queued.text
        assert len(_tasks(server.url)[n_before:]) == 2
    finally:
        _stop_all(server.url)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_stopped_run_leaves_the_files_of_the_last_run_that_ended(server, store):
    folder = os.path.join(server.model_dir, "segmentation")
    data, refused = os.path.join(folder, "train_data.json"), os.path.join(folder, "train_refused.json")
    assert _post_train(server.url, {**TRAIN, "max_epochs": 1}).status_code == 200
    st = wait_status(lambda: requests.get(f"{server.url}/train/", timeout=30).json(), "training")
    assert st["status"] == "DONE", server.log()[-4000:]
    last = store.get_setting("training_runs")[-1]
    finished = json.loads(_read(data))
    assert finished["status"] == "finished" and finished["run_id"] == last["run_id"] and "ended" in finished
    assert json.loads(_read(refused))["run_id"] == last["run_id"]
    before = {p: _read(p) for p in (data, refused)}
    n_runs = len(store.get_setting("training_runs"))

    # a long run, stopped once its data are checked and chosen (where the old trainer wrote both files)
    n_checked = server.log().count("training data:")
    assert _post_train(server.url, {**TRAIN, "max_epochs": 1000}).status_code == 200
    t_end = time.time() + 300
    while server.log().count("training data:") == n_checked:
        assert time.time() < t_end, server.log()[-4000:]
        time.sleep(0.5)
    time.sleep(1)
    stopped = requests.delete(f"{server.url}/train/", timeout=30).json()
    assert stopped["status"] == "STOPPED", stopped
    _stop_all(server.url)

    after = {p: _read(p) for p in (data, refused)}
    assert after == before, {os.path.basename(p): after[p][:300] for p in after}
    assert len(store.get_setting("training_runs")) == n_runs
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
