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
        assert r.status_code == 200 and r.json() == {}
        assert "holds no images" in srv.log()
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()
