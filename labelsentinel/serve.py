"""``labelsentinel serve``: check the studies folder, start ``monailabel start_server`` and print where to connect.

It is what ``make run`` calls. It runs the real MONAI Label server (``monailabel start_server --app ...``) as a
child process, waits for ``/info/`` and prints the URLs for OHIF and 3D Slicer; Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import errno
import glob
import os
import signal
import socket
import subprocess
import sys
import time

IMAGE_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd")


class StudiesError(Exception):
    pass


def check_studies(studies: str, allow_empty: bool = False) -> list[str]:
    """Return the image files of a local studies folder, or raise StudiesError with a clear message."""
    if studies.startswith("http://") or studies.startswith("https://"):
        return []  # a DICOMweb server; MONAI Label checks it
    if not os.path.exists(studies):
        raise StudiesError(
            f"studies folder {studies!r} does not exist. Create it with "
            f"`labelsentinel sample-data --out {studies}` or point --studies at a folder of .nii.gz images."
        )
    if not os.path.isdir(studies):
        raise StudiesError(f"studies path {studies!r} is not a folder")
    images = sorted(f for p in IMAGE_PATTERNS for f in glob.glob(os.path.join(studies, p)))
    if not images and not allow_empty:
        raise StudiesError(
            f"studies folder {studies!r} holds no images ({', '.join(IMAGE_PATTERNS)}). "
            f"Put your images there, or create demo studies with `labelsentinel sample-data --out {studies}` "
            "(or pass --allow-empty to start anyway and upload images through the API)."
        )
    return images


def server_command(app: str, studies: str, host: str, port: int, conf: list[list[str]]) -> list[str]:
    # The `monailabel` script runs whatever `python` is first on PATH; call this interpreter's module instead.
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies, "--host", host, "--port", str(port)]
    for k, v in conf:
        cmd += ["--conf", k, v]
    return cmd


def resolve_app(app: str) -> str:
    """The app folder as given if it exists, else relative to this repository (``--app apps/sentinel``, the
    default, works from any working directory)."""
    if os.path.isdir(app):
        return os.path.abspath(app)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    alt = os.path.join(repo, app)
    return alt if not os.path.isabs(app) and os.path.isdir(alt) else os.path.abspath(app)


def server_env(app: str) -> dict:
    """Environment for the server: background tasks (scoring, training) are subprocesses that need PYTHONPATH."""
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in (repo, os.path.abspath(app)):
        if p not in parts:
            parts.append(p)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    bindir = os.path.dirname(sys.executable)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (in use, not allowed), or None when it can.

    Binds a probe socket the way the server will (every address ``host`` resolves to, SO_REUSEADDR as uvicorn
    sets it, so a port left in TIME_WAIT by a server just stopped counts as free) and closes it at once."""
    if not 1 <= port <= 65535:
        return f"port must be a number from 1 to 65535, got {port}"
    try:
        addrs = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        return f"cannot resolve host {host!r} ({e})"
    for family, type_, proto, _, addr in addrs:
        try:
            with socket.socket(family, type_, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
                s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use ({e.strerror or e}): another server listens "
                        f"there; stop it or choose another port (--port, or `make run PORT=...`)")
            return f"cannot listen on port {port} on {host} ({e.strerror or e})"
    return None


def _listens_on(proc: subprocess.Popen, port: int) -> bool | None:
    """Whether ``proc`` (or a process it started) listens on ``port``; None when that cannot be told."""
    try:
        import psutil

        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
                return True
        return False
    except Exception:  # psutil missing, or not allowed to read the process: rely on the checks before start
        return None


def wait_for_info(url: str, timeout: float, proc: subprocess.Popen | None = None, port: int | None = None) -> dict | None:
    """The server's ``/info/`` once it answers, or None after ``timeout`` or as soon as ``proc`` has exited.

    With ``proc``, an answer counts only while ``proc`` (or a process it started) is the one listening on
    ``port`` (default: the URL's): another process answering there is not our server."""
    from urllib.parse import urlsplit

    import requests

    if proc is not None and port is None:
        port = urlsplit(url).port
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            r = requests.get(f"{url}/info/", timeout=2)
            if r.status_code == 200:
                info = r.json()
                if proc is None:
                    return info
                if proc.poll() is None and (port is None or _listens_on(proc, port) is not False):
                    return info
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    return None


def serve(args) -> int:
    try:
        images = check_studies(args.studies, args.allow_empty)
    except StudiesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if images:
        print(f"studies: {os.path.abspath(args.studies)} ({len(images)} images)")
    args.app = resolve_app(args.app)
    if not os.path.isdir(args.app):
        print(f"error: app folder {args.app} not found", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:  # before anything starts: the server would score the studies first and only then fail to listen
        print(f"error: {problem}", file=sys.stderr)
        return 2
    cmd = server_command(args.app, args.studies, args.host, args.port, args.conf or [])
    print("starting:", " ".join(cmd), flush=True)
    t0 = time.time()

    def interrupt(*_):
        raise KeyboardInterrupt

    # A plain `kill` (SIGTERM) or a closed terminal (SIGHUP) stops the server too, as Ctrl-C does: without this
    # the MONAI Label process outlived us and kept the port.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    # Its own process group: MONAI Label runs scoring and training as subprocesses (and starts queued ones even
    # while it shuts down); stopping the group stops them too instead of leaving them running without a server.
    proc = subprocess.Popen(cmd, env=server_env(args.app), start_new_session=True)
    try:
        url = f"http://{args.host}:{args.port}"
        info = wait_for_info(url, args.wait, proc, args.port)
        if info is None:
            if proc.poll() is not None:
                why = port_problem(args.host, args.port)
                why = f" ({why}; it was free when the server started)" if why and "in use" in why else ""
                print(f"error: the server stopped (exit code {proc.returncode}){why}; see its log above", file=sys.stderr)
                return proc.returncode or 1
            print(f"error: no answer from {url}/info/ after {args.wait:.0f} s", file=sys.stderr)
            proc.terminate()
            return 1
        print("")
        print(f"Label Sentinel is up after {time.time() - t0:.1f} s: {info.get('name')} "
              f"(models: {', '.join(info.get('models', {}))}; strategies: {', '.join(info.get('strategies', {}))})")
        print(f"  OHIF viewer : {url}/ohif/   (needs a DICOMweb studies source; see README)")
        print(f"  3D Slicer   : MONAI Label module -> server address {url}")
        print(f"  REST API    : {url}/  (info: {url}/info/)")
        print("Press Ctrl-C to stop.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the server as Ctrl-C does (SIGINT, ``grace`` seconds), then whatever is left of its process group
    (background scoring or training, a task MONAI Label started while shutting down): SIGTERM, then SIGKILL."""

    def signal_group(sig) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:  # no process left in the group
            return False

    if proc.poll() is None:
        signal_group(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait()
    if signal_group(signal.SIGTERM):
        t_end = time.time() + 5
        while time.time() < t_end and signal_group(0):
            time.sleep(0.2)
        signal_group(signal.SIGKILL)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app", default="apps/sentinel", help="MONAI Label app folder (default apps/sentinel)")
    p.add_argument("--studies", required=True, help="studies folder, or a DICOMweb URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app option (repeatable)")
    p.add_argument("--allow-empty", action="store_true", help="start even if the studies folder has no images")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for the server's first answer")


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the MONAI Label server with the Label Sentinel app")
    add_arguments(p)
    p.set_defaults(func=serve)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="labelsentinel serve")
    add_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
