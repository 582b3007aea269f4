"""How low recalibration could take the estimator's error on the calibration benchmark's sources at best.

Not part of `make bench` (about 35 s per source on 2 CPU cores). The condition is the calibration
benchmark's (``bench_semisupervised.py --part calibration``): the current estimator scores the 40 test labels
of each source (phantoms of seed 6000, labels 20 to 59). Maps of its predicted Dice are then fitted on those
test labels themselves: one monotone map; one monotone map per structure (the server fits one map and a
shift per structure); one shift per structure (median). These maps have seen the very labels they are judged
on, so a recalibration fitted on 10 corrected cases can hardly do better; the MAE each gives is an optimistic
reference, not a strict bound (the monotone maps are least-squares fits, not MAE-optimal ones).

Usage: python bench/study_calibration_bound.py [--sources compound,dilated,demo]
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def bounds(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict:
    from sklearn.isotonic import IsotonicRegression

    def iso(xs, ys):
        return IsotonicRegression(out_of_bounds="clip").fit(xs, ys).predict(xs)

    per, shift = np.empty_like(y), np.empty_like(y)
    for k in np.unique(g):
        m = g == k
        per[m] = iso(x[m], y[m])
        shift[m] = np.clip(x[m] + np.median(y[m] - x[m]), 0.0, 1.0)
    return {"raw": np.mean(np.abs(x - y)), "map": np.mean(np.abs(iso(x, y) - y)),
            "map_per_structure": np.mean(np.abs(per - y)), "shift_per_structure": np.mean(np.abs(shift - y))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", default="compound,dilated,demo")
    args = ap.parse_args()
    import torch

    import bench_semisupervised as B
    from labelsentinel.models.estimator import QualityEstimator

    torch.set_num_threads(2)
    est = QualityEstimator.load()
    print("| source | raw MAE | half of it (issue 5) | one monotone map | a monotone map per structure | "
          "a shift per structure |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ls-calbound-") as tmp:
        for src in args.sources.split(","):
            scored = B._score_source(est, B.calibration_data(src, tmp))
            t = np.array([p for case in scored[20:] for p in case])
            b = bounds(t[:, 0], t[:, 1], t[:, 2].astype(int))
            print(f"| `{src}` ({len(t)} structures) | {b['raw']:.4f} | {b['raw'] / 2:.4f} | {b['map']:.4f} | "
                  f"{b['map_per_structure']:.4f} | {b['shift_per_structure']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
