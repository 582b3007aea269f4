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


def _cli(*args, cwd=None, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _user_folder(root):
    """A studies folder of someone's own data (no label_names.json, as the README's "own studies" allow)."""
    d = root / "mine"
    (d / "labels" / "original").mkdir(parents=True)
    (d / "case_000.nii.gz").write_bytes(b"my image")
    (d / "labels" / "original" / "case_000.nii.gz").write_bytes(b"my label")
    return str(d)


def test_sample_data_refuses_a_folder_of_other_data_and_writes_nothing(tmp_path):
    import pytest

    from labelsentinel.sampledata import SampleDataError

    d = _user_folder(tmp_path)
    before = _digest(d)
    r = _cli("sample-data", "--out", d, "--cases", "1", "--no-real-ct")
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "case_000.nii.gz" in r.stderr and "nothing was written" in r.stderr
    assert _digest(d) == before  # not one file added or changed
    with pytest.raises(SampleDataError):
        generate(d, cases=1, real_ct=False, progress=False)
    assert _digest(d) == before
    f = tmp_path / "a-file"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        generate(str(f), cases=1, real_ct=False, progress=False)


def test_sample_data_rerun_completes_its_own_folder_and_never_overwrites(tmp_path):
    import pytest

    from labelsentinel.sampledata import SampleDataError

    ref, d = str(tmp_path / "ref"), str(tmp_path / "demo")
    generate(ref, cases=1, seed=3, real_ct=False, progress=False)
    generate(d, cases=1, seed=3, real_ct=False, progress=False)
    assert _digest(d) == _digest(ref)
    assert generate(d, cases=1, seed=3, real_ct=False, progress=False)["written"] == 0  # idempotent
    assert _digest(d) == _digest(ref)
    # An annotator saved a correction over a demo final label, and a file went missing: a re-run puts the
    # missing file back and keeps the correction.
    with open(os.path.join(d, "labels", "final", "case_000.nii.gz"), "wb") as f:
        f.write(b"corrected by an annotator")
    os.remove(os.path.join(d, "label_names.json"))
    s = generate(d, cases=1, seed=3, real_ct=False, progress=False)
    assert s["written"] == 1
    after = _digest(d)
    assert after["label_names.json"] == _digest(ref)["label_names.json"]
    assert open(os.path.join(d, "labels", "final", "case_000.nii.gz"), "rb").read() == b"corrected by an annotator"
    # Other settings into the same folder: refused, nothing changed.
    for kw in ({"cases": 2, "seed": 3}, {"cases": 1, "seed": 4}):
        with pytest.raises(SampleDataError, match="other settings"):
            generate(d, real_ct=False, progress=False, **kw)
    assert _digest(d) == after


def test_sample_data_bad_case_count_is_an_error_not_a_traceback(tmp_path):
    for n in ("0", "-2", "many"):
        out = tmp_path / f"out{n}"
        r = _cli("sample-data", "--out", str(out), "--cases", n)
        assert r.returncode == 2 and "error:" in r.stderr and "--cases" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not out.exists()


def _make_ready():
    """`make` is there and the virtualenv is installed (so `make run` does not start an install)."""
    import shutil
    import subprocess

    from conftest import REPO

    if not shutil.which("make"):
        return False
    return subprocess.run(["make", "-q", "-C", REPO, ".venv/.installed"], capture_output=True).returncode == 0


def test_make_run_never_writes_demo_studies_into_your_folder(tmp_path):
    """The README's `make run STUDIES=/path/to/folder`: your folder is served as it is; a missing or empty one
    stops with the serve command's message instead of being filled with demo studies."""
    import subprocess

    import pytest

    from conftest import REPO, free_port

    if not _make_ready():
        pytest.skip("make or the installed virtualenv is missing")
    port = str(free_port())
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    for folder, words in ((empty, "holds no images"), (missing, "does not exist")):
        r = subprocess.run(["make", "-s", "-C", REPO, "run", f"STUDIES={folder}", f"PORT={port}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and words in r.stderr, r.stdout + r.stderr
        assert "phantom studies" not in r.stderr  # the generator's report
    assert os.listdir(empty) == [] and not missing.exists()
    # A folder of your own without label_names.json: `make run` only serves it.
    mine = _user_folder(tmp_path)
    r = subprocess.run(["make", "-n", "-C", REPO, "run", f"STUDIES={mine}", f"PORT={port}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "labelsentinel.serve" in r.stdout and "sample-data" not in r.stdout, r.stdout
    # The default demo folder (here a fresh one) is still generated by `make run`.
    demo = str(tmp_path / "demo")
    r = subprocess.run(["make", "-n", "-C", REPO, "run", f"DEMO_STUDIES={demo}", f"STUDIES={demo}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"sample-data --out {demo}" in r.stdout, r.stdout
