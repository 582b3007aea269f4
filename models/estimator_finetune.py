"""Fine-tuning the quality estimator on real corrections (what recalibration cannot fix alone).

Input: corrected cases, each an image, the pseudo-label a human corrected, and the final label. Every
structure of the pseudo-label is a real training sample whose target is its true Dice against the final
label. So that a few dozen real samples do not make the network forget what the synthetic training taught,
every final label also gives synthetic samples (random degradations with known Dice, as in training), and
the real samples weigh ``real_weight`` (default 3) times more. Every corrected case also gives ``partial``
(default 8) partial corrections: labels that keep the pseudo-label's errors in random blobs covering 1/16 to
15/16 of the voxels where it and the final label disagree (:func:`partial_corrections`). Their structures
carry the project's own kind of error at graded severities, with a known Dice, and weigh as much as the real
samples: a handful of corrected cases then teaches the shape of this source's errors, not only its
average Dice.

The corrected cases are split by case; the fine-tuned weights are kept only if their MAE on the held-out
real cases beats the current weights' by a clear margin (otherwise the current weights stay and the result
says so). Two candidates are trained by default, every layer and only the layers after the CNN, and the one
with the lower held-out MAE is judged (:func:`finetune`).
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from labelsentinel.io import check_same_grid, load_image, load_label
from labelsentinel.models import degradations as D
from labelsentinel.models.estimator import QualityEstimator, extract_samples, save_checkpoint, weights_version

# held-out MAE gain a fine-tuning must reach to be kept (a smaller difference on a few held-out cases is noise)
MIN_GAIN = 0.005
# ... and as a fraction of the current weights' held-out MAE: with the best of 60 epochs picked on the same few
# held-out cases, a gain of a few percent is what chance gives (BENCHMARKS.md, fine-tuning acceptance)
MIN_REL_GAIN = 0.15
# what fine-tuning trains: every layer, or only the layers after the CNN (its codes are kept). "auto" (the
# default) trains both and judges the one with the lower held-out MAE.
PARTS = ("all", "head")


@dataclass
class Correction:
    case: str
    image: str
    pseudo: str
    final: str
    names: dict


def partial_corrections(pseudo: np.ndarray, final: np.ndarray, spacing, rng, fraction: float,
                        blob_mm: float = 6.0) -> np.ndarray:
    """A label between ``pseudo`` and ``final``: the pseudo-label's own errors, kept in random blobs that cover
    about ``fraction`` of the voxels where the two disagree, and corrected elsewhere. Its structures carry this
    source's kind of error (not a synthetic one) at a lower severity, with a Dice against ``final`` that is known."""
    from scipy import ndimage

    diff = pseudo != final
    if fraction >= 1.0:
        return pseudo.copy()
    if not diff.any():
        return final.copy()
    sigma = [max(blob_mm / s, 0.5) for s in spacing]
    # the random field only over the disagreement's bounding box: a large CT costs what its errors cost
    box = ndimage.find_objects(diff.astype(np.uint8))[0]
    field = ndimage.gaussian_filter(rng.standard_normal(diff[box].shape, dtype=np.float32), sigma)
    d = diff[box]
    out = final.copy()
    out[box] = np.where(d & (field >= np.quantile(field[d], 1.0 - fraction)), pseudo[box], final[box])
    return out


def _rows(img, lab, final, sp, names) -> list[tuple]:
    """One training row per structure of ``lab``: its crop, features, name and true Dice against ``final``."""
    ids = sorted(int(i) for i in np.unique(lab) if i)
    true = D.structure_dice(lab, final, ids)
    return [(s.crop, s.features, names.get(s.id), float(true[s.id]))
            for s in extract_samples(img, lab, sp, ids=ids, validate=False)]


def _samples(corr: Correction, synthetic: int, seed: int, partial: int = 0):
    """Real rows (the pseudo-label's structures), synthetic rows (degradations of the final label) and
    partial-correction rows of one corrected case."""
    image, pseudo, final = load_image(corr.image), load_label(corr.pseudo), load_label(corr.final)
    check_same_grid(image, pseudo)
    check_same_grid(image, final)
    img, sp, case = image.array, image.spacing, zlib.crc32(corr.case.encode())
    real = _rows(img, pseudo.array, final.array, sp, corr.names)
    syn = []
    for sid in sorted(int(i) for i in np.unique(final.array) if i):
        for k in range(synthetic):
            rng = np.random.default_rng([seed, sid, k, case])
            deg = D.random_degradation(final.array, sp, rng, names=corr.names, structure_ids=[sid], image=img)
            s = extract_samples(img, deg.label, sp, ids=[sid], validate=False)
            if s:
                syn.append((s[0].crop, s[0].features, corr.names.get(sid), float(deg.true_dice)))
    part = []
    for k in range(partial):
        mix = partial_corrections(pseudo.array, final.array, sp, np.random.default_rng([seed, 1 << 20, k, case]),
                                  fraction=(k + 0.5) / partial)
        part.extend(_rows(img, mix, final.array, sp, corr.names))
    return real, syn, part


def _stack(est, rows):
    crops = np.stack([r[0] for r in rows]).astype(np.float32)
    feats = ((np.stack([r[1] for r in rows]) - est.feat_mean) / est.feat_std).astype(np.float32)
    embs, _ = est.embed([r[2] for r in rows])
    return torch.from_numpy(crops), torch.from_numpy(feats), torch.from_numpy(embs), torch.tensor([r[3] for r in rows])


def _held_out_mae(model, V, device, head_only=False) -> float:
    model.eval()
    with torch.no_grad():
        p = _forward(model, *[t.to(device) for t in V[:3]], head_only=head_only).float().cpu().clamp(0, 1)
    return float((p - V[3]).abs().mean())


def _forward(model, crop, feats, emb, head_only=False):
    """The estimator's forward pass; with ``head_only``, ``crop`` holds the CNN's codes already worked out."""
    return model.from_code(crop, feats, emb) if head_only else model(crop, feats, emb)


def _train(est, part, X, w, V, epochs, lr, seed, log, before, on_epoch=None):
    """One fine-tuning of ``part`` of a copy of the estimator's network: ``(best held-out MAE, its state)``,
    state None when no epoch beat the network as it was."""
    from labelsentinel.models.estimator_train import weight

    net = copy.deepcopy(est.net).float().train()
    head_only = part == "head"
    if head_only:
        # the CNN stays as it is (eval mode, no gradients): its codes are worked out once, and only the feature,
        # name and head layers learn (about 5x faster than training every layer)
        for p_ in net.cnn.parameters():
            p_.requires_grad_(False)
        net.cnn.eval()
        with torch.no_grad():
            codes = [torch.cat([net.cnn(T[0][i:i + 256].to(est.device)).float() for i in range(0, len(T[0]), 256)])
                     for T in (X, V)]
        X = (codes[0], *X[1:])
        V = (codes[1], *V[1:])

    n = len(X[3])
    opt = torch.optim.AdamW([p_ for p_ in net.parameters() if p_.requires_grad], lr=lr, weight_decay=1e-4)
    best, best_state = _held_out_mae(net, V, est.device, head_only), None
    # The network has dropout: its draws come from torch's global generator, seeded here (and put back after)
    # so that the same corrections give the same weights whatever ran before in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        for ep in range(1, epochs + 1):
            net.train()
            if head_only:
                net.cnn.eval()
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, 32):
                j = perm[i : i + 32]
                p = _forward(net, X[0][j].to(est.device), X[1][j].to(est.device), X[2][j].to(est.device),
                             head_only=head_only).float().cpu()
                y = X[3][j]
                loss = (w[j] * weight(y) * (p - y) ** 2).mean()  # the training loss's weighting
                opt.zero_grad()
                loss.backward()
                opt.step()
            m = _held_out_mae(net, V, est.device, head_only)
            log(f"fine-tune ({part}) epoch {ep}/{epochs}: held-out real MAE {m:.4f} (current weights {before:.4f})")
            if on_epoch:  # for studies: the network after each epoch (in eval mode) and its held-out MAE
                on_epoch(ep, net, m, before, part)
            if m < best:
                best, best_state = m, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return best, best_state


def finetune(corrections: list[Correction], out: str, weights: str | None = None, epochs: int = 60,
             lr: float = 1e-3, synthetic: int = 4, real_weight: float = 3.0, val_fraction: float = 0.25,
             seed: int = 0, progress=None, min_gain: float = MIN_GAIN, partial: int = 8, on_epoch=None,
             part: str = "auto", min_rel_gain: float = MIN_REL_GAIN) -> dict:
    """Fine-tune; write ``out`` only if it beats the current weights on held-out corrected cases by at least
    ``min_gain`` MAE and ``min_rel_gain`` of their MAE (a smaller difference on a few held-out cases is noise:
    even a run at learning rate 0 moves the batch-norm statistics, and the best of 60 epochs is picked on the
    same cases).

    ``part``: ``auto`` (default) trains two candidates on the same samples, every layer (``all``) and only the
    layers after the CNN (``head``), and judges the one with the lower held-out MAE: a source whose errors the
    crop shows in a new way (systematic dilation) needs the CNN, one of the kinds the estimator was trained on
    is judged better by keeping the CNN (training every layer on a few cases made those labels' estimates worse).

    Defaults: 60 epochs at lr 1e-3 (the estimator's training rate), with the best held-out epoch kept, and 8
    partial corrections per case; about 125 s for 10 cases on 2 CPU cores (100 s for ``all`` alone, 20 s for
    ``head``). How they were chosen, with the MAEs they give: BENCHMARKS.md (calibration section and
    fine-tuning studies)."""
    if part not in PARTS + ("auto",):
        raise ValueError(f"part must be auto or one of {', '.join(PARTS)}, got {part!r}")
    if len(corrections) < 2:
        raise ValueError(f"fine-tuning needs at least 2 corrected cases, got {len(corrections)}")
    log = progress or (lambda m: None)
    t0 = time.time()
    est = QualityEstimator.load(weights)
    rng = np.random.default_rng(seed)
    cases = sorted({c.case for c in corrections})
    n_val = max(1, int(round(val_fraction * len(cases))))
    val_cases = set(rng.permutation(cases)[:n_val].tolist())
    tr_real, tr_syn, tr_part, va_real = [], [], [], []
    for i, c in enumerate(corrections):
        held_out = c.case in val_cases  # gives real rows only: the MAE that decides is taken on them
        real, syn, mixed = _samples(c, 0 if held_out else synthetic, seed, 0 if held_out else partial)
        (va_real if held_out else tr_real).extend(real)
        tr_syn.extend(syn)
        tr_part.extend(mixed)
        log(f"fine-tune samples [{i + 1}/{len(corrections)}] {c.case}: {len(real)} real, {len(syn)} synthetic, "
            f"{len(mixed)} partial")
    if not tr_real or not va_real:
        raise ValueError("fine-tuning needs real structure samples in both the training and held-out cases")
    rows = tr_real + tr_part + tr_syn
    X = _stack(est, rows)
    w = torch.tensor([real_weight] * (len(tr_real) + len(tr_part)) + [1.0] * len(tr_syn))
    V = _stack(est, va_real)
    before = _held_out_mae(est.net, V, est.device)
    runs = {}
    for cand in (("all", "head") if part == "auto" else (part,)):
        runs[cand] = _train(est, cand, X, w, V, epochs, lr, seed, log, before, on_epoch)
    chosen = min(runs, key=lambda k: runs[k][0])
    best, best_state = runs[chosen]
    # every case these weights were trained on (this run's and those of the fine-tunings they start from): the
    # calibration must not take its conformal residuals from them
    trained = sorted(set(cases) - val_cases | set(est.checkpoint.get("finetuned", {}).get("trained_cases", [])))
    result = {"cases": len(cases), "val_cases": sorted(val_cases), "trained_cases": trained,
              "real_samples": len(tr_real), "synthetic_samples": len(tr_syn), "partial_samples": len(tr_part),
              "held_out_real_samples": len(va_real), "mae_before": round(before, 4), "mae_after": round(best, 4),
              "base_version": est.version, "seconds": round(time.time() - t0, 1)}
    result.update(part=chosen, candidates={k: round(v[0], 4) for k, v in runs.items()})
    need = max(min_gain, min_rel_gain * before)
    if best_state is None or best > before - need:
        result.update(accepted=False, weights=None)
        log(f"fine-tuning kept the current weights (held-out MAE {before:.4f}, fine-tuned best {best:.4f}; "
            f"a gain of {need:.4f} is needed)")
        return result
    ck = dict(est.checkpoint)
    ck["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in best_state.items()}
    ck["finetuned"] = {**result, "ts": time.time()}
    save_checkpoint(ck, out)
    result.update(accepted=True, weights=out, version=weights_version(out))
    log(f"fine-tuned estimator written to {out} (held-out real MAE {before:.4f} -> {best:.4f})")
    return result
