"""A private Orthanc PACS with its DICOMweb plugin, for demos (``make run-dicom``) and tests.

Orthanc runs as a child process from a generated JSON configuration: loopback only
(``RemoteAccessAllowed: false``), free HTTP and DICOM ports, storage in a folder of our own, no
authentication, the DICOMweb plugin of Debian's ``orthanc-dicomweb`` package. The Debian service (port
8042) is never used.

    with Orthanc() as pacs:            # or pacs = Orthanc().start(); ...; pacs.stop()
        print(pacs.dicomweb_url)       # http://127.0.0.1:PORT/dicom-web
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import requests

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)


class OrthancError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be listened on now (SO_REUSEADDR: a port in TIME_WAIT counts as free)."""
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(port)))
            s.listen(1)
        return True
    except (OSError, ValueError, OverflowError):
        return False


def saved_ports(workdir: str) -> tuple[int | None, int | None]:
    """(HTTP port, DICOM port) of the Orthanc that last ran in ``workdir`` (its ``orthanc.json``), else Nones."""
    try:
        with open(os.path.join(workdir, "orthanc.json")) as f:
            conf = json.load(f)
        return int(conf["HttpPort"]), int(conf["DicomPort"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def dicomweb_plugin() -> str | None:
    return next((p for p in DICOMWEB_PLUGIN_CANDIDATES if os.path.isfile(p)), None)


def ensure_orthanc_installed(quiet: bool = True) -> str:
    """Return the Orthanc binary, installing the Debian packages ``orthanc`` and ``orthanc-dicomweb`` if missing.

    The package's service is stopped if apt started it (our Orthanc runs on its own ports and never uses it).
    Raises OrthancError with what to do when it cannot be installed.
    """
    if os.path.isfile(ORTHANC_BIN) and dicomweb_plugin():
        return ORTHANC_BIN
    apt = shutil.which("apt-get")
    if not apt:
        raise OrthancError(f"{ORTHANC_BIN} or its DICOMweb plugin is missing and apt-get is not available: "
                           "install Orthanc and its DICOMweb plugin (Debian/Ubuntu: `apt-get install orthanc "
                           "orthanc-dicomweb`) or point the server at your own DICOMweb PACS")
    if os.geteuid() != 0:
        raise OrthancError(f"{ORTHANC_BIN} or its DICOMweb plugin is missing: run `sudo apt-get install -y orthanc "
                           "orthanc-dicomweb` (installing needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.DEVNULL if quiet else None
    r = subprocess.run([apt, "install", "-y", "orthanc", "orthanc-dicomweb"], env=env, stdout=out, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        # The package lists may be missing (fresh container): update once and retry.
        subprocess.run([apt, "update"], env=env, stdout=out, stderr=subprocess.DEVNULL)
        r = subprocess.run([apt, "install", "-y", "orthanc", "orthanc-dicomweb"], env=env, stdout=out,
                           stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or not os.path.isfile(ORTHANC_BIN) or not dicomweb_plugin():
        raise OrthancError(f"installing orthanc and orthanc-dicomweb with apt-get failed (exit {r.returncode}): "
                           f"{(r.stderr or '').strip()[-500:]}")
    stop_debian_service()
    return ORTHANC_BIN


def stop_debian_service() -> None:
    """Stop the Debian ``orthanc`` service if it runs (it would hold port 8042); errors are ignored."""
    for cmd in (["service", "orthanc", "stop"], ["systemctl", "stop", "orthanc"]):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Orthanc:
    """An Orthanc process with DICOMweb on 127.0.0.1, storage under ``workdir`` (a temporary folder by default).

    Ports: those given, else, in a ``workdir`` an Orthanc ran in before, the ports it used then when they are
    free (its DICOMweb address stays the same across restarts: MONAI Label's DICOMweb cache, where the
    pseudo-labels live, is named after that address), else free ones. ``self.reused_ports`` says which.
    ``users`` ({name: password}) turns on HTTP basic authentication; ``extra`` is merged into the configuration
    (e.g. ``{"LimitFindResults": 100}``).
    """

    def __init__(self, workdir: str | None = None, http_port: int | None = None, dicom_port: int | None = None,
                 name: str = "LabelSentinel", users: dict[str, str] | None = None, extra: dict | None = None):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="labelsentinel-orthanc-")
            workdir = self._tmp
        self.workdir = os.path.abspath(workdir)
        old_http, old_dicom = saved_ports(self.workdir) if self._tmp is None else (None, None)
        self.reused_ports = False
        if not http_port and old_http and port_is_free(old_http):
            http_port, self.reused_ports = old_http, True
        if not dicom_port and old_dicom and old_dicom != http_port and port_is_free(old_dicom):
            dicom_port = old_dicom
        self.previous_http_port = old_http
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.name = name
        self.users = dict(users or {})
        self.extra = dict(extra or {})
        self.proc: subprocess.Popen | None = None
        self.config_path = os.path.join(self.workdir, "orthanc.json")
        self.log_path = os.path.join(self.workdir, "orthanc.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        plugin = dicomweb_plugin()
        if not plugin:
            raise OrthancError("the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) is missing: "
                               "apt-get install orthanc-dicomweb (or call ensure_orthanc_installed())")
        storage = os.path.join(self.workdir, "storage")
        return {
            "Name": self.name,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            **({"RegisteredUsers": self.users} if self.users else {}),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "SENTINELPACS",
            "Plugins": [plugin],
            "StableAge": 1,
            "OverwriteInstances": True,
            "HttpTimeout": 60,
            # Host: the address written into RetrieveURL (OHIF's Next Sample dialog links to it).
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Host": f"127.0.0.1:{self.http_port}",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            **self.extra,
        }

    def start(self, timeout: float = 60) -> "Orthanc":
        if not os.path.isfile(ORTHANC_BIN):
            raise OrthancError(f"{ORTHANC_BIN} not found: apt-get install orthanc orthanc-dicomweb "
                               "(or call labelsentinel.orthanc.ensure_orthanc_installed())")
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(self.config(), f, indent=1)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([ORTHANC_BIN, self.config_path], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                self._close_log()
                raise OrthancError(f"Orthanc exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self.alive():
                return self
            time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer {self.url}/system in {timeout:.0f} s:\n{self.log()[-3000:]}")

    @property
    def auth(self):
        """(user, password) of the first registered user, for requests; None without authentication."""
        return next(iter(self.users.items()), None)

    def alive(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", timeout=2, auth=self.auth).status_code == 200
        except requests.RequestException:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _close_log(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def stop(self, remove: bool = True) -> None:
        """Stop the process; a temporary work folder (ours) is removed unless ``remove`` is false."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        if remove and self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # A few REST helpers (Orthanc's own API, not DICOMweb).
    def series(self) -> list[dict]:
        """MainDicomTags of every series stored (SeriesInstanceUID, Modality, ...)."""
        r = requests.get(f"{self.url}/series", params={"expand": ""}, timeout=60, auth=self.auth)
        r.raise_for_status()
        return [{**s["MainDicomTags"], "ParentStudy": s["ParentStudy"]} for s in r.json()]

    def upload_file(self, path_or_bytes) -> dict:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer (ID, Status, ParentSeries ...)."""
        data = path_or_bytes
        if isinstance(path_or_bytes, str):
            with open(path_or_bytes, "rb") as f:
                data = f.read()
        r = requests.post(f"{self.url}/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=60,
                          auth=self.auth)
        if r.status_code != 200:
            raise OrthancError(f"Orthanc refused the instance: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()
