"""Shared fixtures: generated sample studies and a real `monailabel start_server` process on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "sentinel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real MONAI Label server process running the Label Sentinel app."""

    def __init__(self, studies: str, workdir: str, conf: dict | None = None, env: dict | None = None,
                 app: str = APP):
        self.app = app
        self.studies = studies
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"server-{self.port}.log")
        self.model_dir = os.path.join(workdir, "model")
        self.conf = {"model_dir": self.model_dir, **(conf or {})}
        self.env = env or {}
        self.proc = None

    def start(self, timeout: float = 180) -> "Server":
        from labelsentinel.serve import server_command, server_env

        cmd = server_command(self.app, self.studies, "127.0.0.1", self.port, [[k, str(v)] for k, v in self.conf.items()])
        env = server_env(self.app)
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    self.startup_seconds = time.time() - t0
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer /info/ in {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def wait_status(fn, what, timeout=600) -> dict:
    """Poll ``fn()`` (a task status: /scoring/, /train/) until it is DONE or ERROR."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        st = fn()
        if st.get("status") in ("DONE", "ERROR"):
            return st
        time.sleep(1)
    raise AssertionError(f"{what} did not finish in {timeout} s")


def run_scoring(url, timeout=600) -> dict:
    """Start `/scoring/quality` (or join the run under way) and wait for it to end; its final status."""
    r = requests.post(f"{url}/scoring/quality", timeout=30)
    assert r.status_code in (200, 429), r.text
    return wait_status(lambda: requests.get(f"{url}/scoring/", timeout=30).json(), "scoring", timeout)


@pytest.fixture(scope="module")
def store(studies):
    """The record store of the module's ``studies`` folder."""
    from labelsentinel.store import Store, store_path

    return Store(store_path(studies))


@pytest.fixture(scope="session")
def sample_studies(tmp_path_factory):
    """A freshly generated sample studies folder (4 phantoms + the real CT); tests copy it before changing it."""
    from labelsentinel.sampledata import generate

    out = str(tmp_path_factory.mktemp("studies-src"))
    generate(out, cases=4, seed=0, progress=False)
    return out


@pytest.fixture
def studies_copy(sample_studies, tmp_path):
    dst = str(tmp_path / "studies")
    shutil.copytree(sample_studies, dst)
    return dst


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}; repo {REPO}"


CHROMIUM = "/usr/bin/chromium"
# As root in a container Chromium needs --no-sandbox; the rest keeps it off the network (this machine's closed
# network refuses Google's update, sync and font hosts) and on software rendering.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader"]


def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing (CI machines are fresh); playwright drives it."""
    if os.path.isfile(CHROMIUM):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run([apt, "update"], env=env, capture_output=True)
        r = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isfile(CHROMIUM):
        pytest.fail(f"apt-get install chromium failed ({r.returncode}): {r.stderr[-500:]}")
    return CHROMIUM
