"""End to end: the app started on a team's own studies and with its own options (`--conf`), as the README's
"Using your own studies" and "App options" describe: the structures come from the studies, weights that do
not fit are never loaded, and a bad option stops the start with a message naming it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np
import pytest
import requests

from conftest import APP, Server

pytestmark = pytest.mark.server

OWN_NAMES = {"1": "liver", "2": "spleen"}  # the app's default labels.json calls id 1 "spleen"


def own_studies(root: str, cases: int = 3) -> str:
    """A small studies folder of the team's own: liver (1) and spleen (2), a pseudo-label for every case and
    final labels for the first two."""
    from labelsentinel.io import save_nifti

    rng = np.random.default_rng(0)
    aff = np.diag([3.0, 3.0, 5.0, 1.0])
    for i in range(cases):
        truth = np.zeros((48, 40, 24), np.uint8)
        truth[6 + i:24, 8:30, 4:20] = 1
        truth[28:42, 10:24 + i, 6:18] = 2
        img = (rng.normal(-80, 15, truth.shape) + 140 * (truth == 1) + 120 * (truth == 2)).astype(np.float32)
        pseudo = truth.copy()
        pseudo[6 + i:10 + 2 * i, 8:30, 4:20] = 0  # the pseudo-label misses part of the liver
        case = f"own_{i:03d}"
        save_nifti(os.path.join(root, f"{case}.nii.gz"), img, aff)
        save_nifti(os.path.join(root, "labels", "original", f"{case}.nii.gz"), pseudo, aff)
        if i < 2:
            save_nifti(os.path.join(root, "labels", "final", f"{case}.nii.gz"), truth, aff)
    with open(os.path.join(root, "label_names.json"), "w") as f:
        json.dump(OWN_NAMES, f)
    return root


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_own_studies_use_their_own_structures_and_only_weights_that_fit(tmp_path):
    studies = own_studies(str(tmp_path / "studies"))
    srv = Server(studies, str(tmp_path)).start()
    try:
        info = requests.get(f"{srv.url}/info/", timeout=10).json()
        assert info["labels"] == ["liver", "spleen"], info["labels"]
        assert info["models"]["segmentation"]["labels"] == {"liver": 1, "spleen": 2}
        log = srv.log()
        assert "label_names.json (2 structures; it names id 1 'liver', not 'spleen')" in log, log[-3000:]
        assert "the shipped weights" in log and "are not used" in log and "training starts from scratch" in log

        # no weights that fit yet: a clear answer, not the untrained network's noise as a label
        r = requests.post(f"{srv.url}/infer/segmentation?image=own_002", json={}, timeout=120)
        assert r.status_code == 409 and "no weights yet" in r.json()["detail"], r.text

        # scoring judges the pseudo-labels against the project's own two structures (nothing "missing")
        t_end = time.time() + 300  # the start-up's own scoring run
        while time.time() < t_end:
            q = requests.get(f"{srv.url}/labelsentinel/quality", timeout=30).json()
            recs = {r["image_id"]: r["record"] for r in q["records"] if r["record"]}
            if len(recs) == 3:
                break
            time.sleep(1)
        assert set(recs) == {"own_000", "own_001", "own_002"}, recs.keys()
        for case, rec in recs.items():
            assert rec["missing"] == [], (case, rec["missing"])
            assert {s["name"] for s in rec["structures"]} == {"liver", "spleen"}, rec["structures"]

        # training starts from scratch and publishes weights for 2 structures; infer then works
        r = requests.post(f"{srv.url}/train/segmentation?run_sync=true",
                          json={"max_epochs": 1, "val_split": 0, "dataset": "Dataset"}, timeout=600)
        assert r.status_code == 200, f"{r.status_code} {r.text[:500]}\n{srv.log()[-3000:]}"
        published = os.path.join(srv.model_dir, "segmentation.pt")
        assert os.path.exists(published)
        r = requests.post(f"{srv.url}/infer/segmentation?image=own_002", json={}, timeout=300)
        assert r.status_code == 200, r.text[:500]
    finally:
        srv.stop()

    # The same model folder with another preset, or with the app's default labels: the start stops and says
    # why; the trained model is left byte for byte as it was (never loaded into the wrong network, never
    # trained over).
    before = _sha(published)
    for conf, words in (({"preset": "medium"}, "preset medium"),
                        ({"labels": os.path.join(APP, "labels.json")}, "8 structures")):
        other = Server(studies, str(tmp_path), conf=conf)
        t0 = time.time()
        with pytest.raises(RuntimeError) as err:
            other.start(timeout=120)
        other.stop()
        msg = str(err.value)
        assert "segmentation.pt" in msg and words in msg and "another --conf model_dir" in msg, msg[-2000:]
        assert time.time() - t0 < 120
    assert _sha(published) == before


@pytest.mark.parametrize("key,value,words", [
    ("good_enough", "5", "--conf good_enough must be a number from 0.0 to 1.0, got '5'"),
    ("finetune_after", "abc", "--conf finetune_after must be an integer >= 0, got 'abc'"),
    ("estimator_weights", "/nonexistent/estimator.pt", "--conf estimator_weights /nonexistent/estimator.pt: no such file"),
])
def test_a_bad_option_stops_the_start_and_names_it(studies_copy, tmp_path, key, value, words):
    srv = Server(studies_copy, str(tmp_path), conf={key: value})
    with pytest.raises(RuntimeError) as err:
        srv.start(timeout=120)
    srv.stop()
    assert words in str(err.value), str(err.value)[-2000:]


def test_option_checks_and_label_resolution(tmp_path):
    sys.path.insert(0, APP)
    try:
        from main import conf_number, resolve_labels
    finally:
        sys.path.remove(APP)
    assert conf_number({}, "good_enough", None, float, 0.0, 1.0) is None
    assert conf_number({"good_enough": " 0.8 "}, "good_enough", None, float, 0.0, 1.0) == 0.8
    assert conf_number({"finetune_after": "0"}, "finetune_after", 10, int, lo=0) == 0
    for bad in ("nan", "inf", "-0.1", "1.01", "x"):
        with pytest.raises(ValueError, match="--conf good_enough must be a number from 0.0 to 1.0"):
            conf_number({"good_enough": bad}, "good_enough", None, float, 0.0, 1.0)
    with pytest.raises(ValueError, match="must be an integer >= 0, got '2.5'"):
        conf_number({"finetune_after": "2.5"}, "finetune_after", 10, int, lo=0)

    # labels: --conf labels wins; studies whose label_names.json agrees with the app's (the demo,
    # TotalSegmentator ids) keep the app's; a clashing or disjoint one is the project's list
    studies = tmp_path / "s"
    studies.mkdir()
    conf = {}
    resolve_labels(APP, str(studies), conf)
    assert "labels" not in conf  # no label_names.json: the app's labels (with a warning)
    for names, expect_own in (({"1": "spleen", "5": "liver", "90": "brain"}, False),
                              ({"1": "liver", "2": "spleen"}, True),
                              ({"101": "lesion"}, True)):
        (studies / "label_names.json").write_text(json.dumps(names))
        conf = {}
        resolve_labels(APP, str(studies), conf)
        assert (conf.get("labels") == str(studies / "label_names.json")) == expect_own, names
    conf = {"labels": "/x/mine.json"}
    resolve_labels(APP, str(studies), conf)
    assert conf["labels"] == "/x/mine.json"
    conf = {}
    resolve_labels(APP, "https://pacs.example.org/dicom-web", conf)
    assert conf == {}
