"""Two defects of the project lead's CLI, against a real server over 6 demo studies (ports 8740-8749):

- ``labelsentinel plan`` read the plan it replaces with a GET and then sent the PUT: another lead (or a script)
  replacing the plan in between made it report, and replace, a plan that was already gone. The PUT now replaces
  the plan under a lock in the server and answers with the plan it replaced; with ``expected_plan_ts`` it
  replaces only that plan (HTTP 409 otherwise).
- ``labelsentinel report --out DIR`` into a folder it wrote before left files of the earlier report the new one
  does not write (``groups.csv``), so the folder mixed two reports.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import requests

from conftest import Server, run_scoring

pytestmark = pytest.mark.server


def _port() -> int:
    for p in range(8740, 8750):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port in 8740-8749")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("leadfix") / "studies")
    generate(d, cases=6, seed=0, real_ct=False, progress=False)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("leadfix-server"))
    srv = Server(studies, work, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.port = _port()
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv.log_path = os.path.join(work, f"server-{srv.port}.log")
    srv.start()
    st = run_scoring(srv.url)
    assert st["status"] == "DONE", st
    yield srv
    srv.stop()


def _cli(server, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args, "--server", server.url],
                          capture_output=True, text=True, timeout=timeout)


def _put(server, body):
    return requests.put(f"{server.url}/labelsentinel/budget", json=body, timeout=120)


def _current(server):
    return requests.get(f"{server.url}/labelsentinel/budget", timeout=30).json()["plan"]


# ------------------------------------------------------------------------------------------- plan: atomic PUT
def test_simultaneous_puts_each_answer_the_plan_they_replaced(server):
    """Eight PUTs at once: each answers the plan it replaced, and those form one chain (every plan replaced
    exactly once, the last one current), which only holds when the read and the write are one step."""
    first = _put(server, {"cases": 1}).json()
    answers: list = [None] * 8
    go = threading.Barrier(len(answers))

    def put(i):
        go.wait()
        answers[i] = _put(server, {"cases": 2 + i % 3})

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(a is not None and a.status_code == 200 for a in answers), [a and a.text[:200] for a in answers]
    got = [a.json() for a in answers]
    assert all("replaced_plan" in g for g in got), sorted(got[0])
    replaced = [g["replaced_plan"]["ts"] for g in got]
    made = {g["ts"]: g for g in got}
    assert len(set(replaced)) == len(replaced), replaced  # no plan was replaced twice
    assert set(replaced) | {_current(server)["ts"]} == set(made) | {first["ts"]}
    for g in got:  # what an answer says it replaced is that plan's budget
        old = made.get(g["replaced_plan"]["ts"], first)
        assert g["replaced_plan"]["budget_cases"] == old["budget_cases"], (g["replaced_plan"], old["budget_cases"])
        assert g["replaced_plan"]["planned_cases"] == len(old["cases"])
        assert g["budget_status"]["budget_cases"] == g["budget_cases"]


def test_put_with_expected_plan_replaces_only_that_plan(server):
    plan = _put(server, {"cases": 2}).json()  # no expected_plan_ts: replaces whatever is there, as before
    newer = _put(server, {"cases": 3, "expected_plan_ts": plan["ts"]})
    assert newer.status_code == 200, newer.text
    assert newer.json()["replaced_plan"]["ts"] == plan["ts"]
    # a plan read before `newer` replaced it: refused, nothing changed
    stale = _put(server, {"cases": 4, "expected_plan_ts": plan["ts"]})
    assert stale.status_code == 409, (stale.status_code, stale.text[:300])
    detail = stale.json()["detail"]
    assert "replaced since" in detail and "nothing was changed" in detail, detail
    assert _current(server)["ts"] == newer.json()["ts"]
    # null: replace only when no plan is set
    assert _put(server, {"cases": 4, "expected_plan_ts": None}).status_code == 409
    bad = _put(server, {"cases": 4, "expected_plan_ts": "yesterday"})
    assert bad.status_code == 422 and "expected_plan_ts" in bad.json()["detail"], bad.text
    assert _current(server)["ts"] == newer.json()["ts"]


def test_plan_says_what_it_replaced_from_the_puts_answer(server, monkeypatch, capsys):
    """Another lead's plan lands between the CLI's start and its PUT: the CLI says it replaced that plan (budget
    4), not the one it could have read before (budget 3)."""
    from labelsentinel.cli import main

    assert _put(server, {"cases": 3}).status_code == 200
    real_put = requests.put
    other = {}

    def put_after_another_lead(url, *a, **kw):
        if url.endswith("/labelsentinel/budget") and not other:
            other.update(real_put(url, json={"cases": 4}, timeout=120).json())
        return real_put(url, *a, **kw)

    monkeypatch.setattr(requests, "put", put_after_another_lead)
    assert main(["plan", "--server", server.url, "--cases", "5"]) == 0
    out = capsys.readouterr().out
    assert other["budget_cases"] == 4
    assert "replacing the plan of " in out and "(budget 4 cases), which had used 0 of " in out, out
    assert "(budget 3 cases)" not in out, out
    assert main(["plan", "--server", server.url, "--cases", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["budget_cases"] == 2 and d["replaced_plan"]["budget_cases"] == 5
    assert d["budget_status"]["budget_cases"] == 2


def test_plan_expect_plan_refuses_when_the_plan_changed(server):
    current = _current(server)
    r = _cli(server, "plan", "--cases", "3", "--expect-plan", f"{current['ts']:.6f}")
    assert r.returncode == 0, r.stderr
    assert "replacing the plan of " in r.stdout, r.stdout
    r = _cli(server, "plan", "--cases", "4", "--expect-plan", f"{current['ts']:.6f}")  # replaced by the run above
    assert r.returncode == 2 and "error: " in r.stderr and "replaced since" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _current(server)["budget_cases"] == 3


# ------------------------------------------------------------------------------------ report: one report a folder
def test_report_into_a_used_folder_leaves_only_this_reports_files(server, tmp_path):
    """Runs last: it deletes the pseudo-labels (no scored label, so no patient groups and no groups.csv)."""
    from labelsentinel import lead

    manifest = getattr(lead, "REPORT_MANIFEST", ".labelsentinel-report.json")
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("the lead's own notes\n")
    r = _cli(server, "report", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "groups.csv").is_file()
    legacy, edited, foreign = tmp_path / "legacy", tmp_path / "edited", tmp_path / "foreign"
    shutil.copytree(out, legacy)
    if (legacy / manifest).exists():  # as an earlier version of the command left it
        os.remove(legacy / manifest)
    shutil.copytree(out, edited)
    with open(edited / "groups.csv", "a") as f:
        f.write("sex,my own row,1,0.5,0\n")
    foreign.mkdir()
    (foreign / "groups.csv").write_text("team,members\nlead,1\n")  # not a report's

    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()
    for image in sorted({x["image_id"] for x in q["records"] if x["tag"] == "original"}):
        d = requests.delete(f"{server.url}/datastore/label", params={"id": image, "tag": "original"}, timeout=30)
        assert d.status_code == 200, d.text
    assert not requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()["records"]

    r = _cli(server, "report", "--out", str(out))
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)
    assert "groups.csv" not in paths
    assert not (out / "groups.csv").exists(), "groups.csv of the earlier report survived"
    assert f"removed from {out}" in r.stderr and "groups.csv" in r.stderr, r.stderr
    assert (out / "notes.txt").read_text() == "the lead's own notes\n"  # not the command's: kept
    page = (out / "report.html").read_text()
    assert "groups.csv" not in page.split("<p>CSV: ", 1)[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", manifest, *paths]), list(out.iterdir())
    with open(out / manifest) as f:
        assert sorted(json.load(f)["files"]) == sorted(paths)

    r = _cli(server, "report", "--out", str(legacy))  # an earlier version's report: its groups.csv is ours
    assert r.returncode == 0 and not (legacy / "groups.csv").exists() and "groups.csv" in r.stderr, r.stderr
    r = _cli(server, "report", "--out", str(edited))  # changed since the command wrote it: kept, and said
    assert r.returncode == 0 and (edited / "groups.csv").read_text().endswith("sex,my own row,1,0.5,0\n")
    assert "kept" in r.stderr and "groups.csv" in r.stderr, r.stderr
    r = _cli(server, "report", "--out", str(foreign))  # never written by the command
    assert r.returncode == 0 and (foreign / "groups.csv").read_text() == "team,members\nlead,1\n"
    assert "groups.csv" not in r.stderr, r.stderr
    rows = list(csv.DictReader(open(foreign / "structures.csv")))
    assert rows == []
