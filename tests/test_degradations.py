import numpy as np
import pytest

from labelsentinel.models.degradations import (
    KINDS,
    degrade,
    degrade_case,
    dice,
    random_degradation,
    structure_dice,
)

SPACING = (2.0, 2.0, 4.0)
NAMES = {2: "kidney_right", 3: "kidney_left", 5: "liver", 52: "aorta"}


def _phantom():
    g = np.indices((48, 40, 24)).astype(float)
    lab = np.zeros((48, 40, 24), np.int16)
    ell = lambda c, r: sum(((g[i] - c[i]) / r[i]) ** 2 for i in range(3)) < 1  # noqa: E731
    lab[ell((14, 20, 12), (9, 10, 8))] = 5
    lab[ell((34, 12, 10), (5, 4, 6))] = 2
    lab[ell((34, 28, 10), (5, 4, 6))] = 3
    lab[ell((30, 20, 12), (2, 2, 11))] = 52
    return lab


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reports_its_true_dice_and_keeps_the_input(kind):
    lab = _phantom()
    before = lab.copy()
    for sid in (5, 2):
        d = degrade(lab, sid, kind, SPACING, np.random.default_rng(1), severity=0.6, names=NAMES)
        assert d.kind == kind and d.structure_id == sid and 0.0 <= d.true_dice <= 1.0
        assert d.true_dice == pytest.approx(dice(d.label == sid, lab == sid))
        assert d.label.shape == lab.shape and d.label.dtype == lab.dtype
    assert np.array_equal(lab, before)


def test_identity_empty_swap_and_missing_id():
    lab = _phantom()
    rng = np.random.default_rng(0)
    assert degrade(lab, 5, "identity", SPACING, rng).true_dice == 1.0
    assert degrade(lab, 5, "empty", SPACING, rng).true_dice == 0.0
    sw = degrade(lab, 2, "swap", SPACING, rng, names=NAMES)
    assert sw.params["other_id"] == 3 and np.array_equal(sw.label == 3, lab == 2)
    with pytest.raises(ValueError, match="not present"):
        degrade(lab, 9, "shift", SPACING, rng)
    with pytest.raises(ValueError, match="unknown degradation kind"):
        degrade(lab, 5, "melt", SPACING, rng)


def test_deterministic_under_a_seed():
    lab = _phantom()
    a = random_degradation(lab, SPACING, np.random.default_rng(42), names=NAMES)
    b = random_degradation(lab, SPACING, np.random.default_rng(42), names=NAMES)
    assert a.kind == b.kind and a.true_dice == b.true_dice and np.array_equal(a.label, b.label)


@pytest.mark.parametrize("kind", ["erode_mm", "dilate_mm", "shift", "truncate_z", "missing_slices", "scale"])
def test_severity_makes_labels_worse(kind):
    lab = _phantom()
    mild = np.mean([degrade(lab, 5, kind, SPACING, np.random.default_rng(s), severity=0.1).true_dice for s in range(4)])
    bad = np.mean([degrade(lab, 5, kind, SPACING, np.random.default_rng(s), severity=0.9).true_dice for s in range(4)])
    assert bad < mild


def test_truncate_and_missing_slices_touch_only_z():
    lab = _phantom()
    d = degrade(lab, 5, "truncate_z", SPACING, np.random.default_rng(3), severity=0.5)
    kept = (d.label == 5).any(axis=(0, 1))
    orig = (lab == 5).any(axis=(0, 1))
    assert kept.sum() < orig.sum()
    z = np.flatnonzero(kept)
    assert np.array_equal((d.label == 5)[:, :, z], (lab == 5)[:, :, z])


def test_degrade_case_grades_quality():
    lab = _phantom()
    means = []
    for q in (0.95, 0.5, 0.1):
        vals = []
        for s in range(3):
            out, d = degrade_case(lab, SPACING, np.random.default_rng(s), quality=q, names=NAMES)
            assert set(d) == {2, 3, 5, 52} and all(0 <= v <= 1 for v in d.values())
            assert d == structure_dice(out, lab, [2, 3, 5, 52])
            vals += list(d.values())
        means.append(np.mean(vals))
    assert means[0] > means[1] > means[2]


def test_early_checkpoint_predictions_are_seeded_and_use_the_label_ids():
    """Predictions of the segmentation network at early checkpoints (kind model_checkpoint): deterministic
    under a seed, in the good labels' ids, one yield per pair and checkpoint; a 61-structure set is left out."""
    from labelsentinel.models.checkpoint_predictions import early_checkpoint_predictions
    from labelsentinel.sampledata import make_phantom

    vols = []
    for i in range(2):
        img, truth, _ = make_phantom(np.random.default_rng([42, i]))
        vols.append((img, truth))
    big = np.zeros((16, 16, 16), np.int32)
    big.flat[: 61 * 8] = np.repeat(np.arange(1, 62), 8)
    vols.append((np.zeros(big.shape, np.float32), big))
    a = list(early_checkpoint_predictions(vols, (2, 4), seed=3, progress=False))
    b = list(early_checkpoint_predictions(vols, (2, 4), seed=3, progress=False))
    assert [(i, it) for i, it, _ in a] == [(0, 2), (1, 2), (0, 4), (1, 4)]
    for (_, _, p), (_, _, q) in zip(a, b):
        assert np.array_equal(p, q)
    ids = set(np.unique(vols[0][1]).tolist()) | set(np.unique(vols[1][1]).tolist())
    for i, _, p in a:
        assert p.shape == vols[i][1].shape and set(np.unique(p).tolist()) <= ids
