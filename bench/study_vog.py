"""How VoG finds wrong final labels: training length and the way VoG is taken, on several draws.

Not part of `make bench` (about 5 minutes per draw on 2 CPU cores). For each draw: 20 phantom final labels,
``--fraction`` of them (default 20%) corrupted as in ``bench_semisupervised.py --part label_errors`` (boundary noise,
under-segmentation, a missing structure; kinds in turn), the app's small UNet trained from scratch for
``--iters`` iterations with signals at 5 checkpoints. Each draw reports the AUROC of:

- VoG as shipped (``LabelErrorSignals``: each checkpoint's gradients relative to that checkpoint's mean
  gradient size, variance over the voxels whose label is in question);
- VoG as it was before (raw gradients, variance over every voxel the label or the network gives to the
  structure), fed the same maps;
- the mean square of the same scaled gradients over the checkpoints (variance + mean squared, over the same
  voxels): not a variance, a check of what VoG misses when a label's gradients are large but steady;
- the loss score.

Draw ``7000`` is the label-error benchmark's condition at the same fraction (same labels, same corruptions,
same training seed).

The network trains on the GPU where there is one; that run's section is named with a ``-cuda`` suffix.

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


class SecondMoment(LabelErrorSignals):
    """Not a variance: the mean square over checkpoints of the same scaled gradients (variance + mean squared),
    over the same voxels, so that large but steady gradients count as well as changing ones."""

    def raw(self):
        out = super().raw()
        for s, d in out.items():
            w = self._grad[s]
            m2 = w.variance() + w.mean ** 2
            regions = self._vog_regions(s)
            for c in d:
                d[c]["vog"] = float(m2[regions[c]].mean())
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
    accs = [cls(ids=list(range(1, 9))) for cls in (LabelErrorSignals, UnscaledUnionVoG, SecondMoment)]

    class All:
        def update(self, *a):
            for acc in accs:
                acc.update(*a)

    B.train(data, iters, seed=1, signals=(All(), {f"s{i}": d for i, d in enumerate(data)}), log=f"draw {seed_set}")
    y = [i in bad for i in range(len(train_set))]
    sc = [acc.scores() for acc in accs]
    return (*(auroc([a[f"s{i}"]["vog"] for i in range(20)], y) for a in sc),
            auroc([sc[0][f"s{i}"]["loss"] for i in range(20)], y))


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
        print(f"draw {d}: VoG {r[0]:.3f} (before: {r[1]:.3f}), mean square {r[2]:.3f}, loss {r[3]:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    pct = int(round(args.fraction * 100))
    md = [f"### VoG on several draws ({pct}% of 20 final labels corrupted)", "",
          f"The app's small UNet trained {args.iters} iterations, signals at 5 checkpoints.", "",
          "| draw | AUROC VoG (as shipped) | AUROC VoG (before: raw gradients, whole structure) "
          "| AUROC mean square of the gradients (not a variance) | AUROC loss |",
          "|---|---|---|---|---|"]
    md += [f"| {d} | {a:.3f} | {b:.3f} | {c:.3f} | {e:.3f} |" for d, a, b, c, e in rows]
    m = np.mean([r[1:] for r in rows], axis=0)
    md += [f"| mean | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} |", "",
           f"_study_vog: {time.time() - t0:.0f} s on this machine ({B.DEVICE})._"]
    md = "\n".join(md)
    print(md)
    suffix = "-cuda" if B.DEVICE == "cuda" else ""
    update_section(f"study-vog-{args.iters}-{pct}{suffix}", f"## Issue 5: VoG study (`python bench/study_vog.py --iters {args.iters} "
                                                   f"--fraction {args.fraction}`)\n\n" + md)


if __name__ == "__main__":
    main()
