"""Training with unusable label files among the final labels and the pseudo-labels (truncated, empty,
non-integer values, another grid): the run skips them with the reason, trains on the rest and records how it
ended; a run that fails says so in its record."""

from __future__ import annotations

import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import APP, Server, wait_status as _wait

pytestmark = pytest.mark.server

GOOD = ["case_000", "case_001"]
BAD = {  # final label -> words its refusal must carry
    "case_002": "different grids",
    "case_003": "cannot be read",
    "case_004": "cannot be read",
    "case_005": "integer",
}
PSEUDO = "case_006"  # unlabeled: its pseudo-label is truncated after scoring


def _truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _bad_finals(studies: str) -> None:
    """case_002: its truth with the origin moved 20 mm (same shape); case_003: truncated; case_004: zero bytes;
    case_005: float values with some 2.5 voxels; all on the image's grid except case_002."""
    from labelsentinel.io import save_nifti

    final = os.path.join(studies, "labels", "final")
    truth = nib.load(os.path.join(studies, "truth", "case_002.nii.gz"))
    aff = truth.affine.copy()
    aff[:3, 3] += 20.0
    save_nifti(os.path.join(final, "case_002.nii.gz"), np.asarray(truth.dataobj).astype(np.uint8), aff)
    shutil.copyfile(os.path.join(studies, "truth", "case_003.nii.gz"), os.path.join(final, "case_003.nii.gz"))
    _truncate(os.path.join(final, "case_003.nii.gz"))
    open(os.path.join(final, "case_004.nii.gz"), "wb").close()
    t5 = nib.load(os.path.join(studies, "truth", "case_005.nii.gz"))
    arr = np.asarray(t5.dataobj).astype(np.float32)
    arr[10:20, 10:20, 10:20] = 2.5
    save_nifti(os.path.join(final, "case_005.nii.gz"), arr, t5.affine)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("bad") / "studies")
    generate(d, cases=7, seed=3, real_ct=False, progress=False)
    _bad_finals(d)
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    srv = Server(studies, str(tmp_path_factory.mktemp("bs")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("bc")))


def _train(client, **params) -> dict:
    req = {"max_epochs": 1, "val_split": 0.0, "dataset": "Dataset", "tracking": "None", **params}
    client.train_start("segmentation", req)
    return _wait(lambda: client.train_status(), "training")


def _case(path: str) -> str:
    return os.path.basename(path).split(".")[0]


def test_unusable_final_labels_are_skipped_with_the_reason(server, client, store):
    st = _train(client, pseudo_labels="none")
    assert st["status"] == "DONE", f"training ended as {st['status']}:\n{server.log()[-4000:]}"
    with open(os.path.join(server.model_dir, "segmentation", "train_refused.json")) as f:
        refused = json.load(f)["refused"]
    by_case = {_case(r["label"]): r for r in refused}
    assert set(by_case) == set(BAD), refused
    for case, words in BAD.items():
        assert words in by_case[case]["error"] and by_case[case]["source"] == "final", by_case[case]
    assert "2.5" in by_case["case_005"]["error"]
    run = store.get_setting("training_runs")[-1]
    assert run["status"] == "finished" and run.get("error") is None, run
    assert run["finals"] == len(GOOD) and {_case(r["label"]) for r in run["refused"]} == set(BAD)
    with open(os.path.join(server.model_dir, "segmentation", "train_data.json")) as f:
        assert json.load(f)["status"] == "finished"
    # what the project lead's status reads
    last = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()["training"]["last"]
    assert last["status"] == "finished" and last["run_id"] == run["run_id"]


def test_an_unusable_pseudo_label_is_skipped_with_the_reason(server, client, store, studies):
    assert requests.post(f"{server.url}/scoring/quality", timeout=30).status_code == 200
    st = _wait(lambda: requests.get(f"{server.url}/scoring/", timeout=30).json(), "scoring")
    assert st["status"] == "DONE", server.log()[-4000:]
    assert any(r["image_id"] == PSEUDO for r in store.quality("original"))
    _truncate(os.path.join(studies, "labels", "original", f"{PSEUDO}.nii.gz"))  # after it was scored
    st = _train(client, pseudo_labels="topk", pseudo_topk=5, label_errors=False)
    assert st["status"] == "DONE", f"training ended as {st['status']}:\n{server.log()[-4000:]}"
    run = store.get_setting("training_runs")[-1]
    # (the cases whose final label cannot be used may count as unlabeled: their pseudo-labels can be chosen)
    assert run["status"] == "finished" and PSEUDO not in [p["case"] for p in run["pseudo_labels"]], run
    pseudo = [r for r in run["refused"] if r["source"] == "pseudo"]
    assert [_case(r["label"]) for r in pseudo] == [PSEUDO] and "cannot be read" in pseudo[0]["error"], run["refused"]


def test_a_run_that_fails_in_training_is_recorded_as_failed(server, client, store, tmp_path):
    n = len(store.get_setting("training_runs") or [])
    # passes the option checks and the data checks, then fails when training starts: MLflow's database would be
    # in a folder under a plain file
    (tmp_path / "file").write_text("not a folder")
    bad_uri = f"sqlite:///{tmp_path}/file/mlflow.db"
    st = _train(client, pseudo_labels="none", tracking="mlflow", tracking_uri=bad_uri)
    assert st["status"] == "ERROR", server.log()[-4000:]
    runs = store.get_setting("training_runs")
    assert len(runs) == n + 1
    run = runs[-1]
    assert run["status"] == "failed" and run["error"], run
    assert run["finals"] == len(GOOD)
    with open(os.path.join(server.model_dir, "segmentation", "train_data.json")) as f:
        rec = json.load(f)
    assert rec["status"] == "failed" and rec["error"] == run["error"]
    last = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()["training"]["last"]
    assert last["status"] == "failed" and last["error"] == run["error"]


# ---- in process: the checks' cache, and a run with nothing usable ------------------------------------------
@pytest.fixture
def trainer_module():
    sys.path.insert(0, APP)
    try:
        from lib.trainers import segmentation as mod
    finally:
        sys.path.remove(APP)
    return mod


def _pairs(studies):
    return [{"image": os.path.join(studies, f"{c}.nii.gz"), "label": os.path.join(studies, "labels", "final", f"{c}.nii.gz")}
            for c in GOOD + sorted(BAD)]


def test_each_file_version_is_read_once(trainer_module, studies, tmp_path, monkeypatch):
    mod = trainer_module
    reads = []
    real = mod._read_volume

    def counting(path, role):
        reads.append(path)
        return real(path, role)

    monkeypatch.setattr(mod, "_read_volume", counting)
    cache = str(tmp_path / "checked.json")
    good, refused = mod.check_pairs(_pairs(studies), cache_path=cache)
    assert [_case(d["label"]) for d in good] == GOOD and {_case(r["label"]) for r in refused} == set(BAD)
    assert len(reads) == 2 * (len(GOOD) + len(BAD))
    reads.clear()
    again = mod.check_pairs(_pairs(studies), cache_path=cache)
    assert reads == [] and again == (good, refused)
    # a file written again is read again; the others come from the cache
    lab = os.path.join(studies, "labels", "final", "case_004.nii.gz")
    shutil.copyfile(os.path.join(studies, "truth", "case_004.nii.gz"), lab + ".tmp")
    os.replace(lab + ".tmp", lab)
    try:
        good2, refused2 = mod.check_pairs(_pairs(studies), cache_path=cache)
        assert reads == [lab]
        assert "case_004" in [_case(d["label"]) for d in good2] and len(refused2) == len(BAD) - 1
    finally:
        open(lab, "wb").close()


class _Datastore:
    def __init__(self, pairs):
        self.pairs = pairs

    def datalist(self):
        return [dict(p) for p in self.pairs]

    def list_images(self):
        return [_case(p["image"]) for p in self.pairs]

    def get_image_uri(self, i):
        return next(p["image"] for p in self.pairs if _case(p["image"]) == i)


def test_nothing_usable_fails_the_run_with_the_reasons_and_records_it(trainer_module, studies, tmp_path):
    from labelsentinel.store import Store

    mod = trainer_module
    net = __import__("torch").nn.Conv3d(1, 2, 1)
    task = mod.Segmentation(str(tmp_path / "model"), net, {"liver": 1}, (3.2, 3.2, 5.0), (32, 32, 16))
    store = Store(str(tmp_path / "sentinel.db"))
    task.configure_sentinel(lambda: store, {1: "liver"}, {1}, 0.06)
    bad = [p for p in _pairs(studies) if _case(p["label"]) in BAD]
    with pytest.raises(ValueError) as err:
        task({"max_epochs": 1, "pseudo_labels": "none", "tracking": "None"}, _Datastore(bad))
    msg = str(err.value)
    assert msg.startswith("no usable final labels to train on") and "case_004" in msg and "2.5" in msg, msg
    run = store.get_setting("training_runs")[-1]
    assert run["status"] == "failed" and run["error"].endswith(msg) and run["finals"] == 0
    assert {_case(r["label"]) for r in run["refused"]} == set(BAD)
    with open(tmp_path / "model" / "train_refused.json") as f:
        assert {_case(r["label"]) for r in json.load(f)["refused"]} == set(BAD)
