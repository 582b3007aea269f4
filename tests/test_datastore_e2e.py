"""The local datastore under annotation traffic: crash safety of datastore_v2.json, checks of every upload (ids,
tags, images, labels, grids), one current file per label, Slicer's label_info, unreadable labels.

The HTTP behaviours are driven through the real `monailabel start_server` process (MONAILabelClient, the client
3D Slicer uses, where Slicer would call it); the atomic write is checked in-process on SentinelDatastore."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import APP, Server

pytestmark = pytest.mark.server

APP_IDS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
           "aorta": 52, "inferior_vena_cava": 63}


def _datastore_class():
    sys.path.insert(0, APP)
    try:
        from lib.datastore import SentinelDatastore
    finally:
        sys.path.remove(APP)
    return SentinelDatastore


@pytest.fixture(scope="module")
def studies_src(tmp_path_factory):
    """5 phantoms, no real CT: final labels for case_000..002, case_003 and case_004 unlabelled."""
    from labelsentinel.sampledata import generate

    out = str(tmp_path_factory.mktemp("ds-src") / "studies")
    generate(out, cases=5, seed=0, real_ct=False, progress=False)
    return out


def _truncate(src: str, dst: str, keep: float = 1 / 3) -> None:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def server(studies_src, tmp_path_factory):
    work = tmp_path_factory.mktemp("ds-e2e")
    studies = str(work / "studies")
    shutil.copytree(studies_src, studies)
    final = os.path.join(studies, "labels", "final")
    # unreadable labels put on disk by hand: a truncated and a non-integer final label, a zero-byte pseudo-label
    _truncate(os.path.join(studies, "labels", "original", "case_003.nii.gz"), os.path.join(final, "case_003.nii.gz"))
    img = nib.load(os.path.join(studies, "case_004.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(img.shape, 1.5, np.float32), img.affine), os.path.join(final, "case_004.nii.gz"))
    open(os.path.join(studies, "labels", "original", "case_000.nii.gz"), "wb").close()
    # an image that cannot be read
    _truncate(os.path.join(studies, "case_000.nii.gz"), os.path.join(studies, "broken.nii.gz"))
    # a store write waits 3 s for another process's write lock (default 30 s), for the locked-store test
    srv = Server(studies, str(work), env={"LABELSENTINEL_STORE_TIMEOUT": "3"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server, tmp_path):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def _put_image(server, image_id, path, filename=None):
    with open(path, "rb") as f:
        return requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                            files={"file": (filename or os.path.basename(path), f)}, data={"params": "{}"}, timeout=60)


def _put_label(server, image_id, path, tag="final", params=None, filename=None):
    with open(path, "rb") as f:
        return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                            files={"label": (filename or os.path.basename(path), f)},
                            data={"params": json.dumps(params or {})}, timeout=60)


def _objects(server):
    return requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]


def _label_on(image_path, out, affine=None, values=(1,), dtype=np.uint8):
    img = nib.load(image_path)
    arr = np.zeros(img.shape, dtype)
    for k, v in enumerate(values):
        arr[10 + 8 * k: 16 + 8 * k, 20:40, 10:30] = v
    nib.save(nib.Nifti1Image(arr, img.affine if affine is None else affine), out)
    return out, arr


# ------------------------------------------------------------------------------------------ defect: unreadable labels
def test_unreadable_labels_are_listed_and_their_cases_served_again(server, tmp_path):
    from monailabel.client import MONAILabelClient

    assert "case_004.nii.gz" in server.log() and "label file(s) cannot be read" in server.log()
    # an unreadable final label does not make its case labelled: both are served again (never the broken image)
    stats = requests.get(f"{server.url}/datastore/?output=stats", timeout=30).json()
    assert stats["completed"] == 3, stats  # case_000..002
    served = set()
    for i in range(6):
        got = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id=f"annot-{i}").next_sample("first", {})
        if got.get("id"):
            served.add(got["id"])
    assert served == {"case_003", "case_004"}, served
    from labelsentinel.store import Store, store_path

    for cid in served:
        Store(store_path(server.studies)).release_lease(cid)
    # listed with the reason where the unreadable images are
    bad = requests.get(f"{server.url}/info/", timeout=30).json()["labelsentinel"]["unreadable_labels"]
    assert set(bad) == {"case_003/final", "case_004/final", "case_000/original"}, bad
    assert "cannot be read" in bad["case_003/final"] and "case_003.nii.gz" in bad["case_003/final"]
    assert "integers" in bad["case_004/final"]
    # not sent to a viewer as it is (Slicer failed on the broken file without a reason): 422 with the reason
    for cid, tag in (("case_003", "final"), ("case_004", "final"), ("case_000", "original")):
        r = requests.get(f"{server.url}/datastore/label", params={"label": cid, "tag": tag}, timeout=30)
        assert r.status_code == 422 and "cannot be read" in r.json()["detail"], (cid, tag, r.status_code, r.text[:300])
    r = requests.get(f"{server.url}/datastore/label", params={"label": "case_002", "tag": "final"}, timeout=30)
    assert r.status_code == 200 and len(r.content) > 1000  # a readable label is sent as before
    # and where the project lead looks
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "labelsentinel.cli", "status", "--server", server.url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unreadable label: case_003/final:" in r.stdout and "unreadable label: case_004/final:" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------ defect: off-grid labels
def test_a_label_off_the_image_grid_is_refused_and_one_on_it_kept(client, server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    image = os.path.join(server.studies, "case_001.nii.gz")
    saved = os.path.join(server.studies, "labels", "final", "case_001.nii.gz")
    with open(saved, "rb") as f:
        before = f.read()
    aff = nib.load(image).affine
    moved = aff.copy()
    moved[:3, 3] += [50, 0, 0]
    finer = aff @ np.diag([0.5, 1, 1, 1])
    for affine, words in ((moved, "origin moved 50 mm"), (finer, "other spacing")):
        path, _ = _label_on(image, str(tmp_path / "off.nii.gz"), affine)
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label("case_001", path, tag="final")
        msg = str(e.value)
        assert "422" in msg and "NOT saved" in msg and words in msg, msg
        img_origin = ", ".join(f"{o:.4g}" for o in aff[:3, 3])
        lab_origin = ", ".join(f"{o:.4g}" for o in affine[:3, 3])
        assert f"origin ({img_origin})" in msg and f"origin ({lab_origin})" in msg, msg
        assert "spacing (" in msg
        with open(saved, "rb") as f:
            assert f.read() == before  # the annotator's earlier label is untouched
    path, arr = _label_on(image, str(tmp_path / "on.nii.gz"))
    res = client.save_label("case_001", path, tag="final")
    assert res["label"] == "case_001"
    assert np.array_equal(np.asarray(nib.load(saved).dataobj), arr)


# ------------------------------------------------------------------------------------------ defect: unknown images
def test_a_label_for_an_unknown_or_deleted_image_is_404(server, tmp_path):
    label, _ = _label_on(os.path.join(server.studies, "case_000.nii.gz"), str(tmp_path / "l.nii.gz"))
    r = _put_label(server, "no_such_image", label)
    assert r.status_code == 404 and "no_such_image" in r.json()["detail"], r.text
    assert not glob.glob(os.path.join(server.studies, "labels", "*", "no_such_image*"))
    # an image uploaded, then deleted twice, then labelled
    r = _put_image(server, "to_delete", os.path.join(server.studies, "case_000.nii.gz"))
    assert r.status_code == 200, r.text
    r = requests.delete(f"{server.url}/datastore/image", params={"id": "to_delete"}, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.delete(f"{server.url}/datastore/image", params={"id": "to_delete"}, timeout=30)
    assert r.status_code == 404 and "to_delete" in r.json()["detail"], r.text
    r = _put_label(server, "to_delete", label)
    assert r.status_code == 404 and "to_delete" in r.json()["detail"], r.text
    r = requests.delete(f"{server.url}/datastore/label", params={"id": "case_003", "tag": "nosuchtag"}, timeout=30)
    assert r.status_code == 404, r.text
    assert "Traceback" not in server.log().split("to_delete")[-1]


# ------------------------------------------------------------------------------------------ defect: replacing an image
def test_uploading_an_existing_image_id_is_refused_and_changes_nothing(server, tmp_path):
    studies = server.studies
    img_path = os.path.join(studies, "case_002.nii.gz")
    with open(img_path, "rb") as f:
        before = f.read()
    labels_before = _objects(server)["case_002"]["labels"]
    r = _put_image(server, "case_002", os.path.join(studies, "case_001.nii.gz"))
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "case_002" in detail and "delete it first" in detail, detail
    with open(img_path, "rb") as f:
        assert f.read() == before
    assert set(_objects(server)["case_002"]["labels"]) == set(labels_before)
    # label files left on disk under a new id (no image) are not adopted by a new image of that id: moved aside
    stray = os.path.join(studies, "labels", "final", "newcomer.nii.gz")
    shutil.copyfile(os.path.join(studies, "labels", "final", "case_000.nii.gz"), stray)
    r = _put_image(server, "newcomer", os.path.join(studies, "case_001.nii.gz"))
    assert r.status_code == 200, r.text
    time.sleep(1.5)  # the file watcher's turn
    assert not os.path.exists(stray)
    assert glob.glob(os.path.join(studies, ".labelsentinel", "label-history", "final", "newcomer.*.nii.gz"))
    assert "final" not in _objects(server)["newcomer"]["labels"]


# ------------------------------------------------------------------------------------------ defect: two extensions
def test_a_label_saved_with_another_extension_leaves_one_current_file(client, server, tmp_path):
    final = os.path.join(server.studies, "labels", "final")
    image = os.path.join(server.studies, "case_000.nii.gz")
    assert os.listdir(final).count("case_000.nii.gz") == 1
    path, arr = _label_on(image, str(tmp_path / "corrected.nii"), values=(5, 52))
    client.save_label("case_000", path, tag="final")
    mine = sorted(f for f in os.listdir(final) if f.startswith("case_000."))
    assert mine == ["case_000.nii"], mine
    assert np.array_equal(np.asarray(nib.load(os.path.join(final, "case_000.nii")).dataobj), arr)
    kept = glob.glob(os.path.join(server.studies, ".labelsentinel", "label-history", "final", "case_000.*.nii.gz"))
    assert len(kept) == 1  # the older label is kept aside, not deleted
    assert _objects(server)["case_000"]["labels"]["final"]["ext"] == ".nii"
    r = requests.get(f"{server.url}/datastore/label", params={"label": "case_000", "tag": "final"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('case_000.nii"'), r.headers


def test_a_final_label_saved_over_another_keeps_it_and_says_whose_it_was(server, tmp_path):
    """Two annotators save a final label for the same case (one had it out, served by `quality`): MONAI Label
    overwrote the first one's file. The first is kept in the label history byte for byte, the answer to the
    second says whose label it replaced and that the case was out with the other, and the label served is the
    second one's. A re-submit by the same annotator replaces without a warning (and is kept too)."""
    from monailabel.client import MONAILabelClient

    alice = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="alice")
    bob = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="bob")
    image = os.path.join(server.studies, "case_001.nii.gz")
    hist = os.path.join(server.studies, ".labelsentinel", "label-history", "final")
    before = set(glob.glob(os.path.join(hist, "case_001.*")))
    a_path, a_arr = _label_on(image, str(tmp_path / "alice.nii.gz"), values=(5,))
    b_path, b_arr = _label_on(image, str(tmp_path / "bob.nii.gz"), values=(6, 52))
    res_a = alice.save_label("case_001", a_path, tag="final")  # over the demo's final label (no client id)
    assert res_a["replaced"]["client_id"] is None and len(res_a["warnings"]) == 1, res_a
    assert "replaced the one an annotator saved" in res_a["warnings"][0]
    with open(os.path.join(server.studies, "labels", "final", "case_001.nii.gz"), "rb") as f:
        alice_bytes = f.read()
    mid = set(glob.glob(os.path.join(hist, "case_001.*")))
    # alice has the case out again (the lease next_sample takes, written to the server's store), and bob saves
    # his label over hers
    from labelsentinel.store import Store, store_path

    Store(store_path(server.studies)).acquire_lease("case_001", "alice", ttl=600, strategy="quality")
    res_b = bob.save_label("case_001", b_path, tag="final")
    assert res_b["replaced"]["client_id"] == "alice", res_b
    text = " ".join(res_b.get("warnings") or [])
    assert "was out with alice" in text and "replaced the one alice saved" in text, res_b
    kept = os.path.join(server.studies, res_b["replaced"]["history"])
    assert set(glob.glob(os.path.join(hist, "case_001.*"))) - mid == {kept}
    with open(kept, "rb") as f:
        assert f.read() == alice_bytes  # alice's work is not lost
    served = bob.download_label("case_001", "final")
    assert np.array_equal(np.asarray(nib.load(served).dataobj), b_arr)
    # bob saves again: no warning (his own label), his first one kept as well
    res_b2 = bob.save_label("case_001", b_path, tag="final")
    assert res_b2["replaced"]["client_id"] == "bob" and not res_b2.get("warnings"), res_b2
    assert len(set(glob.glob(os.path.join(hist, "case_001.*"))) - before) == 3  # demo's, alice's, bob's first


def test_a_locked_record_store_answers_503_with_the_reason_and_serves_again_after(server):
    """Another process (a sqlite3 shell, a script) holds the record store's write lock: next sample answered a
    bare 500 after a minute (two 30 s waits). It now answers 503 naming the store, after the store's wait
    (3 s here), and serves normally once the lock is gone."""
    import sqlite3

    from labelsentinel.store import store_path

    con = sqlite3.connect(store_path(server.studies), isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.time()
        r = requests.post(f"{server.url}/activelearning/random", json={"client_id": "carol"}, timeout=120)
        waited = time.time() - t0
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert r.status_code == 503, (r.status_code, r.text)
    assert "record store" in r.json()["detail"] and "locked" in r.json()["detail"]
    assert waited < 15, waited
    r = requests.post(f"{server.url}/activelearning/random", json={"client_id": "carol"}, timeout=60)
    assert r.status_code == 200 and r.json().get("id"), r.text


# ------------------------------------------------------------------------------------------ defect: path traversal
@pytest.mark.parametrize("bad", ["../../tmp/evil", "..", "a/b", "a\\b", "x\x00y", ".hidden", "x..y", "a  b", " ab", "ab ", "a\tb", "/abs"])
def test_unsafe_ids_and_tags_are_refused_and_nothing_is_written(server, tmp_path, bad):
    root = os.path.dirname(os.path.dirname(server.studies))
    before = {p for p in glob.glob(os.path.join(root, "**"), recursive=True)}
    src = os.path.join(server.studies, "case_001.nii.gz")
    r = _put_image(server, bad, src)
    assert r.status_code == 422, (bad, r.status_code, r.text)
    assert "not allowed" in r.json()["detail"]
    label, _ = _label_on(src, str(tmp_path / "l.nii.gz"))
    r = _put_label(server, "case_001", label, tag=bad)
    assert r.status_code == 422, (bad, r.status_code, r.text)
    r = _put_label(server, bad, label)
    assert r.status_code == 422, (bad, r.status_code, r.text)
    r = requests.delete(f"{server.url}/datastore/image", params={"id": bad}, timeout=30)
    assert r.status_code == 422, (bad, r.status_code, r.text)
    after = {p for p in glob.glob(os.path.join(root, "**"), recursive=True)}
    mine = os.path.realpath(tmp_path)
    new = {p for p in after - before if not p.endswith(".log") and ".labelsentinel" not in p
           and not os.path.realpath(p).startswith(mine)}
    assert not new, new
    assert not os.path.exists("/tmp/evil.nii.gz") or os.path.getmtime("/tmp/evil.nii.gz") < time.time() - 3600


def test_real_ids_are_accepted(server, client, tmp_path):
    src = os.path.join(server.studies, "case_001.nii.gz")
    for good in ("1.2.840.113619.2.55.3.604688119.868.1234567890.123", "Case-A_01.v2", "Patient 01"):
        r = _put_image(server, good, src)
        assert r.status_code == 200 and r.json()["image"] == good, r.text
        assert os.path.isfile(os.path.join(server.studies, good + ".nii.gz"))
    # a file name with a space (as a study exported by hand): labels saved and read back through the client
    label, arr = _label_on(src, str(tmp_path / "l.nii.gz"), values=(5,))
    client.save_label("Patient 01", label, tag="final")
    stored = os.path.join(server.studies, "labels", "final", "Patient 01.nii.gz")
    assert np.array_equal(np.asarray(nib.load(stored).dataobj), arr)
    assert _objects(server)["Patient 01"]["labels"]["final"]["ext"] == ".nii.gz"
    r = requests.get(f"{server.url}/datastore/label", params={"label": "Patient 01", "tag": "final"}, timeout=30)
    assert r.status_code == 200 and r.content == open(stored, "rb").read()


# ------------------------------------------------------------------------------------------ defect: Slicer label_info
def test_a_slicer_save_stores_the_apps_label_ids(client, server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    image = os.path.join(server.studies, "case_002.nii.gz")
    # Slicer: segments exported with values 1..N in segment order, label_info [{"name", "idx": position + 1}]
    segments = ["liver", "aorta", "spleen"]
    path, arr = _label_on(image, str(tmp_path / "slicer.nii.gz"), values=(1, 2, 3))
    label_info = [{"name": n, "idx": i + 1} for i, n in enumerate(segments)]
    res = client.save_label("case_002", path, tag="final", params={"label_info": label_info})
    assert res["label"] == "case_002"
    stored = np.asarray(nib.load(os.path.join(server.studies, "labels", "final", "case_002.nii.gz")).dataobj)
    expected = np.zeros_like(arr)
    for i, n in enumerate(segments):
        expected[arr == i + 1] = APP_IDS[n]
    assert np.array_equal(stored, expected)
    assert set(np.unique(stored)) == {0, 5, 52, 1}
    info = _objects(server)["case_002"]["labels"]["final"]["info"]
    assert info["label_info"] == [{"name": n, "idx": APP_IDS[n]} for n in segments]
    # a name the app does not know: 422 naming it, nothing changes
    with open(os.path.join(server.studies, "labels", "final", "case_002.nii.gz"), "rb") as f:
        before = f.read()
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("case_002", path, tag="final",
                          params={"label_info": [{"name": "liver", "idx": 1}, {"name": "Segment_2", "idx": 2},
                                                 {"name": "spleen", "idx": 3}]})
    assert "422" in str(e.value) and "Segment_2" in str(e.value), str(e.value)
    with open(os.path.join(server.studies, "labels", "final", "case_002.nii.gz"), "rb") as f:
        assert f.read() == before
    # no label_info: stored as sent
    path2, _ = _label_on(image, str(tmp_path / "plain.nii.gz"), values=(5, 6))
    client.save_label("case_002", path2, tag="final")
    with open(os.path.join(server.studies, "labels", "final", "case_002.nii.gz"), "rb") as a, open(path2, "rb") as b:
        assert a.read() == b.read()


# ------------------------------------------------------------------------------------------ defect: unreadable images
def test_unreadable_images_are_refused_at_upload(server, tmp_path):
    src = os.path.join(server.studies, "case_001.nii.gz")
    aff = nib.load(src).affine
    cases = {}
    _truncate(src, str(tmp_path / "trunc.nii.gz"))
    cases["trunc"] = (str(tmp_path / "trunc.nii.gz"), "cannot be read")
    open(tmp_path / "zero.nii.gz", "wb").close()
    cases["zero"] = (str(tmp_path / "zero.nii.gz"), "cannot be read")
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    cases["flat"] = (str(tmp_path / "flat.nii.gz"), "3D")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), aff), str(tmp_path / "four.nii.gz"))
    cases["four"] = (str(tmp_path / "four.nii.gz"), "3D")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), str(tmp_path / "nan.nii.gz"))
    cases["nan"] = (str(tmp_path / "nan.nii.gz"), "NaN")
    for image_id, (path, words) in cases.items():
        r = _put_image(server, image_id, path)
        assert r.status_code == 422, (image_id, r.status_code, r.text)
        detail = r.json()["detail"]
        assert image_id in detail and words in detail and "NOT added" in detail, detail
        assert not glob.glob(os.path.join(server.studies, image_id + ".*"))
    assert not set(cases) & set(_objects(server))
    # a label for an image on disk that cannot be read: refused with the image's problem
    label, _ = _label_on(src, str(tmp_path / "l.nii.gz"))
    r = _put_label(server, "broken", label)
    assert r.status_code == 422 and "broken.nii.gz" in r.json()["detail"] and "cannot be read" in r.json()["detail"], r.text
    assert not glob.glob(os.path.join(server.studies, "labels", "final", "broken.*"))


# ------------------------------------------------------------------------------------------ defect: crash-safe JSON
def test_an_unreadable_datastore_json_at_start_is_kept_aside_and_rebuilt(studies_src, tmp_path):
    studies = str(tmp_path / "studies")
    shutil.copytree(studies_src, studies)
    config = os.path.join(studies, "datastore_v2.json")
    # what a kill -9 in the middle of MONAI Label's open("w") + json dump leaves
    with open(config, "w") as f:
        f.write('{\n  "name": "new-dataset",\n  "description": "New Dataset",\n  "images_dir": ".",\n  "objects": {\n    "case_0')
    # and two final labels of one case, the newer one (the annotator's correction) with another extension
    final = os.path.join(studies, "labels", "final")
    img = nib.load(os.path.join(studies, "case_001.nii.gz"))
    corrected = np.asarray(nib.load(os.path.join(final, "case_001.nii.gz")).dataobj).copy()
    corrected[corrected == 5] = 0
    os.utime(os.path.join(final, "case_001.nii.gz"), (time.time() - 600, time.time() - 600))
    nib.save(nib.Nifti1Image(corrected, img.affine), os.path.join(final, "case_001.nii"))
    on_disk = {t: sorted(f for f in os.listdir(os.path.join(studies, "labels", t))) for t in ("final", "original")}

    srv = Server(studies, str(tmp_path)).start()
    try:
        objects = _objects(srv)
        log = srv.log()
    finally:
        srv.stop()
    assert set(objects) == {f"case_00{i}" for i in range(5)}
    for tag in ("final", "original"):
        listed = sorted(k + v["labels"][tag]["ext"] for k, v in objects.items() if tag in v["labels"])
        expected = [f for f in on_disk[tag] if tag != "final" or f != "case_001.nii.gz"]
        assert listed == expected, (tag, listed, expected)
    assert objects["case_001"]["labels"]["final"]["ext"] == ".nii"  # the correction, not the older label
    kept = glob.glob(config + ".unreadable-*")
    assert len(kept) == 1 and open(kept[0]).read().endswith('"case_0')
    assert json.load(open(config))["objects"]  # a new, complete file
    assert "cannot be read" in log and os.path.basename(kept[0]) in log and "rebuilt" in log
    assert glob.glob(os.path.join(studies, ".labelsentinel", "label-history", "final", "case_001.*.nii.gz"))
    assert sorted(os.listdir(final)) == ["case_000.nii.gz", "case_001.nii", "case_002.nii.gz"]


def test_an_empty_datastore_json_is_rebuilt_in_process(studies_src, tmp_path, caplog):
    SentinelDatastore = _datastore_class()
    studies = str(tmp_path / "studies")
    shutil.copytree(studies_src, studies)
    config = os.path.join(studies, "datastore_v2.json")
    open(config, "w").close()
    with caplog.at_level(logging.WARNING):
        ds = SentinelDatastore(studies, auto_reload=False)
    assert sorted(ds.list_images()) == [f"case_00{i}" for i in range(5)]
    assert sorted(ds.get_labeled_images()) == ["case_000", "case_001", "case_002"]
    assert sorted(glob.glob(config + ".unreadable-*")) and os.path.getsize(glob.glob(config + ".unreadable-*")[0]) == 0
    assert any("cannot be read" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)


def test_datastore_json_is_never_seen_empty_or_partial_while_written(studies_src, tmp_path):
    """A reader (or a kill -9 at any moment) sees the old or the new file, never a truncated one."""
    SentinelDatastore = _datastore_class()
    studies = str(tmp_path / "studies")
    shutil.copytree(studies_src, studies)
    ds = SentinelDatastore(studies, auto_reload=False)
    config = os.path.join(studies, "datastore_v2.json")
    # a big file makes each write slow, as on a real datastore of thousands of studies
    for i in ds.list_images():
        ds._datastore.objects[i].image.info["history"] = [{"client": f"annotator-{k}", "ts": k} for k in range(3000)]
    stop = threading.Event()
    bad, reads = [], [0]

    def reader():
        while not stop.is_set():
            try:
                with open(config) as f:
                    text = f.read()
                json.loads(text)
                reads[0] += 1
            except FileNotFoundError:
                bad.append("missing")
            except ValueError:
                bad.append(len(text))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(40):
            ds._update_datastore_file()
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} of {len(bad) + reads[0]} reads saw a broken file (sizes {bad[:5]})"
    assert reads[0] > 10
    assert not [f for f in os.listdir(studies) if f.endswith(".part")]  # no temp file left behind
