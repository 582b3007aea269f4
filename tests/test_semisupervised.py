"""Unit tests: calibration, real correction pairs, pseudo-label selection, label-error signals."""

import os

import numpy as np
import pytest

from labelsentinel.models.calibration import Calibration, isotonic_fit
from labelsentinel.store import Store, file_stamp
from labelsentinel.strategies.corrections import (
    calibrate_records,
    load_calibration,
    recalibrate,
    record_correction,
    true_dice_per_structure,
)
from labelsentinel.strategies.label_errors import LabelErrorSignals, Welford, auroc, suspects
from labelsentinel.strategies.pseudolabels import select_pseudo_labels


def test_isotonic_is_monotone_and_fits_a_monotone_truth():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    xs, ys = isotonic_fit(x, np.array([0.2, 0.1, 0.4, 0.3, 0.9]))
    assert np.all(np.diff(ys) >= 0)
    assert np.allclose(isotonic_fit(x, x ** 2)[1], x ** 2)


def test_calibration_corrects_a_biased_source_and_bounds_it():
    rng = np.random.default_rng(0)
    true = rng.uniform(0.2, 1.0, 60)
    pred = np.clip(0.5 * true + 0.5 + rng.normal(0, 0.02, 60), 0, 1)  # over-optimistic source
    cal = Calibration.fit(pred, true, prior_mae=0.06)
    assert cal.n == 60 and cal.mae_after < cal.mae_before / 2
    new_t = rng.uniform(0.2, 1.0, 200)
    new_p = np.clip(0.5 * new_t + 0.5 + rng.normal(0, 0.02, 200), 0, 1)
    assert np.mean(np.abs(cal.apply(new_p) - new_t)) < np.mean(np.abs(new_p - new_t)) / 2
    cover = np.mean(new_t >= cal.lower_bound(new_p, 0.1))
    assert cover >= 0.85  # conformal: ~90% of true values above the bound
    # monotone: the order of predictions never changes
    assert np.all(np.diff(cal.apply(np.linspace(0, 1, 50))) >= -1e-12)
    # round trip
    assert Calibration.from_dict(cal.to_dict()).apply(0.8) == pytest.approx(cal.apply(0.8))


def test_per_structure_offsets_fix_what_one_monotone_map_cannot():
    """A source that costs the small structure more than the large one (as a dilation does): one map over
    both cannot correct both; the per-structure offsets do, shrunk while a structure has few pairs."""
    rng = np.random.default_rng(1)

    def source(n):
        true = rng.uniform(0.4, 0.95, n)
        g = np.where(np.arange(n) % 2 == 0, "gallbladder", "liver")
        pred = np.clip(true + np.where(g == "gallbladder", 0.15, -0.05) + rng.normal(0, 0.02, n), 0, 1)
        return pred, true, g

    p, t, g = source(80)
    one_map = Calibration.fit(p, t, prior_mae=0.05)
    per_structure = Calibration.fit(p, t, prior_mae=0.05, groups=g)
    assert set(per_structure.offsets) == {"gallbladder", "liver"}
    assert per_structure.offsets["gallbladder"] < 0 < per_structure.offsets["liver"]
    np_, nt, ng = source(400)
    err_map = np.mean(np.abs(one_map.apply(np_) - nt))
    err_struct = np.mean(np.abs(per_structure.apply(np_, ng) - nt))
    assert err_struct < 0.75 * err_map
    assert per_structure.apply(0.7, "spleen") == pytest.approx(one_map.apply(0.7))  # no pairs: no offset
    assert np.mean(nt >= per_structure.lower_bound(np_, 0.1, group=ng)) >= 0.85
    back = Calibration.from_dict(per_structure.to_dict())
    assert back.apply(0.7, "liver") == pytest.approx(per_structure.apply(0.7, "liver"))


def test_conformal_bound_comes_only_from_pairs_the_weights_were_not_trained_on():
    """After fine-tuning, the estimator fits the corrected cases it was trained on far better than new labels:
    their residuals must not set the bound, or it covers much less than it claims."""
    rng = np.random.default_rng(4)
    true = rng.uniform(0.3, 1.0, 180)
    trained = np.arange(180) < 150  # 150 pairs the weights learned (residual ~0.002), 30 new ones (~0.08)
    pred = np.clip(true + rng.normal(0, np.where(trained, 0.002, 0.08)), 0, 1)
    naive = Calibration.fit(pred, true, prior_mae=0.05)
    honest = Calibration.fit(pred, true, prior_mae=0.05, conformal=~trained)
    assert honest.conformal_pairs == 30 and len(honest.residuals) == 30
    assert honest.xs == naive.xs and honest.ys == naive.ys  # the map uses every pair
    new_t = rng.uniform(0.3, 1.0, 400)
    new_p = np.clip(new_t + rng.normal(0, 0.08, 400), 0, 1)
    assert np.mean(new_t >= naive.lower_bound(new_p, 0.1)) < 0.8
    assert np.mean(new_t >= honest.lower_bound(new_p, 0.1)) >= 0.85
    assert Calibration.from_dict(honest.to_dict()).conformal_pairs == 30
    # fewer than MIN_PAIRS unseen pairs: the prior bound, not the trained pairs' residuals
    few = Calibration.fit(pred, true, prior_mae=0.05, conformal=np.arange(180) < 2)
    assert few.residuals == [] and few.quantile(0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Calibration.fit(pred, true, conformal=[True])


def test_calibration_without_pairs_is_identity_with_prior_bound():
    cal = Calibration.fit([0.5], [0.4], prior_mae=0.05)
    assert cal.apply(0.7) == pytest.approx(0.7)
    assert cal.lower_bound(0.7) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        Calibration.fit([0.5, 0.6], [0.5])


def _write(path, arr):
    from labelsentinel.io import save_nifti

    save_nifti(str(path), arr.astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))


def test_record_correction_stores_real_pairs_and_recalibrates(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    final = np.zeros((10, 10, 6), np.int16)
    final[2:6, 2:6, 1:5] = 1
    final[6:9, 6:9, 1:5] = 2
    pseudo = final.copy()
    pseudo[2:4, 2:6, 1:5] = 0  # structure 1 half missing
    pseudo[pseudo == 2] = 0  # structure 2 missing entirely
    _write(tmp_path / "p.nii.gz", pseudo)
    _write(tmp_path / "f.nii.gz", final)
    assert true_dice_per_structure(pseudo, final) == {1: pytest.approx(2 * 32 / (32 + 64)), 2: 0.0}
    rec = {"case": "c1", "estimator_version": "v1", "structures": [{"id": 1, "name": "liver", "predicted_dice": 0.9, "voxels": 32}]}
    # A quality record of an earlier version of the pseudo-label file is not this file's prediction: no pair.
    store.put_quality("c1", "original", "img|1:2:3:4", "v1", record=rec)
    r = record_correction(store, "c1", "original", str(tmp_path / "p.nii.gz"), str(tmp_path / "f.nii.gz"), {1: "liver"})
    assert not r["skipped"] and {(x["id"], x["predicted"]) for x in store.corrections()} == {(1, None), (2, None)}
    # Once this file is scored, the next pass pairs its prediction with the truth.
    store.put_quality("c1", "original", f"img|{file_stamp(str(tmp_path / 'p.nii.gz'))}", "v1", record=rec)
    r = record_correction(store, "c1", "original", str(tmp_path / "p.nii.gz"), str(tmp_path / "f.nii.gz"), {1: "liver"})
    assert not r["skipped"] and len(r["structures"]) == 2
    rows = store.corrections()
    assert {(x["id"], x["predicted"]) for x in rows} == {(1, 0.9), (2, None)}
    # unchanged files: skipped
    assert record_correction(store, "c1", "original", str(tmp_path / "p.nii.gz"), str(tmp_path / "f.nii.gz"))["skipped"]
    # three over-optimistic pairs -> calibration pulls predictions down
    for i, (p, t) in enumerate([(0.9, 0.5), (0.8, 0.4), (0.95, 0.6)]):
        store.put_corrections(f"d{i}", "original", "s", [{"id": 1, "predicted": p, "true_dice": t, "estimator_version": "v1"}])
    d = recalibrate(store, "v1", prior_mae=0.05)
    assert d["n"] == 4 and d["cases"] == 4
    cal = load_calibration(store, "v1")
    assert cal.apply(0.9) < 0.85
    recs = calibrate_records([{"case": "z", "estimator_version": "v1", "structures": [{"id": 1, "predicted_dice": 0.9}]}],
                             lambda v: load_calibration(store, v))
    assert recs[0]["structures"][0]["raw_predicted_dice"] == 0.9 and recs[0]["structures"][0]["predicted_dice"] < 0.85


def _rec(case, *dice, missing=()):
    return {"case": case, "tag": "original", "estimator_version": "v",
            "structures": [{"id": i + 1, "predicted_dice": d, "voxels": 100} for i, d in enumerate(dice)],
            "missing": [{"id": m} for m in missing]}


def test_pseudo_label_rules():
    recs = [_rec("a", 0.99, 0.98), _rec("b", 0.95, 0.7), _rec("c", 0.97, 0.96), _rec("d", 0.99, 0.99, missing=[3])]
    cal = Calibration.identity(prior_mae=0.02)  # bound = quality - 0.04
    lb = select_pseudo_labels(recs, "lower_bound", threshold=0.92, calibration=cal)
    assert [x["case"] for x in lb] == ["a"]  # c: 0.96 - 0.04 = 0.92 >= 0.92 -> also
    assert "lower bound" in lb[0]["reason"]
    lb = select_pseudo_labels(recs, "lower_bound", threshold=0.92 - 1e-9, calibration=cal)
    assert [x["case"] for x in lb] == ["a", "c"]
    th = select_pseudo_labels(recs, "threshold", threshold=0.9, calibration=cal)
    assert [x["case"] for x in th] == ["a", "c"]  # d lacks an expected structure: min is 0
    top = select_pseudo_labels(recs, "topk", k=3, calibration=cal, weighting=True)
    assert [x["case"] for x in top] == ["a", "c", "b"] and top[2]["weight"] == pytest.approx(0.7)
    assert select_pseudo_labels(recs, "none") == [] and select_pseudo_labels([], "topk") == []
    assert [x["case"] for x in select_pseudo_labels(recs, "topk", k=2, exclude={"a"})] == ["c", "b"]
    with pytest.raises(ValueError):
        select_pseudo_labels(recs, "best")


def test_welford_matches_numpy():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(7, 4, 3))
    w = Welford()
    for x in xs:
        w.update(x)
    assert np.allclose(w.variance(), xs.var(0, ddof=1), atol=1e-5)
    with pytest.raises(ValueError):
        w.update(np.zeros(2))


def test_label_error_signals_flag_the_sample_whose_gradients_vary():
    rng = np.random.default_rng(2)
    sig = LabelErrorSignals(ids=[5, 7])
    label = np.zeros((8, 8, 8), np.int16)
    label[2:6, 2:6, 2:6] = 1
    label[6:8, 6:8, 6:8] = 2
    for ck in range(4):
        for s in range(6):
            noisy = s == 3
            g = rng.normal(0, 3.0 if noisy else 0.3, label.shape)
            ce = np.full(label.shape, 2.0 if noisy else 0.1)
            sig.update(f"s{s}", g, ce, label, label)
    assert sig.checkpoints == 4
    sc = sig.scores({5: "liver"})
    assert suspects(sc, "vog")[0][0] == "s3" and suspects(sc, "loss")[0][0] == "s3"
    assert {x["id"] for x in sc["s3"]["structures"]} == {5, 7} and sc["s3"]["structures"][0]["name"] == "liver"
    assert auroc([sc[f"s{i}"]["vog"] for i in range(6)], [i == 3 for i in range(6)]) == 1.0
    assert suspects(sc, "vog", min_score=1e9) == []
    with pytest.raises(ValueError):
        suspects(sc, "entropy")


def test_vog_is_taken_relative_to_each_checkpoints_gradient_scale():
    """Gradients shrink as training goes on. A sample whose gradients are large but keep their pattern must not
    look unstable because of that shrinking; the one whose pattern changes between checkpoints is the suspect."""
    rng = np.random.default_rng(3)
    label = np.zeros((8, 8, 8), np.int16)
    label[2:6, 2:6, 2:6] = 1
    base = {s: rng.normal(0, 5.0 if s == 0 else 1.0, label.shape) for s in range(6)}
    sig = LabelErrorSignals(ids=[5])
    for ck in range(4):
        decay = 10.0 ** -ck
        for s in range(6):
            g = base[s] * (rng.choice([-1.0, 1.0], label.shape) if s == 3 else 1.0)
            sig.update(f"s{s}", g * decay, np.full(label.shape, 0.1), label, label)
    sc = sig.scores()
    assert suspects(sc, "vog")[0][0] == "s3"
    assert sc["s0"]["structures"][0]["vog"] < 1e-6 < sc["s3"]["structures"][0]["vog"]
    assert sc["s3"]["checkpoints"] == 4
    with pytest.raises(ValueError):
        sig.update("s1", np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_vog_regions_with_more_classes_than_one_bit_word():
    """The classes the network gave a voxel at any checkpoint are kept as bits (64 per word); with 130 classes
    the regions must be those of one boolean map per class."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    label = rng.integers(0, 130, (12, 10, 8))
    preds = [np.where(rng.random(label.shape) < 0.3, rng.integers(0, 130, label.shape), label) for _ in range(3)]
    sig = LabelErrorSignals()
    for p in preds:
        sig.update("a", rng.normal(size=label.shape), rng.random(label.shape), p, label)
    regions = sig._vog_regions("a")
    assert sorted(regions) == sorted(set(np.unique(label).tolist()) - {0})
    for c, reg in regions.items():
        m = label == c
        expect = (np.any([p == c for p in preds], axis=0) ^ m) | (ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m))
        assert np.array_equal(reg, expect), c


def test_auroc():
    assert auroc([0.9, 0.8, 0.1], [1, 0, 0]) == 1.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert np.isnan(auroc([1, 2], [0, 0]))


def test_finetune_on_real_corrections_is_kept_only_when_it_helps(tmp_path):
    """A systematic pseudo-label source (every structure dilated): fine-tuning on corrected cases of it
    lowers the held-out MAE; when it cannot, the current weights are kept and the result says so."""
    from labelsentinel.io import save_nifti
    from labelsentinel.models.degradations import degrade
    from labelsentinel.models.estimator import QualityEstimator, weights_version
    from labelsentinel.models.estimator_finetune import Correction, finetune
    from labelsentinel.sampledata import PHANTOM_LABELS, SPACING, _affine, make_phantom

    corr = []
    for i in range(4):
        rng = np.random.default_rng([99, i])
        img, truth, _ = make_phantom(rng)
        pseudo = truth.copy()
        for sid in sorted(int(x) for x in np.unique(truth) if x):
            if (pseudo == sid).any():
                pseudo = degrade(pseudo, sid, "dilate_mm", SPACING, rng, severity=0.6).label
        paths = [str(tmp_path / f"{n}{i}.nii.gz") for n in ("img", "pseudo", "final")]
        for p, a in zip(paths, (img, pseudo, truth)):
            save_nifti(p, a, _affine())
        corr.append(Correction(f"c{i}", *paths, dict(PHANTOM_LABELS)))
    out = str(tmp_path / "ft.pt")
    res = finetune(corr, out, epochs=3, synthetic=1, val_fraction=0.25)
    assert res["cases"] == 4 and res["real_samples"] > 0 and res["held_out_real_samples"] > 0
    assert sorted(res["trained_cases"] + res["val_cases"]) == ["c0", "c1", "c2", "c3"] and res["val_cases"]
    # measured with the shipped weights (lr 2e-4 then): held-out real MAE 0.093 -> 0.047 after 3 epochs
    assert res["accepted"] and res["mae_after"] < res["mae_before"] and os.path.isfile(out)
    # two candidates by default, every layer and the layers after the CNN; the better held-out one is judged
    assert set(res["candidates"]) == {"all", "head"} and res["mae_after"] == min(res["candidates"].values())
    assert res["candidates"][res["part"]] == res["mae_after"]
    assert QualityEstimator.load(out).version == res["version"] != weights_version()
    # the same corrections give the same weights, whatever the process did before (dropout draws are seeded)
    import torch

    torch.rand(7)
    again = finetune(corr, str(tmp_path / "ft3.pt"), epochs=3, synthetic=1, val_fraction=0.25)
    assert again["mae_after"] == res["mae_after"]
    a, b = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (out, again["weights"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a fine-tuning that cannot beat the current weights leaves them in place
    res2 = finetune(corr, str(tmp_path / "ft2.pt"), epochs=1, lr=0.0, synthetic=1, val_fraction=0.25)
    assert not res2["accepted"] and res2["weights"] is None and not os.path.exists(tmp_path / "ft2.pt")
    with pytest.raises(ValueError):
        finetune(corr[:1], out)
    with pytest.raises(ValueError, match="part must be"):
        finetune(corr, out, part="cnn")
    # a gain below the relative margin is not enough: the current weights stay
    res3 = finetune(corr, str(tmp_path / "ft4.pt"), epochs=3, synthetic=1, val_fraction=0.25, part="head",
                    min_rel_gain=0.99)
    assert res3["mae_after"] < res3["mae_before"] and not res3["accepted"] and res3["weights"] is None
    # "head" trains only the layers after the CNN: the CNN's weights and batch statistics are those it had
    res4 = finetune(corr, str(tmp_path / "ft5.pt"), epochs=3, synthetic=1, val_fraction=0.25, part="head")
    assert res4["accepted"] and res4["part"] == "head" and set(res4["candidates"]) == {"head"}
    base = QualityEstimator.load().net.state_dict()
    tuned = torch.load(res4["weights"], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(tuned[k].float(), base[k].float()) for k in base if k.startswith("cnn."))
    assert any(not torch.equal(tuned[k].float(), base[k].float()) for k in base if k.startswith("head."))


def test_partial_corrections_keep_the_source_errors_in_blobs():
    """A label between a pseudo-label and its correction: every voxel is the pseudo-label's or the final
    label's, the share of the disagreement kept grows with ``fraction``, and so the Dice against the final
    label falls from 1 towards the pseudo-label's own."""
    from labelsentinel.models.degradations import degrade, structure_dice
    from labelsentinel.models.estimator_finetune import partial_corrections
    from labelsentinel.sampledata import SPACING, make_phantom

    rng = np.random.default_rng(5)
    _, final, _ = make_phantom(rng)
    pseudo = final.copy()
    for sid in sorted(int(x) for x in np.unique(final) if x):
        pseudo = degrade(pseudo, sid, "dilate_mm", SPACING, rng, severity=0.6).label
    diff = pseudo != final
    ids = sorted(int(x) for x in np.unique(final) if x)
    kept, dices = [], []
    for f in (0.125, 0.5, 0.875):
        mix = partial_corrections(pseudo, final, SPACING, np.random.default_rng(1), fraction=f)
        assert ((mix == pseudo) | (mix == final)).all()
        assert (mix[~diff] == final[~diff]).all()
        kept.append(float((mix[diff] == pseudo[diff]).mean()))
        dices.append(float(np.mean(list(structure_dice(mix, final, ids).values()))))
    assert all(abs(k - f) < 0.05 for k, f in zip(kept, (0.125, 0.5, 0.875))), kept
    pseudo_dice = float(np.mean(list(structure_dice(pseudo, final, ids).values())))
    assert 1.0 > dices[0] > dices[1] > dices[2] > pseudo_dice, (dices, pseudo_dice)
    assert (partial_corrections(pseudo, final, SPACING, rng, fraction=1.0) == pseudo).all()
    # the kept errors come in blobs, not scattered voxels: far fewer pieces than a random scatter of as many
    from scipy import ndimage

    keep = partial_corrections(pseudo, final, SPACING, np.random.default_rng(2), fraction=0.5) != final
    scatter = np.zeros_like(diff)
    idx = np.flatnonzero(diff)
    scatter.flat[np.random.default_rng(3).choice(idx, int(keep.sum()), replace=False)] = True
    assert ndimage.label(keep)[1] < 0.2 * ndimage.label(scatter)[1]


def test_isotonic_fit_does_not_depend_on_the_order_of_tied_predictions():
    p = np.array([0.2, 0.5, 0.5, 0.8])
    t = np.array([0.1, 0.7, 0.3, 0.9])
    a = Calibration.fit(p, t, prior_mae=0.05)
    b = Calibration.fit(p[[0, 2, 1, 3]], t[[0, 2, 1, 3]], prior_mae=0.05)
    for x in (0.45, 0.499, 0.5, 0.6):
        assert a.apply(x) == pytest.approx(b.apply(x))
    xs, ys = isotonic_fit(p, t)
    assert len(set(xs.tolist())) == len(xs) or all(ys[i] == ys[i + 1] for i in range(len(xs) - 1) if xs[i] == xs[i + 1])


def test_conformal_bound_keeps_its_coverage_with_few_pairs():
    rng = np.random.default_rng(0)
    for n in (3, 5, 8, 9, 20):
        hits, trials = 0, 4000
        for _ in range(trials):
            r = np.abs(rng.normal(0, 0.05, n + 1))
            c = Calibration(n=n, residuals=sorted(r[:n].tolist()), prior_mae=0.04)
            hits += r[n] <= c.quantile(0.1)
        # from 9 pairs on, split conformal; below, the prior bound (2 x 0.04 here) covers a half-normal of sd 0.05
        assert hits / trials >= 0.89, (n, hits / trials)
    c = Calibration(n=4, residuals=[0.01, 0.02, 0.03, 0.2], prior_mae=0.04)
    assert c.quantile(0.1) == 0.2  # the largest residual when it is wider than the prior bound


def test_calibration_is_applied_only_when_it_beats_the_estimator_across_cases():
    rng = np.random.default_rng(7)

    def source(n_cases, bias):
        p, t, c, g = [], [], [], []
        for k in range(n_cases):
            case_err = rng.normal(0, 0.06)  # one label's error is shared by its structures
            for s in range(8):
                tt = rng.uniform(0.3, 1.0)
                p.append(np.clip(tt + bias + case_err + rng.normal(0, 0.02), 0, 1))
                t.append(tt)
                c.append(f"c{k}")
                g.append(f"s{s}")
        return np.array(p), np.array(t), np.array(c), np.array(g)

    p, t, c, g = source(10, -0.15)  # a source the estimator under-rates
    cal = Calibration.fit(p, t, prior_mae=0.05, groups=g, cases=c)
    assert cal.applied and cal.cases == 10 and cal.mae_after < 0.95 * cal.mae_before
    np_, nt, _, ng = source(40, -0.15)
    assert np.mean(np.abs(cal.apply(np_, ng) - nt)) < 0.6 * np.mean(np.abs(np_ - nt))
    p, t, c, g = source(10, 0.0)  # a source it already judges without bias: left as it is
    cal = Calibration.fit(p, t, prior_mae=0.05, groups=g, cases=c)
    assert not cal.applied and cal.apply(0.7, "s1") == 0.7 and len(cal.residuals) == len(p)
    assert Calibration.from_dict(cal.to_dict()).apply(0.7, "s1") == 0.7
    recs = calibrate_records([{"case": "z", "estimator_version": "v", "structures": [{"id": 1, "name": "s1", "predicted_dice": 0.7}]}],
                             lambda v: cal)
    assert recs[0]["calibrated"] is False and recs[0]["structures"][0]["predicted_dice"] == 0.7
    p, t, c, g = source(2, -0.15)  # too few corrected labels to judge
    assert not Calibration.fit(p, t, prior_mae=0.05, groups=g, cases=c).applied
