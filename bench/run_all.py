"""`make bench`: run every bench/bench_*.py in turn (each prints figures and updates BENCHMARKS.md).

Usage: python bench/run_all.py [NAME ...]   (names without the bench_ prefix, default: all)
"""

import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Scripts run more than once, with these argument lists (others run once without arguments).
RUNS = {"bench_strategies.py": [["--mix", "uniform"], ["--mix", "realistic"]],
        # small enough for 2 CPU cores in about two hours; the label-error part trains longer (VoG needs the
        # network to start fitting the odd labels, see BENCHMARKS.md)
        "bench_semisupervised.py": [["--part", "calibration", "--part", "semi", "--iters", "300", "--seeds", "3"],
                                    ["--part", "label_errors", "--iters", "1000"]]}


def main(argv):
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if argv:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in argv]
    failed = []
    for s in scripts:
        for extra in RUNS.get(os.path.basename(s), [[]]):
            name = " ".join([os.path.basename(s), *extra])
            print(f"== {name}", flush=True)
            t0 = time.time()
            r = subprocess.run([sys.executable, s, *extra], cwd=os.path.dirname(HERE))
            print(f"== {name}: exit {r.returncode} after {time.time() - t0:.0f} s", flush=True)
            if r.returncode:
                failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
