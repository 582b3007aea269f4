import csv
import hashlib
import json
import os

import nibabel as nib
import numpy as np

from labelsentinel.sampledata import N_FINAL, PHANTOM_LABELS, REAL_CT_ID, SPACING, generate


def _digest(folder):
    h = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            p = os.path.join(root, f)
            h[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_layout_truth_and_graded_pseudo_labels(sample_studies):
    d = sample_studies
    cases = [f"case_{i:03d}" for i in range(4)]
    for c in cases:
        img = nib.load(os.path.join(d, f"{c}.nii.gz"))
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.header.get_zooms(), SPACING)
        a = np.asarray(img.dataobj)
        assert -1024 <= a.min() < -900 and 200 < a.max() < 3072  # air, and contrast/bone
        truth = np.asarray(nib.load(os.path.join(d, "truth", f"{c}.nii.gz")).dataobj)
        assert set(np.unique(truth)) - {0} <= set(PHANTOM_LABELS) and len(np.unique(truth)) >= 8
        assert os.path.exists(os.path.join(d, "labels", "original", f"{c}.nii.gz"))
    finals = sorted(os.listdir(os.path.join(d, "labels", "final")))
    assert finals == [f"{c}.nii.gz" for c in cases[:N_FINAL]]
    assert not os.path.exists(os.path.join(d, "labels", "truth"))  # truth is not a datastore tag
    with open(os.path.join(d, "truth", "pseudo_label_quality.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == set(cases)
    dices = [float(r["true_dice"]) for r in rows]
    assert min(dices) < 0.5 and max(dices) > 0.9  # from clearly wrong to very good
    with open(os.path.join(d, "truth", "cases.csv")) as f:
        meta = list(csv.DictReader(f))
    assert {m["sex"] for m in meta} <= {"F", "M"}
    # Recompute one structure's true Dice from the files.
    r = rows[0]
    t = np.asarray(nib.load(os.path.join(d, "truth", f"{r['case']}.nii.gz")).dataobj) == int(r["label_id"])
    p = np.asarray(nib.load(os.path.join(d, "labels", "original", f"{r['case']}.nii.gz")).dataobj) == int(r["label_id"])
    assert abs(2 * (t & p).sum() / (t.sum() + p.sum()) - float(r["true_dice"])) < 1e-3


def test_real_ct_study_and_names(sample_studies):
    d = sample_studies
    assert os.path.exists(os.path.join(d, f"{REAL_CT_ID}.nii.gz"))
    seg = np.asarray(nib.load(os.path.join(d, "labels", "original", f"{REAL_CT_ID}.nii.gz")).dataobj)
    assert len(np.unique(seg)) - 1 == 61
    names = json.load(open(os.path.join(d, "label_names.json")))
    assert names["52"] == "aorta" and len(names) == 117
    assert os.path.exists(os.path.join(d, f"NOTICE-{REAL_CT_ID}.txt"))


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate(a, cases=2, seed=7, real_ct=False, progress=False)
    generate(b, cases=2, seed=7, real_ct=False, progress=False)
    generate(c, cases=2, seed=8, real_ct=False, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
