"""End to end: the real `monailabel start_server` process with the Label Sentinel app, driven with
`monailabel.client.MONAILabelClient` (the client the 3D Slicer plugin uses)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import Server

pytestmark = pytest.mark.server

CORRUPT = ("truncated", "garbage")
MISMATCHED = "case_005"  # gets a final label of the wrong shape
UNLABELED_OK = {"case_003", "case_004", "totalseg_ct"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from labelsentinel.io import save_nifti
    from labelsentinel.sampledata import generate

    work = tmp_path_factory.mktemp("e2e")
    studies = str(work / "studies")
    generate(studies, cases=6, seed=0, progress=False)
    with open(os.path.join(studies, "case_000.nii.gz"), "rb") as f:
        data = f.read()
    with open(os.path.join(studies, "truncated.nii.gz"), "wb") as f:
        f.write(data[: len(data) // 3])
    with open(os.path.join(studies, "garbage.nii.gz"), "wb") as f:
        f.write(os.urandom(5000))
    save_nifti(os.path.join(studies, "labels", "final", f"{MISMATCHED}.nii.gz"), np.zeros((10, 11, 12), np.uint8), np.eye(4))
    srv = Server(studies, str(work)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server, tmp_path):
    from monailabel.client import MONAILabelClient

    # A private tmpdir: the client otherwise writes results to the server's own temp file name.
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def test_info_lists_app_models_and_unreadable_studies(client, server):
    info = client.info()
    assert info["name"] == "Label Sentinel"
    assert "segmentation" in info["models"]
    assert "segmentation" in info["trainers"]
    assert {"random", "first"} <= set(info["strategies"])
    # info["labels"]: names in id order, a list as OHIF's MONAI Label panel needs; the model keeps name -> id.
    assert info["models"]["segmentation"]["labels"]["liver"] == 5 and info["models"]["segmentation"]["labels"]["aorta"] == 52
    assert isinstance(info["labels"], list) and info["labels"][4] == "liver" and info["labels"][-1] == "inferior_vena_cava"
    bad = info["labelsentinel"]["unreadable_images"]
    assert set(bad) == set(CORRUPT)
    assert "truncated.nii.gz" in bad["truncated"] and "cannot be read" in bad["truncated"]
    log = server.log()
    assert "truncated.nii.gz" in log and "garbage.nii.gz" in log  # the log names the files and why
    # start-up's objects are out of the garbage collector's reach (no full-heap pauses inside requests)
    frozen = re.search(r"start-up objects frozen for the garbage collector: (\d+)", log)
    assert frozen and int(frozen.group(1)) > 100_000, log[-2000:]


def test_next_sample_serves_only_readable_unlabeled_cases(server, tmp_path):
    from monailabel.client import MONAILabelClient

    from labelsentinel.store import Store, store_path

    def ask(strategy, who, **params):  # each annotator's own client, as each Slicer has (its client_id)
        return MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id=who).next_sample(strategy, params)

    # MONAI Label's random and first orders, with leases: 5 annotators, 3 readable unlabeled cases. Each of
    # the first 3 gets a different case; the other 2 are told why they get none, not handed an open case.
    answers = [ask("random", f"annotator-{i}") for i in range(5)]
    served = [a["id"] for a in answers if a.get("id")]
    assert sorted(served) == sorted(UNLABELED_OK), answers
    assert [a["client_id"] for a in answers[:3]] == ["annotator-0", "annotator-1", "annotator-2"]
    for a in answers[3:]:
        assert not a.get("id") and "out with other annotators" in a["reason"], a
    assert ask("first", None).get("id", "") == ""  # all 3 are out
    # annotator-0 asks again without saving: nothing else is free, so its own case comes back to it ...
    mine = answers[0]["id"]
    assert ask("first", "annotator-0")["id"] == mine
    # ... and again with a lease of 0.06 s, which runs out at once: the case is free for the others
    ask("first", "annotator-0", lease_minutes=0.001)
    time.sleep(0.2)
    got = ask("first", "annotator-3")
    assert got["id"] == mine, got
    store = Store(store_path(server.studies))
    assert store.leases()[mine]["client_id"] == "annotator-3"
    for cid in UNLABELED_OK:  # the annotators are done: the later tests start with every case free
        store.release_lease(cid)


def test_infer_returns_a_label_on_the_image_grid(client, server):
    t0 = time.time()
    label_file, params = client.infer("segmentation", "case_003", {})
    seconds = time.time() - t0
    img = nib.load(os.path.join(server.studies, "case_003.nii.gz"))
    pred = nib.load(label_file)
    assert pred.shape == img.shape
    assert np.allclose(pred.affine, img.affine, atol=1e-3)
    values = set(np.unique(np.asarray(pred.dataobj)).astype(int))
    assert values <= {0, 1, 2, 3, 4, 5, 6, 52, 63}
    assert params["label_names"]["liver"] == 5
    # The shipped weights segment the large structures of an unseen phantom.
    truth = np.asarray(nib.load(os.path.join(server.studies, "truth", "case_003.nii.gz")).dataobj)
    p = np.asarray(pred.dataobj)
    liver = 2 * np.sum((p == 5) & (truth == 5)) / (np.sum(p == 5) + np.sum(truth == 5))
    assert liver > 0.8, f"liver Dice {liver:.3f}"
    print(f"infer on case_003: {seconds:.2f} s, liver Dice {liver:.3f}")
    # The real CT (another size, spacing and orientation) comes back on its own grid too.
    label_file, _ = client.infer("segmentation", "totalseg_ct", {})
    ct = nib.load(os.path.join(server.studies, "totalseg_ct.nii.gz"))
    assert nib.load(label_file).shape == ct.shape


def test_infer_bad_inputs_give_clear_errors(client, server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as e:
        client.infer("segmentation", "truncated", {})
    assert "truncated.nii.gz" in str(e.value)
    wrong = str(tmp_path / "wrong.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((7, 8, 9), np.uint8), np.eye(4)), wrong)
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("segmentation", "case_003", {}, label_in=wrong)
    msg = str(e.value)
    assert "(7, 8, 9)" in msg and "(96, 80, 48)" in msg and "422" in msg
    assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200  # still serving


def test_a_final_label_that_cannot_be_used_is_refused_not_saved(client, server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    wrong = str(tmp_path / "wrong.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((7, 8, 9), np.uint8), np.eye(4)), wrong)
    garbage = str(tmp_path / "garbage.nii.gz")
    with open(garbage, "wb") as f:
        f.write(b"not a nifti file at all" * 10)
    for path, words in ((wrong, ("7 x 8 x 9", "96 x 80 x 48")), (garbage, ("cannot be read",))):
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label("case_003", path, tag="final")
        msg = str(e.value)
        assert "422" in msg and "NOT saved" in msg and all(w in msg for w in words), msg
    assert not os.path.exists(os.path.join(server.studies, "labels", "final", "case_003.nii.gz"))
    assert "final" not in client.datastore()["objects"]["case_003"]["labels"]
    assert "case_003" in requests.get(f"{server.url}/datastore/?output=all", timeout=10).json()["objects"]


def test_save_final_label_and_read_datastore(client, server):
    truth = os.path.join(server.studies, "truth", "case_004.nii.gz")
    client.save_label("case_004", truth, tag="final", params={"label_info": [{"name": "liver", "idx": 5}]})
    ds = client.datastore()
    obj = ds["objects"]["case_004"]
    assert "final" in obj["labels"] and "original" in obj["labels"]
    saved = os.path.join(server.studies, "labels", "final", "case_004.nii.gz")
    with open(saved, "rb") as a, open(truth, "rb") as b:
        assert a.read() == b.read()
    served = {client.next_sample("random", {"client_id": f"x{i}"})["id"] for i in range(10)}
    assert "case_004" not in served
    stats = requests.get(f"{server.url}/datastore/?output=stats", timeout=10).json()
    assert stats["label_tags"]["final"] >= 5


def test_bad_training_options_are_refused_before_a_run(server):
    bad = {"pseudo_labels": "bogus", "max_epochs": 0, "lr": "fast", "refurbish": "maybe", "pseudo_alpha": 2}
    for run_sync in ("true", "false"):
        r = requests.post(f"{server.url}/train/segmentation?run_sync={run_sync}", json=bad, timeout=30)
        assert r.status_code == 422, (r.status_code, r.text)
        detail = r.json()["detail"]
        for words in ("pseudo_labels must be one of lower_bound, threshold, topk, none; got 'bogus'",
                      "max_epochs must be >= 1", "lr must be a finite number", "refurbish must be true or false",
                      "pseudo_alpha must be > 0 and <= 0.5"):
            assert words in detail, detail
    r = requests.post(f"{server.url}/train/nosuchmodel", json={}, timeout=30)
    assert r.status_code == 404 and "segmentation" in r.json()["detail"], r.text
    st = requests.get(f"{server.url}/train/", timeout=10)  # nothing was queued
    assert st.status_code == 404 or st.json().get("status") in (None, "DONE", "ERROR"), st.text


def test_training_runs_and_skips_a_mismatched_label(client, server):
    # the trainer's default options (no "tracking" given: MONAI Label's MLflow default failed with mlflow 3);
    # max_epochs as a panel sends it, a string
    client.train_start("segmentation", {"max_epochs": "1", "val_split": "0", "dataset": "Dataset"})
    t_end = time.time() + 600
    while time.time() < t_end:
        st = client.train_status()
        if st.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert st.get("status") == "DONE", f"training ended as {st.get('status')}:\n{server.log()[-3000:]}"
    with open(os.path.join(server.model_dir, "segmentation", "train_refused.json")) as f:
        refused = json.load(f)["refused"]
    assert len(refused) == 1 and MISMATCHED in refused[0]["label"]
    assert "(10, 11, 12)" in refused[0]["error"] and "(96, 80, 48)" in refused[0]["error"]
    assert os.path.exists(os.path.join(server.model_dir, "segmentation.pt"))
    assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200
