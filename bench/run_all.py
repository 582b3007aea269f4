"""`make bench`: run every bench/bench_*.py in turn (each prints figures and updates BENCHMARKS.md).

Usage: python bench/run_all.py [NAME ...]   (names without the bench_ prefix, default: all)
"""

import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if argv:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in argv]
    failed = []
    for s in scripts:
        print(f"== {os.path.basename(s)}", flush=True)
        t0 = time.time()
        r = subprocess.run([sys.executable, s], cwd=os.path.dirname(HERE))
        print(f"== {os.path.basename(s)}: exit {r.returncode} after {time.time() - t0:.0f} s", flush=True)
        if r.returncode:
            failed.append(s)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
