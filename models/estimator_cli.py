"""``labelsentinel estimate`` and ``labelsentinel train-estimator``.

The ``estimate`` output is a stable contract that other tools and tests rely on:

* single pair: JSON ``{"image", "label", "structures": [{"id", "name", "predicted_dice", "voxels", "flags"}],
  "estimator_version", "seconds"}`` on stdout;
* ``--pairs PAIRS.csv --out OUT.csv``: OUT has one row per structure present:
  ``image,label,label_id,name,predicted_dice,voxels`` (and ``flags``, ``error`` columns after them).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

from labelsentinel.io import VolumeError, check_same_grid, load_image, load_label, load_label_names, resample_label_to


def _load_pair(image_path: str, label_path: str, resample: bool):
    image = load_image(image_path)
    label = load_label(label_path)
    try:
        check_same_grid(image, label)
    except VolumeError:
        if not resample:
            raise
        label = resample_label_to(label, image)
    return image, label


def _estimator(args):
    import torch

    from labelsentinel.models.estimator import QualityEstimator

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return QualityEstimator.load(args.weights, device=args.device)


def cmd_estimate(args) -> int:
    if args.pairs:
        return _estimate_pairs(args)
    if not (args.image and args.label):
        raise VolumeError("give --image and --label, or --pairs PAIRS.csv --out OUT.csv")
    t0 = time.time()
    est = _estimator(args)
    image, label = _load_pair(args.image, args.label, args.resample)
    names = load_label_names(args.label_names)
    structures = est.predict(image.array, label.array, image.spacing, names)
    out = {"image": args.image, "label": args.label, "structures": structures,
           "estimator_version": est.version, "seconds": round(time.time() - t0, 3)}
    print(json.dumps(out, indent=1))
    return 0


def _estimate_pairs(args) -> int:
    if not args.out:
        raise VolumeError("--pairs needs --out OUT.csv")
    try:
        with open(args.pairs) as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise VolumeError(f"{args.pairs}: pairs file not found") from e
    if rows and not {"image", "label"} <= set(rows[0]):
        raise VolumeError(f"{args.pairs}: needs the columns image,label (found {', '.join(rows[0])})")
    est = _estimator(args)
    default_names = load_label_names(args.label_names)
    t0 = time.time()
    n_err = n_struct = 0
    # Batched: pairs are read and scored a few at a time (one network pass per chunk).
    chunk = max(1, args.batch_pairs)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "label_id", "name", "predicted_dice", "voxels", "flags", "error"])
        for start in range(0, len(rows), chunk):
            batch, meta = [], []
            for r in rows[start : start + chunk]:
                try:
                    image, label = _load_pair(r["image"], r["label"], args.resample)
                    names = load_label_names(r["label_names"]) if r.get("label_names") else default_names
                    batch.append((image.array, label.array, image.spacing, names))
                    meta.append(r)
                except VolumeError as e:
                    n_err += 1
                    w.writerow([r["image"], r["label"], "", "", "", "", "", str(e)])
            for r, res in zip(meta, est.predict_batch(batch) if batch else []):
                for s in res:
                    n_struct += 1
                    w.writerow([r["image"], r["label"], s["id"], s["name"] or "", f"{s['predicted_dice']:.4f}",
                                s["voxels"], ";".join(s["flags"]), ""])
            done = min(start + chunk, len(rows))
            el = time.time() - t0
            print(f"\r[{done}/{len(rows)}] pairs, {n_struct} structures, {el:.1f} s"
                  + (f", {n_err} unreadable" if n_err else ""), end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(json.dumps({"pairs": len(rows), "structures": n_struct, "errors": n_err, "out": args.out,
                      "estimator_version": est.version, "seconds": round(time.time() - t0, 3)}))
    return 1 if n_err and n_err == len(rows) else 0


def cmd_train(args) -> int:
    from labelsentinel.models.estimator_train import find_pairs, train

    names = load_label_names(args.label_names)
    sources = list(args.data or []) + [f"{i}::{l}" for i, l in (args.pair or [])]
    if not sources:
        raise VolumeError("give at least one --data DIR|CSV or --pair IMAGE LABEL")
    pairs = find_pairs(sources, names, use_truth=not args.no_truth)
    if not pairs:
        raise VolumeError(f"no (image, label) pairs found in {', '.join(sources)}")
    train(pairs, args.out, epochs=args.epochs, per_structure=args.per_structure, val_fraction=args.val_fraction,
          seed=args.seed, batch_size=args.batch_size, lr=args.lr, device=args.device, workers=args.workers,
          val_cases=args.val_case or None, samples_cache=args.samples_cache,
          checkpoint_iterations=tuple(int(x) for x in str(args.checkpoint_predictions).split(",") if x.strip()),
          **({"name_dropout": args.name_dropout} if args.name_dropout is not None else {}),
          **({"low_dice_weight": args.low_dice_weight} if args.low_dice_weight is not None else {}))
    return 0


def cmd_attach(args) -> int:
    from labelsentinel.models.estimator import QualityEstimator, attach_unknown_name_network

    attach_unknown_name_network(args.main, args.name_free, args.out)
    est = QualityEstimator.load(args.out)
    v = est.checkpoint["unknown_names"]["validation"]["estimator"].get("without_names", {})
    print(json.dumps({"out": args.out, "version": est.version, "name_free_validation_without_names": v}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("estimate", help="predict the Dice of every structure of a label (no ground truth needed)")
    p.add_argument("--image", help="image (NIfTI, or NRRD)")
    p.add_argument("--label", help="multi-label mask on the image's grid")
    p.add_argument("--label-names", help="JSON id -> name, e.g. {\"1\": \"spleen\"}")
    p.add_argument("--pairs", help="CSV with columns image,label[,label_names]: score many pairs in one process")
    p.add_argument("--out", help="output CSV for --pairs")
    p.add_argument("--weights", help="estimator checkpoint (default: the shipped weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resample", action="store_true", help="resample a label on another grid onto the image's")
    p.add_argument("--batch-pairs", type=int, default=8, help="pairs per network pass with --pairs")
    p.set_defaults(func=cmd_estimate)

    t = sub.add_parser("train-estimator", help="train the label-quality estimator from good labels")
    t.add_argument("--data", action="append", help="studies folder (labels/final, truth/) or CSV image,label (repeatable)")
    t.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE", "LABEL"), help="one more good pair (repeatable)")
    t.add_argument("--label-names", help="JSON id -> name for pairs without their own")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--per-structure", type=int, default=20, help="degraded versions of every structure")
    t.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    t.add_argument("--val-case", action="append", help="hold out this case for validation (repeatable)")
    t.add_argument("--no-truth", action="store_true", help="ignore truth/ folders, use labels/final only")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2, help="processes that make the degraded samples")
    t.add_argument("--low-dice-weight", type=float, default=None,
                   help="MSE weight of labels with true Dice <= 0.3 (falls to 1 at 0.9; default 3)")
    t.add_argument("--name-dropout", type=float, default=None,
                   help="share of training samples shown without their structure name (default 0; 0.15 makes the "
                        "name-free network that `attach-name-free` adds to a checkpoint)")
    t.add_argument("--checkpoint-predictions", default="",
                   help="also learn from the predictions of the segmentation network (the app's small UNet, trained "
                        "from scratch on the same pairs) at these early iterations, comma separated, e.g. 20,40,80,160")
    t.add_argument("--samples-cache", help="keep the degraded samples in this .npz and reuse them when the pairs, "
                   "--per-structure and --seed are the same")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("attach-name-free", help="add a name-free estimator network (trained with --name-dropout) to a "
                       "checkpoint, to score the structures whose name is not in the table")
    a.add_argument("--main", required=True, help="checkpoint whose network scores named structures (unchanged)")
    a.add_argument("--name-free", required=True, help="checkpoint trained with --name-dropout")
    a.add_argument("--out", required=True, help="checkpoint to write")
    a.set_defaults(func=cmd_attach)
