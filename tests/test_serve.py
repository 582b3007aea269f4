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
def test_kill_of_serve_stops_the_server_and_frees_the_port(tmp_path, sample_studies):
    """`make run` is `labelsentinel serve`: a plain kill (SIGTERM) of it stops the MONAI Label server it
    started, as Ctrl-C does (the server used to outlive it and keep the port)."""
    import signal
    import socket
    import time

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
        p.send_signal(signal.SIGTERM)
        p.wait(60)
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
