"""Fine-tuning the estimator on 10 corrected cases of a shifted pseudo-label source: which training samples help.

Not part of `make bench` (about 1 to 3 minutes per fine-tuning on 2 CPU cores). The condition is the
calibration benchmark's (``bench_semisupervised.py --part calibration``): 60 phantoms of ``--source`` (default
``compound``), 10 of the first 20 corrected (same 3 draws), the 40 others measure the MAE after fine-tuning and
recalibration. Each variant is a set of keyword arguments of ``finetune`` (JSON), for example
``'{"partial": 0}'`` (no partial corrections, the behaviour before) or ``'{"partial": 8, "synthetic": 0}'``.

Usage: python bench/study_finetune.py [--source compound] [--cases 10] [--variants JSON ...]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_semisupervised as B  # noqa: E402
from common import update_section  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="compound", choices=sorted(B.SOURCES))
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=['{"partial": 0}', '{"partial": 4}', '{"partial": 8}', '{"partial": 16}'])
    args = ap.parse_args()
    import torch

    from labelsentinel.models.estimator import QualityEstimator

    torch.set_num_threads(2)
    t0 = time.time()
    est = QualityEstimator.load()
    prior = float(est.checkpoint["validation"]["estimator"]["mae"])
    tmpdir = tempfile.TemporaryDirectory(prefix="ls-ftstudy-")  # removed at exit: fine-tuned weights, phantoms
    data = B.calibration_data(args.source, tmpdir.name)  # the calibration benchmark's labels
    cases = B._score_source(est, data)
    test = np.array([p for c in cases[20:] for p in c])
    raw = float(np.mean(np.abs(test[:, 0] - test[:, 1])))
    rows = []
    for v in args.variants:
        maes, secs = [], []
        for draw in range(B.FT_DRAWS):
            pick = np.random.default_rng([draw, args.cases]).choice(20, args.cases, replace=False)
            t1 = time.time()
            m, cover, _, out = B.finetuned_mae(est, data, cases, pick, prior, os.path.join(tmpdir.name, f"ft_{draw}.pt"),
                                            seed=draw, **json.loads(v))
            secs.append(time.time() - t1)
            maes.append(m)
            print(f"{v} draw {draw}: accepted {out['accepted']}, MAE {m:.3f}, coverage {cover:.2f} ({secs[-1]:.0f} s)",
                  flush=True)
        rows.append((v, maes, float(np.mean(secs))))
    md = [f"Source `{args.source}`, {args.cases} corrected cases, {B.FT_DRAWS} draws (the calibration benchmark's); "
          f"raw estimator MAE {raw:.3f}. MAE after fine-tuning and recalibration:", "",
          "| `finetune` arguments | MAE per draw | mean | seconds per fine-tuning |", "|---|---|---|---|"]
    md += [f"| `{v}` | {' / '.join(f'{m:.3f}' for m in maes)} | {np.mean(maes):.4f} | {s:.0f} |" for v, maes, s in rows]
    md += ["", f"_study_finetune: {time.time() - t0:.0f} s on this machine._"]
    md = "\n".join(md)
    print(md)
    update_section(f"study-finetune-{args.source}-{args.cases}",
                   f"## Issue 5: fine-tuning study (`python bench/study_finetune.py --source {args.source} --cases {args.cases}`)\n\n" + md)


if __name__ == "__main__":
    main()
