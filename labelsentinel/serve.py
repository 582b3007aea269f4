"""``labelsentinel serve``: check the studies folder, start ``monailabel start_server`` and print where to connect.

It is what ``make run`` calls. It runs the real MONAI Label server (``monailabel start_server --app ...``) as a
child process, waits for ``/info/`` and prints the URLs for OHIF and 3D Slicer; Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
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


def wait_for_info(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict | None:
    import requests

    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            r = requests.get(f"{url}/info/", timeout=2)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
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
    cmd = server_command(args.app, args.studies, args.host, args.port, args.conf or [])
    print("starting:", " ".join(cmd), flush=True)
    t0 = time.time()

    def interrupt(*_):
        raise KeyboardInterrupt

    # A plain `kill` (SIGTERM) or a closed terminal (SIGHUP) stops the server too, as Ctrl-C does: without this
    # the MONAI Label process outlived us and kept the port.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    proc = subprocess.Popen(cmd, env=server_env(args.app))
    try:
        url = f"http://{args.host}:{args.port}"
        info = wait_for_info(url, args.wait, proc)
        if info is None:
            if proc.poll() is not None:
                print(f"error: the server stopped (exit code {proc.returncode}); see its log above", file=sys.stderr)
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


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
