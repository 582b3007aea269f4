"""Training the label-quality estimator from (image, good label) pairs by synthetic degradation.

Data: every structure of every good label is degraded many times with :mod:`labelsentinel.models.degradations`
(each degradation knows its true Dice); the estimator sees the image, the degraded label and the structure
name, and learns to predict that Dice. Pairs come from a MONAI Label studies folder (its ``labels/final``
and, for the demo studies, ``truth/``), a CSV with ``image,label`` columns, or ``--pair IMAGE LABEL``.

Loss (per batch):

* weighted MSE, weight ``w(y) = 1 + (LOW_DICE_WEIGHT - 1) * clip((0.9 - y) / 0.6, 0, 1)``: 3 for true Dice
  <= 0.3, falling linearly to 1 at 0.9 and above. Bad labels are rarer in the data and they are the ones a
  team must not miss, so their errors cost more (the same shape as Quality Sentinel's weighting). Not more:
  a weight that depends on the target pulls every uncertain prediction towards the low targets, and with 7
  (the first default) the estimator called perfect labels of the real CT 0.86 on average;
* + ``RANK_WEIGHT`` (0.5) x a within-structure pair-ranking hinge: for every pair of samples of the same
  structure in the batch whose true Dice differ by more than 0.02, ``relu(-(p_i - p_j) * (y_i - y_j))``
  averaged over pairs. Ranking cases correctly within one structure is exactly what the annotation
  strategies use; 0.5 keeps it a regulariser next to the MSE (which sets the calibration) rather than
  the main objective. Batches are built from groups of samples of one structure so that pairs exist.

Validation is split by case (a case's samples are all in training or all in validation), never by slice
or structure. The checkpoint records the estimator version, the input configuration, the name-embedding
table, the training data summary, validation metrics and a shape-only linear baseline for comparison.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from labelsentinel.io import VolumeError, check_same_grid, load_image, load_label, load_label_names
from labelsentinel.models import degradations as D
from labelsentinel.models.estimator import (
    ESTIMATOR_VERSION,
    FEATURE_NAMES,
    INPUT_SIZE,
    build_net,
    extract_samples,
    net_config,
)

RANK_WEIGHT = 0.5
LOW_DICE_WEIGHT = 3.0
# Share of training samples that see the unknown-name embedding instead of their structure's name. 0 for the
# main network (name dropout costs named accuracy: real CT MAE 0.056 -> 0.066 at 0.15); the default checkpoint's
# name-free network, which scores structures whose name is not in the table, is trained with 0.15.
NAME_DROPOUT = 0.0
TRAIN_KINDS = tuple(k for k in D.KINDS if k != "empty")  # an empty structure has nothing to score


@dataclass
class Pair:
    case: str
    image: str
    label: str
    names: dict


def weight(y: torch.Tensor, low: float = LOW_DICE_WEIGHT) -> torch.Tensor:
    return 1.0 + (low - 1.0) * torch.clamp((0.9 - y) / 0.6, 0.0, 1.0)


def pair_ranking_loss(pred: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    same = group[:, None] == group[None, :]
    dy = y[:, None] - y[None, :]
    mask = same & (dy.abs() > 0.02)
    if not mask.any():
        return pred.sum() * 0.0
    dp = pred[:, None] - pred[None, :]
    return torch.relu(-dp * dy)[mask].mean()


# ------------------------------------------------------------------------------------------------ data


def find_pairs(sources: list[str], label_names: dict | None = None, use_truth: bool = True) -> list[Pair]:
    """Pairs from studies folders (labels/final, and truth/ when present), CSV files, or 'IMAGE::LABEL'."""
    pairs: list[Pair] = []
    for src in sources:
        if "::" in src:
            img, lab = src.split("::", 1)
            pairs.append(Pair(os.path.basename(img).split(".")[0], img, lab, dict(label_names or {})))
        elif src.endswith(".csv"):
            if not os.path.isfile(src):
                raise VolumeError(f"{src}: file not found")
            with open(src) as f:
                reader = csv.DictReader(f)
                missing = {"image", "label"} - set(reader.fieldnames or ())
                if missing:
                    raise VolumeError(f"{src}: a CSV of training pairs needs the columns image,label[,label_names]; "
                                      f"missing {', '.join(sorted(missing))} (found {', '.join(reader.fieldnames or ()) or 'none'})")
                for row in reader:
                    names = load_label_names(row["label_names"]) if row.get("label_names") else dict(label_names or {})
                    pairs.append(Pair(os.path.basename(row["image"]).split(".")[0], row["image"], row["label"], names))
        elif os.path.isdir(src):
            names = dict(label_names or {})
            if not names and os.path.exists(os.path.join(src, "label_names.json")):
                names = load_label_names(os.path.join(src, "label_names.json"))
            seen = set()
            for sub in (("truth",) if use_truth else ()) + (os.path.join("labels", "final"),):
                for lab in sorted(glob.glob(os.path.join(src, sub, "*.nii*"))):
                    case = os.path.basename(lab).split(".")[0]
                    img = next(iter(glob.glob(os.path.join(src, case + ".nii*"))), None)
                    if img and case not in seen:
                        seen.add(case)
                        pairs.append(Pair(case, img, lab, names))
        else:
            raise VolumeError(f"{src}: not found, or not a studies folder, a CSV file or IMAGE::LABEL")
    return pairs


def _samples_for_pair(args):
    pair, per_structure, seed, idx, kinds = args
    image = load_image(pair.image)
    label = load_label(pair.label)
    check_same_grid(image, label)
    img, lab, sp = image.array, label.array, image.spacing
    ids = sorted(int(i) for i in np.unique(lab) if i)
    out = {"crop": [], "feat": [], "y": [], "sid": [], "kind": [], "name": []}
    for sid in ids:
        for k in range(per_structure):
            rng = np.random.default_rng([seed, idx, sid, k])
            deg = D.random_degradation(lab, sp, rng, names=pair.names, kinds=kinds, structure_ids=[sid], image=img)
            s = extract_samples(img, deg.label, sp, ids=[sid], validate=False)
            if not s:
                continue
            out["crop"].append(s[0].crop)
            out["feat"].append(s[0].features)
            out["y"].append(deg.true_dice)
            out["sid"].append(sid)
            out["kind"].append(deg.kind)
            out["name"].append(pair.names.get(sid))
    return pair.case, out


def _checkpoint_samples(pairs: list[Pair], iterations, seed: int, acc: dict, progress: bool) -> None:
    """Samples from the predictions of the segmentation network at early checkpoints (kind
    ``model_checkpoint``): every structure of a prediction, true Dice against the good label (0 for a
    structure the good label does not have)."""
    from labelsentinel.models.checkpoint_predictions import KIND, early_checkpoint_predictions

    uniq: dict = {}
    for p in pairs:  # a pair listed twice (to weigh it more) is one volume for the network
        uniq.setdefault((os.path.abspath(p.image), os.path.abspath(p.label)), p)
    used = list(uniq.values())
    vols = []
    for p in used:
        image, label = load_image(p.image), load_label(p.label)
        check_same_grid(image, label)
        vols.append((image.array, label.array, image.spacing))
    n0 = len(acc["y"])
    for i, it, pred in early_checkpoint_predictions([(v[0], v[1]) for v in vols], iterations, seed=seed,
                                                     progress=progress):
        img, good, sp = vols[i]
        dices = D.structure_dice(pred, good)
        for s in extract_samples(img, pred, sp, validate=False):
            acc["crop"].append(s.crop)
            acc["feat"].append(s.features)
            acc["y"].append(dices.get(s.id, 0.0))
            acc["sid"].append(s.id)
            acc["kind"].append(KIND)
            acc["name"].append(used[i].names.get(s.id))
            acc["case"].append(used[i].case)
    if progress:
        print(f"  samples: {len(acc['y']) - n0} from model checkpoints {sorted(iterations)}", file=sys.stderr, flush=True)


def make_samples(pairs: list[Pair], per_structure: int, seed: int, kinds=TRAIN_KINDS, workers: int = 2,
                 progress=True, checkpoint_iterations=()) -> dict:
    """Degrade every structure ``per_structure`` times, and add the predictions of the segmentation network
    at the early ``checkpoint_iterations`` (none by default); returns stacked arrays with case/kind/structure
    tags."""
    jobs = [(p, per_structure, seed, i, tuple(kinds)) for i, p in enumerate(pairs)]
    acc = {"crop": [], "feat": [], "y": [], "sid": [], "kind": [], "name": [], "case": []}
    t0 = time.time()
    ctx = mp.get_context("spawn")  # fork after torch has started its threads can deadlock
    with ctx.Pool(max(1, workers)) if workers > 1 else _Serial() as pool:
        for n, (case, out) in enumerate(pool.imap_unordered(_samples_for_pair, jobs), 1):
            for k in out:
                acc[k].extend(out[k])
            acc["case"].extend([case] * len(out["y"]))
            if progress:
                print(f"  samples: [{n}/{len(jobs)}] {case}: {len(out['y'])} ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    if checkpoint_iterations:
        _checkpoint_samples(pairs, checkpoint_iterations, seed, acc, progress)
    if not acc["y"]:
        raise ValueError("no training samples: the labels have no structures")
    return {
        "crop": np.stack(acc["crop"]),
        "feat": np.stack(acc["feat"]).astype(np.float32),
        "y": np.asarray(acc["y"], np.float32),
        "sid": np.asarray(acc["sid"]),
        "kind": np.asarray(acc["kind"]),
        "name": list(acc["name"]),
        "case": np.asarray(acc["case"]),
    }


def _cache_key(pairs: list[Pair], per_structure: int, seed: int, checkpoint_iterations=()) -> str:
    import hashlib

    desc = {"pairs": [[p.case, os.path.abspath(p.image), os.path.abspath(p.label),
                       os.path.getsize(p.label), os.path.getmtime(p.label)] for p in pairs],
            "per_structure": per_structure, "seed": seed, "kinds": list(TRAIN_KINDS)}
    if checkpoint_iterations:
        desc["checkpoints"] = sorted(int(i) for i in checkpoint_iterations)
    desc = json.dumps(desc, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def save_samples_cache(path: str, data: dict, pairs: list[Pair], per_structure: int, seed: int,
                       checkpoint_iterations=()) -> None:
    """The degraded samples in one .npz, to train again (other epochs, learning rate) without making them."""
    arrays = {k: v for k, v in data.items() if k != "name"}
    arrays["name"] = np.asarray(["" if n is None else str(n) for n in data["name"]])
    arrays["name_known"] = np.asarray([n is not None for n in data["name"]])
    np.savez(path, key=np.asarray(_cache_key(pairs, per_structure, seed, checkpoint_iterations)), **arrays)


def load_samples_cache(path: str, pairs: list[Pair], per_structure: int, seed: int,
                       checkpoint_iterations=()) -> dict | None:
    """The cached samples if the file exists and was made from the same pairs, count and seed; else None."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != _cache_key(pairs, per_structure, seed, checkpoint_iterations):
            print(f"  {path}: made from other pairs or settings, making the samples again", file=sys.stderr)
            return None
        data = {k: z[k] for k in z.files if k not in ("key", "name", "name_known")}
        data["name"] = [str(n) if k else None for n, k in zip(z["name"], z["name_known"])]
    return data


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def imap_unordered(self, f, jobs):
        return map(f, jobs)


# ------------------------------------------------------------------------------------------------ metrics


def metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    pred, y = np.asarray(pred, float), np.asarray(y, float)
    ok = len(y) > 2 and np.std(y) > 0 and np.std(pred) > 0
    return {
        "n": int(len(y)),
        "pearson": float(pearsonr(pred, y)[0]) if ok else float("nan"),
        "spearman": float(spearmanr(pred, y)[0]) if ok else float("nan"),
        "mae": float(np.mean(np.abs(pred - y))) if len(y) else float("nan"),
    }


def fit_baseline(feat_n: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> dict:
    """Shape-only ridge regression on the normalised global features (the trivial baseline)."""
    X = np.hstack([feat_n, np.ones((len(feat_n), 1), np.float32)])
    A = X.T @ X + l2 * np.eye(X.shape[1])
    w = np.linalg.solve(A, X.T @ y)
    return {"coef": torch.tensor(w[:-1], dtype=torch.float32), "intercept": float(w[-1])}


# ------------------------------------------------------------------------------------------------ training


def _batches(groups: np.ndarray, batch_size: int, rng: np.random.Generator, group_size: int = 8):
    """Index batches made of chunks of ``group_size`` samples of one structure (so ranking pairs exist)."""
    chunks = []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        chunks += [idx[i : i + group_size] for i in range(0, len(idx), group_size)]
    order = rng.permutation(len(chunks))
    batch: list = []
    for c in order:
        batch.extend(chunks[c])
        if len(batch) >= batch_size:
            yield np.asarray(batch)
            batch = []
    if batch:
        yield np.asarray(batch)


def train(
    pairs: list[Pair],
    out: str,
    epochs: int = 30,
    per_structure: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: str = "cpu",
    workers: int = 2,
    val_cases: list[str] | None = None,
    progress: bool = True,
    low_dice_weight: float = LOW_DICE_WEIGHT,
    samples_cache: str | None = None,
    checkpoint_iterations=(),
    name_dropout: float = NAME_DROPOUT,
) -> dict:
    from labelsentinel.models.name_embedding import default_table

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if not pairs:
        raise ValueError("no (image, label) pairs to train on")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    cases = sorted({p.case for p in pairs})
    if val_cases is None:
        n_val = int(round(val_fraction * len(cases))) if len(cases) > 1 else 0
        val_cases = [str(c) for c in rng.permutation(cases)[:n_val]] if n_val else []
    log(f"estimator training: {len(pairs)} pairs, {len(cases)} cases ({len(val_cases)} for validation), "
        f"{per_structure} degradations per structure")
    t0 = time.time()
    ck = tuple(checkpoint_iterations or ())
    data = load_samples_cache(samples_cache, pairs, per_structure, seed, ck) if samples_cache else None
    if data is not None:
        log(f"  {len(data['y'])} samples read from {samples_cache}")
    else:
        data = make_samples(pairs, per_structure, seed, workers=workers, progress=progress, checkpoint_iterations=ck)
        log(f"  {len(data['y'])} samples in {time.time() - t0:.0f} s; true Dice mean {data['y'].mean():.3f}")
        if samples_cache:
            save_samples_cache(samples_cache, data, pairs, per_structure, seed, ck)

    table = default_table()
    emb = np.stack([table.lookup(n)[0] for n in data["name"]]).astype(np.float32)
    unknown = table.lookup(None)[0].astype(np.float32)
    drop_rng = np.random.default_rng([seed, 1])  # its own stream: the batches are the same with or without it
    is_val = np.isin(data["case"], list(val_cases))
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    fmean = data["feat"][tr].mean(0)
    fstd = data["feat"][tr].std(0) + 1e-6
    featn = (data["feat"] - fmean) / fstd
    groups = np.asarray([f"{n}" for n in data["sid"]])

    net = build_net(net_config(), table.dim).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    T = lambda a: torch.from_numpy(np.asarray(a)).to(device)  # noqa: E731

    def predict(idx, names=True):
        net.eval()
        out_ = []
        with torch.no_grad():
            for i in range(0, len(idx), 512):
                j = idx[i : i + 512]
                e = emb[j] if names else np.broadcast_to(unknown, emb[j].shape).copy()
                out_.append(net(T(data["crop"][j].astype(np.float32)), T(featn[j]), T(e)).cpu().numpy())
        return np.concatenate(out_) if out_ else np.zeros(0)

    best = {"mae": float("inf")}
    best_state = None
    for ep in range(1, epochs + 1):
        net.train()
        tl, nb = 0.0, 0
        for b in _batches(groups[tr], batch_size, rng):
            j = tr[b]
            y = T(data["y"][j])
            e = emb[j].copy()
            if name_dropout > 0:
                e[drop_rng.uniform(size=len(j)) < name_dropout] = unknown
            p = net(T(data["crop"][j].astype(np.float32)), T(featn[j]), T(e))
            loss = (weight(y, low_dice_weight) * (p - y) ** 2).mean() + RANK_WEIGHT * pair_ranking_loss(p, y, T(data["sid"][j]))
            opt.zero_grad()
            loss.backward()
            # Without clipping a run could collapse to a constant prediction (the sigmoid saturated) after a
            # few epochs at this learning rate.
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            tl += float(loss.detach())
            nb += 1
        sched.step()
        msg = f"  epoch {ep}/{epochs}: loss {tl / max(nb, 1):.4f}"
        ref = va if len(va) else tr
        m = metrics(predict(ref), data["y"][ref])
        msg += f"; {'val' if len(va) else 'train'} pearson {m['pearson']:.3f} mae {m['mae']:.4f}"
        if name_dropout > 0:
            mu = metrics(predict(ref, names=False), data["y"][ref])
            msg += f"; without names pearson {mu['pearson']:.3f} mae {mu['mae']:.4f}"
        if m["mae"] < best["mae"]:
            best = {**m, "epoch": ep}
            if name_dropout > 0:
                best["without_names"] = mu
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        log(msg + f" ({time.time() - t0:.0f} s)")
    net.load_state_dict(best_state)
    baseline = fit_baseline(featn[tr], data["y"][tr])
    base_val = metrics(np.clip(featn[va] @ baseline["coef"].numpy() + baseline["intercept"], 0, 1), data["y"][va]) if len(va) else None

    ckpt = {
        "format": "labelsentinel-estimator",
        "estimator_version": ESTIMATOR_VERSION,
        "input_config": net_config(),
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()},
        "feature_mean": torch.tensor(fmean),
        "feature_std": torch.tensor(fstd),
        "name_embeddings": {"names": table.names, "embeddings": torch.tensor(table.embeddings).half()},
        "baseline": baseline,
        "training": {
            "cases": cases,
            "val_cases": list(val_cases),
            "pairs": [{"case": p.case, "image": p.image, "label": p.label} for p in pairs],
            "samples": int(len(data["y"])),
            "per_structure": per_structure,
            "kinds": list(TRAIN_KINDS) + (["model_checkpoint"] if checkpoint_iterations else []),
            "checkpoint_iterations": sorted(int(i) for i in (checkpoint_iterations or ())),
            "samples_by_kind": {str(k): int(v) for k, v in zip(*np.unique(data["kind"], return_counts=True))},
            "structures": sorted({str(n) for n in data["name"]}),
            "epochs": epochs,
            "seed": seed,
            "name_dropout": name_dropout,
            "loss": {"weighted_mse": f"1 + {low_dice_weight - 1:g}*clip((0.9-y)/0.6, 0, 1)", "rank_weight": RANK_WEIGHT},
            "seconds": round(time.time() - t0, 1),
            "command": " ".join(["labelsentinel"] + sys.argv[1:]) if sys.argv and "labelsentinel" in sys.argv[0] else "",
        },
        "validation": {"estimator": best, "baseline": base_val},
        "feature_names": list(FEATURE_NAMES),
        "input_size": list(INPUT_SIZE),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    torch.save(ckpt, out)
    log(f"wrote {out}: best epoch {best.get('epoch')}, validation {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()})}")
    return ckpt
