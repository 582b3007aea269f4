"""MONAI Label's automatic scoring (on by default) on the real server: next samples served while a scoring run is
under way queue at most one more run, and a lead's POST /scoring/quality still runs."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import Server, run_scoring, wait_status

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("as") / "studies")
    generate(d, cases=10, seed=1, real_ct=False, progress=False)  # 3 final labels, 7 cases to serve
    srv = Server(d, str(tmp_path_factory.mktemp("ass")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}).start()
    yield srv
    srv.stop()


def _tasks(url) -> list[dict]:
    return requests.get(f"{url}/scoring/", params={"all": "true"}, timeout=30).json()


def test_next_samples_queue_at_most_one_automatic_scoring(server):
    status = lambda: requests.get(f"{server.url}/scoring/", timeout=30).json()  # noqa: E731
    assert wait_status(status, "start-up scoring")["status"] == "DONE", server.log()[-4000:]
    n_before = len(_tasks(server.url))
    served = []
    for i in range(6):  # each served case asks for a scoring run; the first one runs for seconds
        r = requests.post(f"{server.url}/activelearning/random", json={"client_id": f"ann-{i}"}, timeout=60)
        assert r.status_code == 200, r.text
        served.append(r.json()["id"])
        assert sum(t["status"] == "SUBMITTED" for t in _tasks(server.url)) <= 1
    assert all(served) and len(set(served)) == 6, served
    new = _tasks(server.url)[n_before:]
    assert 1 <= len(new) <= 2, [t["status"] for t in new]
    assert wait_status(status, "automatic scoring")["status"] == "DONE", server.log()[-4000:]
    assert len(_tasks(server.url)) == n_before + len(new)  # nothing else queued

    # a lead's explicit scoring runs as before
    st = run_scoring(server.url)
    tasks = _tasks(server.url)
    assert st["status"] == "DONE" and len(tasks) == n_before + len(new) + 1, (st, [t["status"] for t in tasks])


def test_scoring_requested_while_one_runs_is_queued_once_not_refused(server):
    """A request while a run is under way (the scoring a background training run asks for when it ends, a lead's)
    was refused with 429 and dropped; simultaneous requests could each start a run. Now the first starts a run,
    the others made meanwhile join one run queued behind it."""
    from concurrent.futures import ThreadPoolExecutor

    status = lambda: requests.get(f"{server.url}/scoring/", timeout=30).json()  # noqa: E731
    wait_status(status, "earlier scoring")
    n_before = len(_tasks(server.url))
    first = requests.post(f"{server.url}/scoring/quality", timeout=30)
    assert first.status_code == 200, first.text
    with ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(lambda _: requests.post(f"{server.url}/scoring/quality", timeout=30), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [(a.status_code, a.text[:200]) for a in answers]
    ids = {a.json()["id"] for a in answers}
    new = _tasks(server.url)[n_before:]
    # at most one run waits behind the first: a request arriving before the first run started joins it (it reads
    # the datastore when it starts), the others join the one run queued behind it
    assert len(new) <= 2 and new[0]["id"] == first.json()["id"] and ids <= {t["id"] for t in new}, (
        ids, [(t["id"], t["status"]) for t in new])
    t_end = time.time() + 300
    while any(t["status"] in ("SUBMITTED", "RUNNING") for t in _tasks(server.url)):
        assert time.time() < t_end, "scoring did not finish"
        time.sleep(1)
    assert [t["status"] for t in _tasks(server.url)[n_before:]] == ["DONE"] * len(new)
