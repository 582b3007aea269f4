"""Budgeted correction on studies with known truth, scoring cost against MONAI Label's epistemic scoring,
and next-sample latency with 1,000 cases.

Correction = replacing a case's pseudo-label with its true label. Dataset Dice = mean true Dice over every
structure instance of every case. Orders compared (all correct whole cases, best first):
- ours: Label Sentinel's budget planner on the estimator's predicted Dice (expected gain);
- random: mean over 50 random orders;
- epistemic: MONAI Label 0.8.5's EpistemicScoring (v2, 5 MC-dropout passes) with the app's own network
  (the shipped small-preset UNet, run with dropout 0.2 since the preset has none), highest entropy first;
- oracle: the true gain (what a perfect estimator would do).

Usage: python bench/bench_strategies.py [--cases 30] [--seed 4000] [--target 0.9]
"""

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, update_section  # noqa: E402

APP = os.path.join(REPO, "apps", "sentinel")


def corrections_to_reach(order, true_gain, start, target):
    d = start
    if d >= target:
        return 0
    for k, c in enumerate(order, 1):
        d += true_gain[c]
        if d >= target - 1e-12:
            return k
    return None


def dice_after(order, true_gain, start, k):
    return start + sum(true_gain[c] for c in order[:k])


def epistemic_scores(studies, cases, preset="small"):
    """MONAI Label's EpistemicScoring with the app's network; returns ({case: entropy}, seconds per case)."""
    sys.path.insert(0, APP)
    from monai.transforms import Activationsd, EnsureTyped
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring

    import lib.infers
    from lib.configs.segmentation import Segmentation
    from monai.networks.nets import UNet

    cfg = Segmentation()
    cfg.init("segmentation", tempfile.mkdtemp(), {"preset": preset}, None)
    # MC dropout needs dropout: the app's UNet of that preset (same weights) with dropout 0.2.
    if preset == "small":
        net = UNet(3, 1, len(cfg.labels) + 1, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1,
                   norm="instance", dropout=0.2)
    elif preset == "medium":
        net = UNet(3, 1, len(cfg.labels) + 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                   num_res_units=2, norm="batch", dropout=0.2)
    else:
        raise ValueError(f"no dropout variant of preset {preset!r}")

    class EpistemicInfer(lib.infers.Segmentation):
        def post_transforms(self, data=None):
            return [EnsureTyped(keys="pred", device="cpu"), Activationsd(keys="pred", softmax=True)]

    path = cfg.path
    if not any(p and os.path.exists(p) for p in path):
        # no weights ship for this preset: its network's own (random) weights, as a file, since the app refuses
        # to infer without any; the time does not depend on the weights
        path = [os.path.join(tempfile.mkdtemp(), "timing_only.pt")]
        torch.save({"model": net.state_dict()}, path[0])
    task = EpistemicInfer(path=path, network=net, labels=cfg.labels, spacing=cfg.preset.spacing,
                          roi_size=cfg.preset.roi_size, train_mode=True, skip_writer=True)
    ds = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    scorer = EpistemicScoring(task, max_samples=0, simulation_size=5, use_variance=False)
    t = time.time()
    scorer({"device": "cpu", "max_workers": 1}, ds)
    sec = (time.time() - t) / len(cases)
    return {c: ds.get_image_info(c).get("epistemic_entropy", 0.0) for c in cases}, sec


def real_ct_cost(est):
    """Seconds to score the real CT's label with our estimator and with MONAI Label's epistemic scoring."""
    import shutil

    from labelsentinel.io import load_label_names
    from labelsentinel.store import Store
    from labelsentinel.strategies.scoring import LabelItem, score_labels

    src = os.path.join(REPO, "sample-apps", "totalseg-ct")
    names = load_label_names(os.path.join(src, "label_names.json"))
    with tempfile.TemporaryDirectory() as d:
        store = Store(os.path.join(d, "q.db"))
        item = LabelItem("ct", "original", os.path.join(src, "ct.nii.gz"), os.path.join(src, "seg_fast.nii.gz"))
        t = time.time()
        res = score_labels([item], store, est.version, lambda: est, names=names)
        ours = time.time() - t
        assert res["scored"] == ["ct/original"], res
        n = len(store.get_quality("ct", "original")["record"]["structures"])
    print(f"real CT: quality scoring {ours:.2f} s ({n} structures)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(src, "ct.nii.gz"), os.path.join(d, "ct.nii.gz"))
        _, epi = epistemic_scores(d, ["ct"])
        print(f"real CT: epistemic scoring {epi:.2f} s", file=sys.stderr)
        _, epi_medium = epistemic_scores(d, ["ct"], preset="medium")
    print(f"real CT: epistemic scoring, medium preset {epi_medium:.2f} s", file=sys.stderr)
    return ours, epi, epi_medium


def next_sample_latency(n=1000):
    """QualityStrategy over a store with n scored unlabeled cases (plain in-memory datastore stand-in)."""
    from labelsentinel.store import Store
    from labelsentinel.strategies.monailabel_adapters import QualityStrategy

    class DS:
        def __init__(self, ids):
            self.ids = ids

        def get_unlabeled_images(self, *a):
            return list(self.ids)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        store = Store(os.path.join(d, "s.db"))
        ids = [f"case_{i:04d}" for i in range(n)]
        for cid in ids:
            rec = {"case": cid, "structures": [{"id": j, "name": f"s{j}", "predicted_dice": float(rng.uniform(0.3, 1)),
                                                "voxels": 1000} for j in range(1, 9)]}
            store.put_quality(cid, "original", "1:1|1:1", "v", record=rec)
        strat = QualityStrategy(lambda: store, threshold=0.9)
        ds = DS(ids)
        strat({"client_id": "warm-up"}, ds)
        # as the app does once started (main.py, on_init_complete): what exists now is out of the garbage
        # collector's reach, so a full collection does not walk this process's torch/MONAI heap mid-call
        gc.collect()
        gc.freeze()
        times = []
        for i in range(20):
            t = time.perf_counter()
            r = strat({"client_id": f"c{i}"}, ds)
            times.append(time.perf_counter() - t)
            assert r["id"]
    return float(np.median(times)), float(np.max(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=4000)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--mix", choices=["uniform", "realistic"], default="uniform",
                    help="pseudo-label grades: uniform 0.95..0.1 (the demo studies), or realistic: 70%% very good "
                         "(grade 0.97), 30%% poor (grade 0.1-0.7), as with a good model's pseudo-labels")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from labelsentinel.io import load_label
    from labelsentinel.models.degradations import structure_dice
    from labelsentinel.models.estimator import QualityEstimator
    from labelsentinel.sampledata import PHANTOM_LABELS, generate
    from labelsentinel.store import Store
    from labelsentinel.strategies.budget import plan_budget
    from labelsentinel.strategies.scoring import LabelItem, score_labels

    with tempfile.TemporaryDirectory() as studies:
        grades = None
        if args.mix == "realistic":
            g = np.random.default_rng(args.seed)
            grades = [0.97 if g.uniform() < 0.7 else float(g.uniform(0.1, 0.7)) for _ in range(args.cases)]
        generate(studies, cases=args.cases, seed=args.seed, real_ct=False, progress=False, grades=grades)
        import shutil

        shutil.rmtree(os.path.join(studies, "labels", "final"))  # every case is a candidate
        cases = [f"case_{i:03d}" for i in range(args.cases)]
        est = QualityEstimator.load()
        # Scoring = what the `quality` scoring method runs (strategies.scoring.score_labels): read both files,
        # estimate every structure, write the record to the store. Truth is not timed.
        store = Store(os.path.join(studies, "bench-quality.db"))
        items = [LabelItem(c, "original", os.path.join(studies, f"{c}.nii.gz"),
                           os.path.join(studies, "labels", "original", f"{c}.nii.gz")) for c in cases]
        t = time.time()
        res = score_labels(items, store, est.version, lambda: est, names=PHANTOM_LABELS, expected=set(PHANTOM_LABELS))
        ours_sec = time.time() - t
        assert not res["errors"] and len(res["scored"]) == len(cases), res
        records, true_d = [], {}
        for c in cases:
            rec = store.get_quality(c, "original")["record"]
            records.append({"case": c, "structures": rec["structures"], "missing": rec["missing"]})
            lab = load_label(items[cases.index(c)].label_path)
            truth = load_label(os.path.join(studies, "truth", f"{c}.nii.gz")).array
            ids = sorted(int(i) for i in np.unique(truth) if i)
            true_d[c] = structure_dice(lab.array, truth, ids)
        ours_sec /= len(cases)
        print(f"quality scoring: {ours_sec:.3f} s per case", file=sys.stderr)
        print("epistemic scoring ...", file=sys.stderr)
        entropy, epi_sec = epistemic_scores(studies, cases)
    ct_ours, ct_epi, ct_epi_medium = real_ct_cost(est)

    n_inst = sum(len(v) for v in true_d.values())
    true_gain = {c: sum(1 - d for d in true_d[c].values()) / n_inst for c in cases}
    start = sum(d for v in true_d.values() for d in v.values()) / n_inst
    orders = {
        "Label Sentinel (predicted Dice, budget planner)": [p.case_id for p in plan_budget(records, budget_cases=len(cases)).cases],
        "epistemic (MONAI Label, MC dropout)": sorted(cases, key=lambda c: (-entropy[c], c)),
        "oracle (true Dice)": sorted(cases, key=lambda c: (-true_gain[c], c)),
    }
    # Cases the planner leaves out (predicted perfect) come last, in case order.
    ours = orders["Label Sentinel (predicted Dice, budget planner)"]
    ours += [c for c in cases if c not in ours]
    rng = np.random.default_rng(0)
    rand_orders = [list(rng.permutation(cases)) for _ in range(50)]
    ks = [2, 5, 10, 15]
    lines = ["| order | corrections to reach mean Dice " + f"{args.target} | " + " | ".join(f"Dice after {k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    need = {}
    for name, order in orders.items():
        n = corrections_to_reach(order, true_gain, start, args.target)
        need[name] = n
        lines.append(f"| {name} | {n} | " + " | ".join(f"{dice_after(order, true_gain, start, k):.4f}" for k in ks) + " |")
    rn = [corrections_to_reach(o, true_gain, start, args.target) for o in rand_orders]
    need["random"] = float(np.mean(rn))
    lines.append(f"| random (mean of 50 orders) | {np.mean(rn):.1f} (sd {np.std(rn):.1f}) | "
                 + " | ".join(f"{np.mean([dice_after(o, true_gain, start, k) for o in rand_orders]):.4f}" for k in ks) + " |")
    # The saving any order can reach depends on the target: the same orders, several targets.
    tl = ["| target mean Dice | Label Sentinel | oracle | random (mean of 50) | Label Sentinel vs random | oracle vs random |",
          "|---|---|---|---|---|---|"]
    for t in sorted({0.75, 0.8, 0.85, 0.9, 0.95, args.target}):
        if t <= start:
            continue
        o_n = corrections_to_reach(ours, true_gain, start, t)
        or_n = corrections_to_reach(orders["oracle (true Dice)"], true_gain, start, t)
        r_n = float(np.mean([corrections_to_reach(o, true_gain, start, t) for o in rand_orders]))
        tl.append(f"| {t} | {o_n} | {or_n} | {r_n:.1f} | {100 * (1 - o_n / r_n):.0f}% fewer | {100 * (1 - or_n / r_n):.0f}% fewer |")
    med, mx = next_sample_latency(1000)
    ours_n, rnd_n, orc_n = need["Label Sentinel (predicted Dice, budget planner)"], need["random"], need["oracle (true Dice)"]
    md = f"""## Budgeted correction and scoring cost, {args.mix} grades (`python bench/bench_strategies.py --cases {args.cases} --seed {args.seed} --target {args.target} --mix {args.mix}`)

{args.cases} new phantom studies (seed {args.seed}) with {args.mix} pseudo-label grades and known truth; every case a candidate.
Starting mean dataset Dice (true, over {n_inst} structure instances): {start:.4f}; target {args.target}.

{chr(10).join(lines)}

Targets (issue 4): >= 50% fewer corrections than random (reached: {ours_n} vs {rnd_n:.1f}, **{100 * (1 - ours_n / rnd_n):.0f}% fewer**),
within 15% of the oracle (reached: {ours_n} vs {orc_n}, **{100 * (ours_n / orc_n - 1):.0f}% more**).
The oracle (true Dice) itself needs {100 * (1 - orc_n / rnd_n):.0f}% fewer corrections than random on this mix: that is
the most any order can save here. The same orders against other targets:

{chr(10).join(tl)}

| scoring cost per case (2 CPU cores) | seconds |
|---|---|
| Label Sentinel `quality` (`score_labels`, as the scoring method: read both files, estimate all 8 structures, write the record) | {ours_sec:.3f} |
| MONAI Label epistemic v2 (5 dropout inferences of the app's default `small` UNet) | {epi_sec:.3f} |
| ratio | **{epi_sec / ours_sec:.1f}x cheaper** (target >= 50x) |

| scoring cost, the real CT (`sample-apps/totalseg-ct`, 61 structures; 2 CPU cores) | seconds |
|---|---|
| Label Sentinel `quality` (`score_labels`: read both files, estimate all 61 structures, write the record) | {ct_ours:.3f} |
| MONAI Label epistemic v2 (5 dropout inferences of the app's default `small` UNet) | {ct_epi:.3f} |
| ratio | **{ct_epi / ct_ours:.1f}x cheaper** (target >= 50x) |
| MONAI Label epistemic v2 with the app's `medium` preset network (UNet 16-256, 2 x 2 x 3 mm; timing only: no weights ship for it, and the time does not depend on them) | {ct_epi_medium:.3f} |
| ratio, `medium` preset | {ct_epi_medium / ct_ours:.1f}x cheaper |

The ratio depends on the network epistemic scoring runs: the target is judged on the app's default `small`
network (above); the `medium` row shows the ratio a server configured with the larger network would see.

Next sample (`quality` strategy, 1,000 scored unlabeled cases in the store, after one warm-up call and the start-up garbage-collector freeze the app does): median
{1000 * med:.1f} ms, max {1000 * mx:.1f} ms over 20 calls (target <= 200 ms; the strategy call, without HTTP).
"""
    print(md)
    update_section(f"strategies-{args.mix}", md)


if __name__ == "__main__":
    main()
