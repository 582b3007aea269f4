"""How VoG finds wrong final labels: training length and the way VoG is taken, on several draws.

Not part of `make bench` (about 5 minutes per draw on 2 CPU cores). For each draw: 20 phantom final labels,
``--fraction`` of them (default 20%) corrupted as in ``bench_semisupervised.py --part label_errors`` (boundary noise,
under-segmentation, a missing structure; kinds in turn), the app's small UNet trained from scratch for
``--iters`` iterations with signals at 5 checkpoints. Each draw reports the AUROC of:

- VoG as shipped (``LabelErrorSignals``: each checkpoint's gradients relative to that checkpoint's mean
  gradient size, variance over the voxels whose label is in question);
- VoG as it was before (raw gradients, variance over every voxel the label or the network gives to the
  structure), fed the same maps;
- the loss score.

Draw ``7000`` is the label-error benchmark's condition at the same fraction (same labels, same corruptions,
same training seed).

Usage: python bench/study_vog.py [--iters 1000] [--fraction 0.2] [--draws 7000 7300 7600]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_semisupervised as B  # noqa: E402
from common import update_section  # noqa: E402

from labelsentinel.strategies.label_errors import LabelErrorSignals, Welford, auroc  # noqa: E402


class UnscaledUnionVoG(LabelErrorSignals):
    """VoG as it was before: variance of the raw gradients over the union of label and network regions."""

    def __init__(self, ids=None):
        super().__init__(ids)
        self._raw_grad: dict[str, Welford] = {}

    def update(self, sample, grad, ce, pred, label):
        super().update(sample, grad, ce, pred, label)
        self._raw_grad.setdefault(sample, Welford()).update(grad)

    def raw(self):
        out = super().raw()
        for s, d in out.items():
            var = self._raw_grad[s].variance()
            for c in d:
                d[c]["vog"] = float(var[(self._label[s] == c) | self._pred_any(s, c)].mean())
        return out


def draw(seed_set: int, iters: int, fraction: float):
    _, lut = B.ids_lut()
    train_set = B.phantoms(seed_set, 20)
    rng = np.random.default_rng([seed_set, int(fraction * 100)])
    bad = set(rng.choice(len(train_set), int(round(fraction * len(train_set))), replace=False).tolist())
    data, kinds = [], {}
    for i, (img, truth) in enumerate(train_set):
        lab = truth
        if i in bad:
            kinds[i] = B.ERROR_KINDS[len(kinds) % 3]
            lab = B.corrupt(truth, kinds[i], rng)
        data.append(B.to_tensors(img, lab, lut))
    new, old = LabelErrorSignals(ids=list(range(1, 9))), UnscaledUnionVoG(ids=list(range(1, 9)))

    class Both:
        def update(self, *a):
            new.update(*a)
            old.update(*a)

    B.train(data, iters, seed=1, signals=(Both(), {f"s{i}": d for i, d in enumerate(data)}), log=f"draw {seed_set}")
    y = [i in bad for i in range(len(train_set))]
    a, b = new.scores(), old.scores()
    return (auroc([a[f"s{i}"]["vog"] for i in range(20)], y), auroc([b[f"s{i}"]["vog"] for i in range(20)], y),
            auroc([a[f"s{i}"]["loss"] for i in range(20)], y))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--draws", type=int, nargs="+", default=[7000, 7300, 7600])
    ap.add_argument("--fraction", type=float, default=0.2, help="share of the 20 final labels corrupted")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    t0 = time.time()
    rows = []
    for d in args.draws:
        r = draw(d, args.iters, args.fraction)
        rows.append((d, *r))
        print(f"draw {d}: VoG {r[0]:.3f} (before: {r[1]:.3f}), loss {r[2]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    pct = int(round(args.fraction * 100))
    md = [f"### VoG on several draws ({pct}% of 20 final labels corrupted)", "",
          f"The app's small UNet trained {args.iters} iterations, signals at 5 checkpoints.", "",
          "| draw | AUROC VoG (as shipped) | AUROC VoG (before: raw gradients, whole structure) | AUROC loss |",
          "|---|---|---|---|"]
    md += [f"| {d} | {a:.3f} | {b:.3f} | {c:.3f} |" for d, a, b, c in rows]
    m = np.mean([r[1:] for r in rows], axis=0)
    md += [f"| mean | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} |", "",
           f"_study_vog: {time.time() - t0:.0f} s on this machine._"]
    md = "\n".join(md)
    print(md)
    update_section(f"study-vog-{args.iters}-{pct}", f"## Issue 5: VoG study (`python bench/study_vog.py --iters {args.iters} "
                                                   f"--fraction {args.fraction}`)\n\n" + md)


if __name__ == "__main__":
    main()
