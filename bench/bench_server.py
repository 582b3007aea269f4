"""Server start-up and request latencies of the Label Sentinel app on the sample studies.

Starts the real server the way `make run` does (labelsentinel serve -> monailabel start_server) over a
freshly generated studies folder and measures: seconds from the command to the first /info/ answer, and
the latency of next sample, infer (small preset, CPU) and save label.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import REPO, update_section  # noqa: E402
from conftest import free_port  # noqa: E402


def main():
    from monailabel.client import MONAILabelClient

    from labelsentinel.sampledata import generate

    work = tempfile.mkdtemp()
    try:
        studies = os.path.join(work, "studies")
        generate(studies, cases=12, seed=0, progress=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "labelsentinel.cli", "serve", "--studies", studies, "--port", str(port),
               "--conf", "model_dir", os.path.join(work, "model")]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if requests.get(f"{url}/info/", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
            if time.time() - t0 > 300:
                raise SystemExit("server did not start")
        startup = time.time() - t0
        c = MONAILabelClient(url, tmpdir=work)
        ns, inf, sv = [], [], []
        for i in range(5):
            t = time.time()
            c.next_sample("random", {"client_id": f"c{i}"})
            ns.append(time.time() - t)
        for cid in ("case_005", "case_006", "totalseg_ct"):
            t = time.time()
            c.infer("segmentation", cid, {})
            inf.append((cid, time.time() - t))
        truth = os.path.join(studies, "truth", "case_007.nii.gz")
        t = time.time()
        c.save_label("case_007", truth, tag="final")
        sv.append(time.time() - t)
        proc.terminate()
        proc.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = f"""## Server (`python bench/bench_server.py`)

| what | seconds |
|---|---|
| `labelsentinel serve` (what `make run` runs) to first `/info/` answer, 13 studies | {startup:.1f} |
| next sample (`random`), median of 5 | {statistics.median(ns):.3f} |
""" + "".join(f"| infer `segmentation` (small preset, CPU) on {cid} | {s:.2f} |\n" for cid, s in inf) + f"""| save a final label | {sv[0]:.3f} |
"""
    print(md)
    update_section("server", md)


if __name__ == "__main__":
    main()
