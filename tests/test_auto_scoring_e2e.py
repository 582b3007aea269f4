"""MONAI Label's automatic scoring (on by default) on the real server: next samples served while a scoring run is
under way queue at most one more run, and a lead's POST /scoring/quality still runs."""

from __future__ import annotations

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
