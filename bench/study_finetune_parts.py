"""Which layers fine-tuning should train, and when to keep the result: per-epoch curves on the calibration
benchmark's sources.

Not part of `make bench` (about 20 s per fine-tuning of the layers after the CNN, 100 s of every layer, on 2
CPU cores). The condition is the calibration benchmark's (``bench_semisupervised.py --part calibration``): 60
phantoms per source, 10 of the first 20 corrected (draw d picks them as the benchmark does), the 40 others are
the test labels. For every epoch of every fine-tuning it records the MAE on the held-out corrected cases (what
``finetune`` judges by), on the 40 test labels (raw estimator output, no recalibration) and on synthetic
degradations of the held-out cases' final labels (what the estimator was trained on). Then it replays
acceptance rules on those curves: the test MAE a rule gives is that of the best held-out epoch when the rule
accepts, else the current weights'.

Usage: python bench/study_finetune_parts.py [--sources demo,compound,dilated] [--draws 4] [--first 0]
       [--variant '{"part": "head"}'] [--out curves.json]
       python bench/study_finetune_parts.py --replay curves.json [...] [--merge] [--part all|head]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RULES = {
    "gain >= 0.005 (before this study)": lambda best, before: best <= before - 0.005,
    "gain >= 10% of the current MAE": lambda best, before: best <= 0.90 * before,
    "gain >= 15% (and 0.005), shipped": lambda best, before: best <= before - max(0.005, 0.15 * before),
    "gain >= 20%": lambda best, before: best <= 0.80 * before,
    "gain >= 30%": lambda best, before: best <= 0.70 * before,
}


def curves(sources, draws, first, variant, out_path):
    import torch

    import bench_semisupervised as B
    from labelsentinel.io import load_label
    from labelsentinel.models import degradations as D
    from labelsentinel.models import estimator_finetune as FT
    from labelsentinel.models.estimator import QualityEstimator, extract_samples
    from labelsentinel.sampledata import PHANTOM_LABELS, SPACING

    torch.set_num_threads(2)
    est = QualityEstimator.load()
    results = []
    tmp = tempfile.TemporaryDirectory(prefix="ls-ftparts-")
    for src in sources:
        data = B.calibration_data(src, tmp.name)
        rows = [(s.crop, s.features, PHANTOM_LABELS.get(s.id), float(dices[s.id]))
                for img, lab, dices, _ in data[20:] for s in extract_samples(img, lab, SPACING) if s.id in dices]
        T = FT._stack(est, rows)
        for draw in range(first, first + draws):
            pick = np.random.default_rng([draw, 10]).choice(20, 10, replace=False)
            cases = sorted(str(j) for j in pick)
            val = set(np.random.default_rng(draw).permutation(cases)[:max(1, int(round(0.25 * len(cases))))].tolist())
            syn = []
            for j in pick:
                if str(j) not in val:
                    continue
                img, final = data[j][0], load_label(data[j][3][2]).array
                for sid in sorted(int(i) for i in np.unique(final) if i):
                    for k in range(4):
                        deg = D.random_degradation(final, SPACING, np.random.default_rng([99, sid, k, int(j)]),
                                                   names=PHANTOM_LABELS, structure_ids=[sid], image=img)
                        s = extract_samples(img, deg.label, SPACING, ids=[sid], validate=False)
                        if s:
                            syn.append((s[0].crop, s[0].features, PHANTOM_LABELS.get(sid), float(deg.true_dice)))
            S = FT._stack(est, syn)

            def mae(net, X):
                net.eval()
                with torch.no_grad():
                    return float((net(*X[:3]).float().clamp(0, 1) - X[3]).abs().mean())

            rec = {"source": src, "draw": draw, "variant": variant, "epochs": [],
                   "test_before": mae(est.net, T), "syn_before": mae(est.net, S)}

            def on_epoch(ep, net, m, before, part="all"):
                rec["val_before"] = before
                rec["epochs"].append({"part": part, "ep": ep, "val": m, "test": mae(net, T), "syn": mae(net, S)})

            t = time.time()
            res = FT.finetune([FT.Correction(str(j), *data[j][3], PHANTOM_LABELS) for j in pick],
                              os.path.join(tmp.name, "ft.pt"), seed=draw, on_epoch=on_epoch, **variant)
            rec.update(accepted=res["accepted"], secs=time.time() - t)
            results.append(rec)
            b = min(rec["epochs"], key=lambda e: e["val"])
            print(f"{src} draw {draw}: held-out {rec['val_before']:.4f} -> {b['val']:.4f} ({b['part']}, epoch {b['ep']}); "
                  f"test {rec['test_before']:.4f} -> {b['test']:.4f}; synthetic {rec['syn_before']:.4f} -> {b['syn']:.4f}; "
                  f"{rec['secs']:.0f} s", flush=True)
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(results, f)
    return results


def replay(results):
    sources = sorted({r["source"] for r in results}, key=lambda s: ["demo", "compound", "dilated"].index(s)
                     if s in ("demo", "compound", "dilated") else 9)
    md = ["| acceptance rule | " + " | ".join(f"`{s}` test MAE (accepted)" for s in sources) + " |",
          "|---|" + "---|" * len(sources)]
    raw = {s: np.mean([r["test_before"] for r in results if r["source"] == s]) for s in sources}
    md.append("| never (current weights) | " + " | ".join(f"{raw[s]:.4f}" for s in sources) + " |")
    shipped = RULES["gain >= 15% (and 0.005), shipped"]
    # Rows: the acceptance rules on the best held-out epoch; then, with the shipped acceptance, other ways to
    # pick the epoch that use the synthetic degradations of the held-out finals (known when fine-tuning runs).
    rows = [(name, rule, None, 0.0) for name, rule in RULES.items()]
    rows += [(f"shipped, only epochs whose synthetic MAE rose <= {g:.0%}", shipped, g, 0.0) for g in (0.0, 0.1, 0.25)]
    rows += [(f"shipped, epoch judged by held-out + {w:g} x synthetic MAE", shipped, None, w) for w in (0.5, 1.0)]
    for name, rule, guard, w in rows:
        cells = []
        for s in sources:
            out = []
            for r in (r for r in results if r["source"] == s):
                eps = [e for e in r["epochs"] if guard is None or e["syn"] <= (1 + guard) * r["syn_before"]]
                b = min(eps, key=lambda e: e["val"] + w * e["syn"]) if eps else None
                ok = b is not None and rule(b["val"], r["val_before"])
                out.append((b["test"] if ok else r["test_before"], ok))
            cells.append(f"{np.mean([o[0] for o in out]):.4f} ({sum(o[1] for o in out)} of {len(out)})")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    # A bound, not a rule: the epoch with the lowest test MAE, picked by the test labels themselves (what
    # fine-tuning on these corrections could give at best, whatever rule picks the epoch)
    best = {s: np.mean([min(e["test"] for e in r["epochs"]) for r in results if r["source"] == s]) for s in sources}
    md.append("| bound: the best epoch by the test labels themselves (not a rule) | "
              + " | ".join(f"{best[s]:.4f}" for s in sources) + " |")
    return "\n".join(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", default="demo,compound,dilated")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--variant", default="{}", help="keyword arguments of finetune, JSON")
    ap.add_argument("--out", default="")
    ap.add_argument("--replay", nargs="*", help="curves written by --out: replay the rules on them")
    ap.add_argument("--part", default="", help="with --replay: judge only this candidate's epochs (all, head)")
    ap.add_argument("--merge", action="store_true", help="with --replay: the files' fine-tunings of a draw are "
                    "candidates of one (part=auto)")
    args = ap.parse_args()
    if args.replay and args.merge:
        # one fine-tuning per file and draw (e.g. {"part": "all"} and {"part": "head"}) seen as the candidates of
        # one: the best held-out epoch of either is judged, as finetune(part="auto") does
        merged = {}
        for p in args.replay:
            for r in json.load(open(p)):
                key = (r["source"], r["draw"])
                if key in merged:
                    assert abs(merged[key]["val_before"] - r["val_before"]) < 1e-9, key
                    merged[key]["epochs"] += r["epochs"]
                else:
                    merged[key] = dict(r, epochs=list(r["epochs"]))
        results = list(merged.values())
    elif args.replay:
        results = [r for p in args.replay for r in json.load(open(p))]
    else:
        results = curves(args.sources.split(","), args.draws, args.first, json.loads(args.variant), args.out)
    if args.part:  # only that candidate's epochs (curves of part=auto hold both)
        results = [dict(r, epochs=[e for e in r["epochs"] if e.get("part", "all") == args.part]) for r in results]
    print(replay(results))


if __name__ == "__main__":
    main()
