"""Accuracy and speed of the shipped label-quality estimator (models/weights/estimator_default.pt).

Held-out sets (none of them seen in training):
- real CT: new random degradations (seed 777; training used seed 0) of every structure of the real CT's
  TotalSegmentator label (61 structures);
- phantoms: 6 new phantom cases (seed 3000; training used seed 2000), every structure degraded, plus the
  predictions of a segmentation network trained from scratch on them at early checkpoints (kind
  ``model_checkpoint``; the real CT's 61 structures are too many for that network, see
  models/checkpoint_predictions.py).
Figures: Pearson, Spearman and MAE against the true Dice, overall and per degradation kind, for the
estimator and for the trivial shape-only baseline (ridge regression on the global mask features, fitted on
the same training samples, stored in the checkpoint). Speed: seconds per 3D structure mask on this CPU,
batched (all 61 structures of the real CT in one call) and single (a label holding one structure);
peak resident memory.

Usage: python bench/bench_estimator.py [--per-structure 10] [--weights W]
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, update_section  # noqa: E402

CT = os.path.join(REPO, "sample-apps", "totalseg-ct")


def evaluate(est, data, names=True):
    emb, known = est.embed(data["name"] if names else [None] * len(data["name"]))
    pred = est.score(data["crop"], data["feat"], emb, known=known)
    base = est.baseline_predict(data["feat"])
    return pred, base


def table(title, data, pred, base):
    from labelsentinel.models.estimator_train import metrics

    rows = [f"### {title}", "", "| kind | n | mean true Dice | Pearson | Spearman | MAE | baseline Pearson | baseline MAE |",
            "|---|---|---|---|---|---|---|---|"]
    groups = [("**all**", np.ones(len(data["y"]), bool))] + [(k, data["kind"] == k) for k in sorted(set(data["kind"]))]
    out = {}
    for name, m in groups:
        a, b = metrics(pred[m], data["y"][m]), metrics(base[m], data["y"][m])
        out[name] = a
        f = lambda x: "n/a" if x != x else f"{x:.3f}"  # noqa: E731
        rows.append(f"| {name} | {a['n']} | {data['y'][m].mean():.3f} | {f(a['pearson'])} | {f(a['spearman'])} | "
                    f"{a['mae']:.3f} | {f(b['pearson'])} | {b['mae']:.3f} |")
    return "\n".join(rows), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-structure", type=int, default=10)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from labelsentinel.io import load_image, load_label, load_label_names
    from labelsentinel.models.checkpoint_predictions import DEFAULT_ITERATIONS
    from labelsentinel.models.estimator import QualityEstimator
    from labelsentinel.models.estimator_train import Pair, find_pairs, make_samples
    from labelsentinel.sampledata import generate

    est = QualityEstimator.load(args.weights)
    names = load_label_names(os.path.join(CT, "label_names.json"))
    ct_pair = Pair("totalseg_ct", os.path.join(CT, "ct.nii.gz"), os.path.join(CT, "seg_fast.nii.gz"), names)
    print("held-out degradations of the real CT ...", file=sys.stderr)
    real = make_samples([ct_pair], args.per_structure, seed=777)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, cases=6, seed=3000, real_ct=False, progress=False)
        print("held-out phantom cases ...", file=sys.stderr)
        # + predictions of the segmentation network at early checkpoints (a network trained from scratch on
        # these 6 new phantoms, seed 777): kind model_checkpoint
        ph = make_samples(find_pairs([tmp]), args.per_structure, seed=777, checkpoint_iterations=DEFAULT_ITERATIONS)

    from labelsentinel.models.estimator_train import metrics

    ck = est.checkpoint
    md_parts = []
    summary = {}
    unknown_rows = []
    for title, data in (("Real CT, held-out degradations (61 structures)", real), ("Held-out phantom cases (6 cases x 8 structures)", ph)):
        pred, base = evaluate(est, data)
        text, out = table(title, data, pred, base)
        md_parts.append(text)
        summary[title] = out
        # The same samples with every structure name withheld: what a structure whose name is not in the
        # table gets (the unknown-name embedding).
        a = metrics(evaluate(est, data, names=False)[0], data["y"])
        emb, _ = est.embed([None] * len(data["y"]))
        m = metrics(est.score(data["crop"], data["feat"], emb), data["y"])  # the main network, no name-free one
        unknown_rows.append(f"| {title} | {a['n']} | {out['**all**']['pearson']:.3f} / {out['**all**']['mae']:.3f} | "
                            f"{a['pearson']:.3f} / {a['mae']:.3f} | {m['pearson']:.3f} / {m['mae']:.3f} |")
    md_parts.append("\n".join([
        "### Structure names the estimator does not know (every name withheld, same samples)", "",
        "Scored by the checkpoint's name-free network (trained with `--name-dropout "
        f"{ck.get('unknown_names', {}).get('training', {}).get('name_dropout', 'n/a')}`; without one, by the main "
        "network with the unknown-name embedding).", "",
        "| samples | n | names given: Pearson / MAE | names withheld, name-free network | names withheld, main network |",
        "|---|---|---|---|---|", *unknown_rows]))

    # Speed.
    image = load_image(ct_pair.image)
    label = load_label(ct_pair.label)
    sp = image.spacing
    est.predict(image.array, label.array, sp, names)  # warm-up
    t = time.perf_counter()
    res = est.predict(image.array, label.array, sp, names)
    batch_s = (time.perf_counter() - t) / len(res)
    ids = [r["id"] for r in res][:20]
    t = time.perf_counter()
    for i in ids:
        est.predict(image.array, np.where(label.array == i, i, 0).astype(np.int32), sp, names)
    single_s = (time.perf_counter() - t) / len(ids)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ck = est.checkpoint
    r_all = summary["Real CT, held-out degradations (61 structures)"]
    tr = {k: r_all.get(k, {}) for k in ("truncate_z", "missing_slices")}
    md = f"""## Label-quality estimator (`python bench/bench_estimator.py --per-structure {args.per_structure}`)

Weights: `{os.path.relpath(est.weights_path, REPO)}` ({est.version}), trained by
`{ck.get('training', {}).get('command', 'see BENCHMARKS: estimator-training')}` on {len(ck['training']['cases'])} cases,
{ck['training']['samples']} degraded samples. Baseline = shape-only ridge regression on the global mask features.

Targets (issue 3) on held-out degradations of the real CT: Pearson >= 0.92 (reached: **{r_all['**all**']['pearson']:.3f}**),
MAE <= 0.06 (reached: **{r_all['**all**']['mae']:.3f}**); MAE <= 0.08 for truncated (**{tr['truncate_z'].get('mae', float('nan')):.3f}**)
and missing-slice labels (**{tr['missing_slices'].get('mae', float('nan')):.3f}**); <= 0.06 s per 3D mask in batch mode on 2 CPU
cores (reached: **{batch_s:.3f} s**).

{chr(10).join(p + chr(10) for p in md_parts)}
### Speed and memory (2 CPU cores, no GPU here; no GPU was lent to this session)

| what | value |
|---|---|
| seconds per 3D structure mask, batch (61 structures of the real CT in one call) | {batch_s:.4f} |
| seconds per 3D structure mask, single (a label holding one structure; 20 structures) | {single_s:.4f} |
| peak resident memory of this benchmark process | {peak_mb:.0f} MB |
"""
    print(md)
    update_section("estimator", md)


if __name__ == "__main__":
    main()
