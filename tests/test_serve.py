"""`labelsentinel serve` (what `make run` calls) and the app itself on missing or empty studies folders."""

import os
import subprocess
import sys

import pytest
import requests

from conftest import Server


def _serve(*args):
    return subprocess.run(
        [sys.executable, "-m", "labelsentinel.cli", "serve", *args], capture_output=True, text=True, timeout=60
    )


def test_missing_studies_folder_is_a_clear_error(tmp_path):
    r = _serve("--studies", str(tmp_path / "nope"), "--port", "1")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "sample-data" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_empty_studies_folder_is_a_clear_error(tmp_path):
    r = _serve("--studies", str(tmp_path), "--port", "1")
    assert r.returncode == 2
    assert "holds no images" in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.server
def test_server_on_empty_folder_starts_and_says_why_nothing_is_served(tmp_path):
    studies = tmp_path / "empty"
    studies.mkdir()
    srv = Server(str(studies), str(tmp_path)).start()
    try:
        r = requests.post(f"{srv.url}/activelearning/random", json={}, timeout=30)
        assert r.status_code == 200 and not r.json().get("id"), r.text
        assert r.json()["reason"] == "nothing to serve: the datastore holds no images"
        assert "holds no images" in srv.log()
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


@pytest.mark.server
def test_kill_of_serve_stops_the_server_and_frees_the_port(tmp_path, studies_copy):
    """`make run` is `labelsentinel serve`: a plain kill (SIGTERM) of it stops the MONAI Label server it
    started, as Ctrl-C does (the server used to outlive it and keep the port), and the background task the
    server was running (here a training run; scoring and estimator fine-tuning run the same way), which used
    to go on without a server."""
    import signal
    import socket
    import time

    import psutil

    sample_studies = studies_copy

    from conftest import REPO, free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "labelsentinel.cli", "serve", "--studies", sample_studies, "--port",
                          str(port), "--conf", "model_dir", str(tmp_path / "model")], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        t_end = time.time() + 180
        while time.time() < t_end:
            try:
                if requests.get(f"http://127.0.0.1:{port}/info/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("server did not start")
        r = requests.post(f"http://127.0.0.1:{port}/train/segmentation", json={"max_epochs": 500, "val_split": 0},
                          timeout=30)
        assert r.status_code == 200, r.text
        t_end = time.time() + 60
        tasks = []
        while time.time() < t_end and not tasks:
            tasks = [c for c in psutil.Process(p.pid).children(recursive=True)
                     if "monailabel.interfaces.utils.app" in " ".join(c.cmdline())]
            time.sleep(0.5)
        assert tasks, "the training task did not start"
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        gone, alive = psutil.wait_procs(tasks, timeout=30)
        assert not alive, f"background task(s) still running after serve stopped: {[a.cmdline() for a in alive]}"
        t_end = time.time() + 30
        while time.time() < t_end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"port {port} still answers after the kill")
    finally:
        if p.poll() is None:
            p.kill()


def test_default_app_folder_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from labelsentinel.serve import resolve_app

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)
    assert resolve_app("apps/sentinel") == os.path.join(repo, "apps", "sentinel")
    (tmp_path / "apps" / "sentinel").mkdir(parents=True)
    assert resolve_app("apps/sentinel") == str(tmp_path / "apps" / "sentinel")  # a local one wins


def test_lead_commands_say_what_is_wrong_without_a_traceback():
    for args, words in ((("status", "--score"), "cannot reach"), (("plan", "--cases", "2"), "cannot reach"),
                        (("plan", "--cases", "2", "--cost-model", "{bad"), "--cost-model is not valid JSON"),
                        (("plan", "--minutes", "nan"), "--minutes must be a finite number")):
        r = subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args, "--server", "http://127.0.0.1:9"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


class _FakeServer:
    """A small HTTP server in a thread: answers GET/PUT from ``routes`` (path -> JSON) and records the requests."""

    def __init__(self, routes: dict):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                outer.requests.append((self.command, self.path, body))
                got = routes.get((self.command, self.path))
                data = json.dumps(got(body) if callable(got) else got).encode()
                self.send_response(200 if got is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _answer

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_port_in_use_is_a_clear_error_before_anything_starts(studies_copy, tmp_path):
    """Another server on the port: no banner from the other server's answer, no server started (it used to
    score the studies into its store first and then die with 'address already in use', rc 3, no error line)."""
    def snapshot():
        return {(os.path.relpath(os.path.join(root, f), studies_copy), os.stat(os.path.join(root, f)).st_mtime_ns)
                for root, _, files in os.walk(studies_copy) for f in files}

    before = snapshot()
    other = _FakeServer({("GET", "/info/"): {"name": "someone else's server", "models": {}, "strategies": {}}})
    try:
        r = _serve("--studies", studies_copy, "--port", str(other.port), "--conf", "model_dir", str(tmp_path / "m"))
    finally:
        other.stop()
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: port {other.port} on 127.0.0.1 is already in use (" in r.stderr
    assert "is up" not in r.stdout and "starting:" not in r.stdout and "Traceback" not in r.stderr
    assert snapshot() == before  # nothing scored into the store, no datastore written
    assert not os.path.exists(tmp_path / "m")

    # `make run-dicom` too: refused before Orthanc is started and the studies are loaded into it
    other = _FakeServer({("GET", "/info/"): {"name": "someone else's server", "models": {}, "strategies": {}}})
    try:
        from conftest import REPO

        r = subprocess.run([sys.executable, "-m", "labelsentinel.cli", "run-dicom", "--studies", studies_copy,
                            "--port", str(other.port), "--orthanc-dir", str(tmp_path / "orthanc")], cwd=REPO,
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    finally:
        other.stop()
    assert r.returncode == 2 and f"error: port {other.port} on 127.0.0.1 is already in use (" in r.stderr, r.stderr
    assert "Orthanc" not in r.stdout and not os.path.exists(tmp_path / "orthanc")


def test_readiness_wait_takes_only_our_servers_answer(tmp_path):
    """`serve` waits for /info/; an answer from another process on the port is not our server being up."""
    import time

    from conftest import free_port
    from labelsentinel.serve import wait_for_info

    other = _FakeServer({("GET", "/info/"): {"name": "other"}})
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # our server, still starting
        try:
            t0 = time.time()
            assert wait_for_info(other.url, 3, child) is None  # the port is the URL's (as `run-dicom` calls it)
            assert time.time() - t0 >= 2.5
        finally:
            child.kill()
            child.wait()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(3)"])
        t0 = time.time()
        assert wait_for_info(other.url, 30, child, other.port) is None  # it died: stop waiting at once
        assert time.time() - t0 < 10 and child.poll() == 3
    finally:
        other.stop()
    # Our own child answering is accepted.
    port = free_port()
    code = ("import http.server, json\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        d = json.dumps({'name': 'ours'}).encode()\n"
            "        self.send_response(200); self.send_header('Content-Length', str(len(d))); self.end_headers()\n"
            "        self.wfile.write(d)\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert wait_for_info(f"http://127.0.0.1:{port}", 30, child, port) == {"name": "ours"}
    finally:
        child.kill()
        child.wait()


def _lead(*args):
    return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args], capture_output=True, text=True, timeout=60)


def _plan(budget_cases, budget_minutes):
    return {"budget_cases": budget_cases, "budget_minutes": budget_minutes, "planned_minutes": 21.5,
            "method": "exact dynamic programming", "dataset_dice_before": 0.8, "dataset_dice_after": 0.9,
            "cases": [{"case_id": "case_001", "gain": 0.05, "minutes": 10.5},
                      {"case_id": "case_002", "gain": 0.04, "minutes": 11.0}]}


def test_plan_shows_only_the_limits_that_apply_and_both_when_both_are_set():
    status = {"budget_cases": 6, "budget_minutes": None, "used_cases": 2, "used_minutes": 21.5, "planned_cases": 2,
              "left_cases": 4, "left_minutes": None}
    srv = _FakeServer({("GET", "/labelsentinel/budget"): {"plan": _plan(6, None), "status": status},
                       ("PUT", "/labelsentinel/budget"): lambda body: _plan(body["cases"], body["minutes"])})
    try:
        r = _lead("plan", "--server", srv.url)
        assert r.returncode == 0, r.stderr
        assert "None" not in r.stdout and "left: 4 case(s)" in r.stdout and "budget 6 cases:" in r.stdout, r.stdout
        r = _lead("plan", "--server", srv.url, "--minutes", "60", "--cases", "2")
        assert r.returncode == 0, r.stderr
        assert [x for x in srv.requests if x[0] == "PUT"][-1] == ("PUT", "/labelsentinel/budget", {"cases": 2, "minutes": 60.0})
        assert "budget 2 cases and 60 minutes:" in r.stdout, r.stdout  # the plan keeps within both
    finally:
        srv.stop()


def test_plan_refuses_an_unknown_cost_model_key_naming_the_known_ones():
    srv = _FakeServer({("PUT", "/labelsentinel/budget"): lambda body: _plan(body["cases"], None)})
    try:
        for model, words in (('{"bogus": 1}', "unknown key(s) 'bogus'"), ("[1, 2]", "must be a JSON object"),
                             ('{"base_minutes": -1}', "base_minutes must be a finite number")):
            r = _lead("plan", "--server", srv.url, "--cases", "2", "--cost-model", model)
            assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (model, r.stderr)
            assert "base_minutes" in r.stderr
        assert not srv.requests  # refused before anything was sent
        r = _lead("plan", "--server", srv.url, "--cases", "2", "--cost-model", '{"base_minutes": 3}')
        puts = [x for x in srv.requests if x[0] == "PUT"]
        assert r.returncode == 0 and puts[-1][2]["cost_model"] == {"base_minutes": 3}, r.stderr
    finally:
        srv.stop()


def test_lead_commands_against_a_server_that_is_not_label_sentinel(tmp_path):
    """A MONAI Label server running another app (no /labelsentinel routes), a web server answering HTML, and a
    report folder that is a file: each is an `error:` line saying what is wrong, not a raw page or a traceback."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args], capture_output=True, text=True,
                              timeout=60)

    other_app = _FakeServer({("GET", "/info/"): {"name": "radiology", "models": {}, "strategies": {}}})
    try:
        for args in (("status",), ("plan",), ("report", "--out", str(tmp_path / "r"))):
            r = cli(*args, "--server", other_app.url)
            assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
            assert "has no Label Sentinel routes" in r.stderr and "--app apps/sentinel" in r.stderr, (args, r.stderr)
    finally:
        other_app.stop()

    class Html(BaseHTTPRequestHandler):
        def do_GET(self):
            data = b"<html><head><title>Welcome to nginx!</title></head><body>" + b"x" * 2000 + b"</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = cli("status", "--server", f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r.returncode == 2 and "did not answer JSON (content type 'text/html')" in r.stderr, r.stderr
    assert "xxxx" not in r.stderr and "Traceback" not in r.stderr

    (tmp_path / "afile").write_text("keep me")
    r = cli("report", "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "afile"))
    assert r.returncode == 2 and "is a file; give a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "afile").read_text() == "keep me"


def test_lead_status_says_when_the_last_training_run_failed_or_skipped_pairs():
    from labelsentinel.lead import _training_summary, _training_text

    run = {"ts": 1.7e9, "device": "cpu", "finals": 3, "pseudo_labels": [], "refurbished": [], "status": "failed",
           "error": "RuntimeError: no usable final labels to train on",
           "refused": [{"case": "case_003", "source": "final", "error": "EOFError: Compressed file ended"}]}
    text = _training_text(_training_summary({"training": {"runs": 2, "last": run, "suspects": []}}))
    assert "FAILED: RuntimeError: no usable final labels to train on" in text and "3 final label(s)" not in text
    assert "skipped 1 unusable pair(s): case_003 (final: EOFError: Compressed file ended)" in text
    run.update(status="finished", error=None, refused=[])
    text = _training_text(_training_summary({"training": {"runs": 2, "last": run, "suspects": []}}))
    assert "FAILED" not in text and "3 final label(s)" in text and "skipped" not in text
    del run["status"]  # a run recorded before runs said how they ended
    assert "3 final label(s)" in _training_text(_training_summary({"training": {"runs": 1, "last": run}}))


def test_lead_status_says_which_run_flagged_the_suspects_and_which_were_reviewed():
    import time

    from labelsentinel.lead import _training_summary, _training_text

    run = {"run_id": "r2", "ts": 1.7e9 + 3600, "device": "cpu", "finals": 3, "status": "finished"}
    training = {"runs": 2, "last": run, "suspects": [{"case": "case_001", "loss_z": 2.4}],
                "reviewed_suspects": [{"case": "case_003", "loss_z": 3.0}],
                "signals_run": {"run_id": "r1", "ts": 1.7e9}, "suspects_from_last_run": False}
    text = _training_text(_training_summary({"training": training}))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(1.7e9))
    assert f"flagged as suspect by the run of {when} (loss z >= 2): case_001 (2.4)" in text, text
    assert "(1 flagged and reviewed since: case_003)" in text and "case_003 (3.0)" not in text
    training.update(suspects_from_last_run=True, signals_run={"run_id": "r2", "ts": run["ts"]})
    assert "by the run of" not in _training_text(_training_summary({"training": training}))
