"""DICOMweb defects fixed, each against a real Orthanc and a real server:

- `labelsentinel run-dicom` restarted with the same --orthanc-dir and --cache finds its pseudo-labels and their
  scores again (Orthanc keeps its ports; the cache is the same), imports the demo's final labels, and a restart
  neither replaces an imported pseudo-label nor stores a second SEG;
- a PACS that caps its QIDO answers per page and honours ``offset`` still gives the whole case list;
- an unknown series, or one outside the server's filter (MR in a CT server), answers 404 and nothing is written
  to the PACS;
- a series with missing slices is refused with the gap named (422), not served on a stretched grid;
- series and SEGs added to the PACS after the start are seen within LABELSENTINEL_DICOMWEB_REFRESH seconds, and
  `import-labels --image UID` works at once;
- no NIfTI is left in the server's temp folder per series fetched or label save refused;
- the demographics query uses the server's DICOMweb credentials and says clearly when the PACS is down.

Ports 8713-8719 on 127.0.0.1. One Orthanc and one server at a time: the run-dicom test (its own Orthanc and
server) runs first, before the module's shared Orthanc and server are started.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import REPO, Server

DICOM_DIR = os.path.join(REPO, "sample-apps", "totalseg-dicom")
SERIES_DIR = os.path.join(DICOM_DIR, "series")
RUN_PORT, RUN_ORTHANC, RUN_ORTHANC_DICOM = 8713, 8714, 8715
PACS_PORT, PACS_DICOM, SERVER_PORT = 8716, 8717, 8718
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _env():
    return dict(os.environ, PYTHONPATH=REPO)


def _cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), cwd=REPO)


def _until(fn, what, timeout=180, step=1.0):
    t_end = time.time() + timeout
    while time.time() < t_end:
        v = fn()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout} s")


def _studies(path, cases=2, seed=5):
    from labelsentinel.sampledata import generate

    generate(str(path), cases=cases, seed=seed, real_ct=False, progress=False)
    return str(path)


# ------------------------------------------------------------------------------------------ run-dicom restart
class _RunDicom:
    def __init__(self, studies, orthanc_dir, cache, log, *extra):
        self.log = log
        self._f = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labelsentinel.cli", "run-dicom", "--studies", studies, "--port", str(RUN_PORT),
             "--orthanc-dir", orthanc_dir, "--cache", cache, *extra], stdout=self._f, stderr=subprocess.STDOUT,
            env=_env(), cwd=REPO, start_new_session=True)

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_ready(self, since=0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"run-dicom exited {self.proc.returncode}:\n{self.text()[-4000:]}")
            return "Press Ctrl-C to stop." in self.text()[since:]
        _until(ready, "run-dicom ready", 420)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._f.close()


def _record(url, image):
    q = requests.get(f"{url}/labelsentinel/quality", timeout=60).json()
    return next((r for r in q["records"] if r["image_id"] == image and r["tag"] == "original"), None)


def _seg_count(orthanc_url):
    r = requests.get(f"{orthanc_url}/series", params={"expand": ""}, timeout=60)
    return sum(1 for s in r.json() if s["MainDicomTags"].get("Modality") == "SEG")


def test_run_dicom_restart_keeps_pseudo_labels_scores_and_finals(tmp_path):
    from labelsentinel.dicom import uid_for

    studies = _studies(tmp_path / "studies")
    orthanc_dir, cache, log = str(tmp_path / "orthanc"), str(tmp_path / "cache"), str(tmp_path / "run-dicom.log")
    url = f"http://127.0.0.1:{RUN_PORT}"
    uid = uid_for(0, "case_001", "series")  # run-dicom's UIDs (seed 0)
    finals = sorted(os.path.basename(p).split(".nii")[0] for p in glob.glob(os.path.join(studies, "labels", "final", "*")))
    assert finals
    # my own pseudo-label for case_001: its demo original with the upper half of the slices cleared
    src = nib.load(os.path.join(studies, "labels", "original", "case_001.nii.gz"))
    mine = np.asarray(src.dataobj).astype(np.uint8)
    mine[:, :, mine.shape[2] // 2:] = 0
    mine_path = str(tmp_path / "mine.nii.gz")
    nib.save(nib.Nifti1Image(mine, src.affine), mine_path)

    run = _RunDicom(studies, orthanc_dir, cache, log, "--orthanc-port", str(RUN_ORTHANC),
                    "--orthanc-dicom-port", str(RUN_ORTHANC_DICOM))
    try:
        run.wait_ready()
        out = run.text()
        assert f"Orthanc (DICOMweb) : http://127.0.0.1:{RUN_ORTHANC}/dicom-web" in out
        assert f"imported {len(finals)} final label(s)" in out, out[-3000:]
        labeled = requests.get(f"{url}/labelsentinel/quality", timeout=60).json()["labeled"]
        assert set(labeled) == {uid_for(0, c, "series") for c in finals}
        segs = _seg_count(f"http://127.0.0.1:{RUN_ORTHANC}")
        assert segs == len(finals)
        t0 = time.time()
        r = _cli("import-labels", "--server", url, mine_path, "--image", uid)
        assert r.returncode == 0, r.stderr
        rec = _until(lambda: (lambda x: x if x and x["ts"] > t0 else None)(_record(url, uid)), "score of my label")
    finally:
        run.stop()

    since = len(open(log, errors="replace").read())
    run = _RunDicom(studies, orthanc_dir, cache, log)  # no port options: the last run's are reused
    try:
        run.wait_ready(since)
        out = run.text()[since:]
        assert f"Orthanc (DICOMweb) : http://127.0.0.1:{RUN_ORTHANC}/dicom-web" in out, out[:2000]
        n_orig = len(glob.glob(os.path.join(studies, "labels", "original", "*")))
        assert f"imported 0 pseudo-label(s) as the `original` tag; {n_orig} already on the server, kept" in out, out[-3000:]
        assert "imported 0 final label(s)" in out, out[-3000:]
        got = requests.get(f"{url}/datastore/label", params={"label": uid, "tag": "original"}, timeout=60)
        assert got.status_code == 200
        p = str(tmp_path / "got.nii.gz")
        with open(p, "wb") as f:
            f.write(got.content)
        assert np.array_equal(np.asarray(nib.load(p).dataobj), mine)  # my label, not the demo's original again
        rec2 = _record(url, uid)
        # the same score, not a new one (calibrated or not: the corrections of the finals may have been recorded
        # in between, which changes the calibrated values only)
        def raw(r):
            return [(x["id"], x.get("raw_predicted_dice", x["predicted_dice"])) for x in r["record"]["structures"]]

        assert rec2 is not None and rec2["label_stamp"] == rec["label_stamp"] and raw(rec2) == raw(rec)
        assert rec2["estimator_version"] == rec["estimator_version"] and rec2["ts"] == rec["ts"]
        assert set(requests.get(f"{url}/labelsentinel/quality", timeout=60).json()["labeled"]) == set(labeled)
        assert _seg_count(f"http://127.0.0.1:{RUN_ORTHANC}") == segs  # no second SEG
    finally:
        run.stop()


# ------------------------------------------------------------------------------- one capped Orthanc + a server
@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from labelsentinel.orthanc import Orthanc, ensure_orthanc_installed

    ensure_orthanc_installed()
    o = Orthanc(str(tmp_path_factory.mktemp("orthanc")), http_port=PACS_PORT, dicom_port=PACS_DICOM).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def loaded(pacs, tmp_path_factory):
    """2 phantom CTs, the real CT (20 slices), the real CT less 3 slices (other UIDs), an MR series."""
    from labelsentinel import dicom

    studies = _studies(tmp_path_factory.mktemp("fix-studies") / "studies")
    series = dicom.upload_studies(studies, pacs.dicomweb_url, seed=11, progress=None)
    real = dicom.load_series(SERIES_DIR, "1.2.826.0.1.3680043.8.498.2001", "1.2.826.0.1.3680043.8.498.2001.1",
                             "real", "M", 62)
    dicom.upload(real.datasets, pacs.dicomweb_url)
    gap_dir = tmp_path_factory.mktemp("gap")
    files = sorted(glob.glob(os.path.join(SERIES_DIR, "*")))
    import pydicom

    zs = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    for f in zs[:5] + zs[8:]:  # slices 6-8 of 20 missing: a 8 mm step where the series has 2 mm
        os.symlink(f, os.path.join(gap_dir, os.path.basename(f)))
    gap = dicom.load_series(str(gap_dir), "1.2.826.0.1.3680043.8.498.2002", "1.2.826.0.1.3680043.8.498.2002.1",
                            "gap", "F", 50)
    for i, d in enumerate(gap.datasets):  # new instance UIDs: the complete series keeps its own
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2002.1.{i + 1}"
    dicom.upload(gap.datasets, pacs.dicomweb_url)
    gap_files = str(tmp_path_factory.mktemp("gap-files"))
    dicom.write_series(gap, gap_files)  # with its UIDs, for dicom-upload
    mr = dicom.nifti_to_series(os.path.join(studies, "case_000.nii.gz"), "mr_case", seed=12)
    for d in mr.datasets:
        d.Modality = "MR"
        d.SOPClassUID = d.file_meta.MediaStorageSOPClassUID = MR_SOP_CLASS
    dicom.upload(mr.datasets, pacs.dicomweb_url)
    return {"studies": studies, "ct": {**{c: s.series_uid for c, s in series.items()}, "real": real.series_uid,
                                       "gap": gap.series_uid}, "mr": mr.series_uid, "gap_dir": gap_files}


@pytest.fixture(scope="module")
def server(pacs, loaded, tmp_path_factory):
    work = tmp_path_factory.mktemp("fix-server")
    tmp = work / "tmp"
    tmp.mkdir()
    srv = Server(pacs.dicomweb_url, str(work), conf={"label_names": os.path.join(loaded["studies"], "label_names.json")},
                 env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"),
                      "LABELSENTINEL_DICOMWEB_REFRESH": "3", "TMPDIR": str(tmp)})
    srv.port = SERVER_PORT
    srv.url = f"http://127.0.0.1:{SERVER_PORT}"
    srv.log_path = os.path.join(str(work), "server.log")
    srv.start()
    srv.tmp = str(tmp)
    yield srv
    srv.stop()


def _put_label(url, image, path, tag="final"):
    with open(path, "rb") as f:
        return requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag},
                            files={"label": ("label.nii.gz", f, "application/gzip")}, data={"params": "{}"}, timeout=300)


def _images(url):
    return set(requests.get(f"{url}/labelsentinel/quality", timeout=60).json()["images"])


def test_case_list_pages_through_a_pacs_that_caps_its_answers():
    """A PACS that answers at most 2 series per query and honours QIDO offset (the DICOMweb standard's paging):
    every series is listed. (Orthanc's own LimitFindResults cannot be paged past: see the report.)"""
    from labelsentinel.dicom import search_series_all

    uids = [f"1.2.3.{i}" for i in range(7)]

    class Capped:
        base_url = "http://pacs"

        def search_for_series(self, search_filters=None, fields=None, offset=0, limit=None):
            return [{"0020000E": {"vr": "UI", "Value": [u]}} for u in uids[offset:offset + min(limit or 2, 2)]]

    assert [js["0020000E"]["Value"][0] for js in search_series_all(Capped(), {"Modality": "CT"})] == uids

    class IgnoresOffset(Capped):
        def search_for_series(self, search_filters=None, fields=None, offset=0, limit=None):
            return super().search_for_series(search_filters, fields, 0, limit)

    warned = []
    assert len(search_series_all(IgnoresOffset(), {}, warn=warned.append)) == 2
    assert warned and "ignores QIDO 'offset'" in warned[0]


def test_server_lists_every_ct_series_and_not_the_mr(server, loaded):
    assert _images(server.url) == set(loaded["ct"].values())


def test_unknown_series_answers_404(server, loaded):
    lab = os.path.join(loaded["studies"], "labels", "original", "case_000.nii.gz")
    assert requests.get(f"{server.url}/datastore/image", params={"image": "1.2.3.4.5"}, timeout=60).status_code == 404
    for tag in ("final", "original"):
        r = _put_label(server.url, "1.2.3.4.5", lab, tag)
        assert r.status_code == 404 and "is not one of this server's images" in r.text, (tag, r.status_code, r.text)


def test_final_label_of_a_series_outside_the_filter_is_refused(server, pacs, loaded):
    lab = os.path.join(loaded["studies"], "labels", "original", "case_000.nii.gz")
    r = _put_label(server.url, loaded["mr"], lab)
    assert r.status_code == 404 and "is not one of this server's images" in r.text, (r.status_code, r.text)
    assert requests.get(f"{server.url}/datastore/image", params={"image": loaded["mr"]}, timeout=60).status_code == 404
    assert not [s for s in pacs.series() if s.get("Modality") == "SEG"]  # nothing written to the PACS


def test_series_with_missing_slices_is_refused_with_the_gap_named(server, pacs, loaded, tmp_path):
    r = requests.get(f"{server.url}/datastore/image", params={"image": loaded["ct"]["gap"]}, timeout=120)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert "not evenly spaced" in detail and "step 2 mm" in detail and "8 mm between" in detail, detail
    assert "about 3 slice(s) missing" in detail and "2.375 mm" in detail, detail
    assert "not evenly spaced" in server.log()  # logged
    info = requests.get(f"{server.url}/info/", timeout=60).json()  # and listed, as unreadable local studies are
    assert "not evenly spaced" in info["labelsentinel"]["unreadable_images"][loaded["ct"]["gap"]]
    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()
    assert loaded["ct"]["gap"] in q["unreadable_images"]
    lab = str(tmp_path / "lab.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), lab)
    r = _put_label(server.url, loaded["ct"]["gap"], lab)
    assert r.status_code == 422 and "not evenly spaced" in r.text, (r.status_code, r.text[:300])
    assert not [s for s in pacs.series() if s.get("Modality") == "SEG"]
    # the complete series is served, on its 2 mm grid
    r = requests.get(f"{server.url}/datastore/image", params={"image": loaded["ct"]["real"]}, timeout=120)
    assert r.status_code == 200
    p = str(tmp_path / "real.nii.gz")
    with open(p, "wb") as f:
        f.write(r.content)
    assert nib.load(p).shape[2] == 20 and abs(nib.load(p).header.get_zooms()[2] - 2.0) < 1e-3
    # dicom-upload warns about such a series
    res = _cli("dicom-upload", "--dicomweb", pacs.dicomweb_url, "--series", loaded["gap_dir"])
    assert res.returncode == 0 and "warning:" in res.stderr and "not evenly spaced" in res.stderr, res.stderr


def test_series_and_segs_added_after_the_start_are_seen_soon(server, pacs, loaded, tmp_path):
    from labelsentinel import dicom

    assert _images(server.url)  # the list is cached now
    new = dicom.nifti_to_series(os.path.join(loaded["studies"], "case_001.nii.gz"), "new_ct", seed=13)
    dicom.upload(new.datasets, pacs.dicomweb_url)
    # at once with --image (the server looks the series up), with an accurate message for a wrong UID
    lab = os.path.join(loaded["studies"], "labels", "original", "case_001.nii.gz")
    r = _cli("import-labels", "--server", server.url, lab, "--image", new.series_uid)
    assert r.returncode == 0, r.stderr
    r = _cli("import-labels", "--server", server.url, lab, "--image", "1.2.3.999")
    assert r.returncode == 2 and "give --image" not in r.stderr and "HTTP 404" in r.stderr, r.stderr
    _until(lambda: new.series_uid in _images(server.url), "new series listed", 30)
    # a SEG stored in the PACS by someone else: the case counts as labelled within the refresh time
    from test_dicom_e2e import _make_seg, _series_files

    names = {int(k): v for k, v in json.load(open(os.path.join(loaded["studies"], "label_names.json"))).items()}
    uid0 = loaded["ct"]["case_000"]
    original = os.path.join(loaded["studies"], "labels", "original", "case_000.nii.gz")
    r = _cli("import-labels", "--server", server.url, original, "--image", uid0)  # its pseudo-label first
    assert r.returncode == 0, r.stderr
    src = _series_files(pacs, uid0, str(tmp_path / "src"))
    truth = os.path.join(loaded["studies"], "truth", "case_000.nii.gz")
    seg = _make_seg(truth, src, names, str(tmp_path / "seg.dcm"))
    import pydicom

    dicom.upload([pydicom.dcmread(seg)], pacs.dicomweb_url)
    _until(lambda: uid0 in requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()["labeled"],
           "SEG seen", 30)
    # ... and the next scoring fetches that SEG and records the pseudo-label's correction (its true Dice)
    from conftest import run_scoring

    assert run_scoring(server.url)["status"] == "DONE"
    pairs = [p for p in requests.get(f"{server.url}/labelsentinel/quality", timeout=60).json()["corrections"]["pairs"]
             if p["image_id"] == uid0]
    assert pairs and all(0.0 <= p["true_dice"] <= 1.0 for p in pairs), pairs
    assert min(p["true_dice"] for p in pairs) < 0.99  # the pseudo-label against the truth, not against itself


def test_no_temporary_nifti_is_left_per_series_fetched_or_label_refused(server, loaded):
    """Runs after the tests above: series fetched, and label saves refused (404, 422)."""
    for uid in (loaded["ct"]["case_000"], loaded["ct"]["case_001"]):
        assert requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=120).status_code == 200
    left = glob.glob(os.path.join(server.tmp, "tmp*.nii.gz"))
    assert not left, left


def test_demographics_use_the_credentials_and_name_an_outage(server, pacs, loaded):
    """Last: Orthanc restarted with authentication (same folder, same ports), then stopped."""
    from labelsentinel.orthanc import Orthanc

    server.stop()  # one server, one Orthanc at a time; the server is done
    pacs.stop(remove=False)
    locked = Orthanc(pacs.workdir, users={"alice": "s3cret"}).start()
    try:
        assert locked.http_port == PACS_PORT  # the ports of the last run in that folder
        code = ("import json, sys\nfrom labelsentinel.dicom import series_demographics, DicomUnavailable\n"
                "try:\n    print(json.dumps(series_demographics(sys.argv[1])))\n"
                "except DicomUnavailable as e:\n    print('UNAVAILABLE', e)\n")
        env = {**_env(), "MONAI_LABEL_DICOMWEB_USERNAME": "alice", "MONAI_LABEL_DICOMWEB_PASSWORD": "s3cret"}
        r = subprocess.run([sys.executable, "-c", code, locked.dicomweb_url], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        demo = json.loads(r.stdout)
        assert demo[loaded["ct"]["real"]]["sex"] == "M" and demo[loaded["ct"]["real"]]["age"] == 62
        assert loaded["ct"]["gap"] in demo and loaded["mr"] in demo
        r = subprocess.run([sys.executable, "-c", code, locked.dicomweb_url], capture_output=True, text=True, env=_env())
        assert r.stdout.startswith("UNAVAILABLE") and "HTTP 401" in r.stdout and "MONAI_LABEL_DICOMWEB_USERNAME" in r.stdout, (r.stdout, r.stderr)
    finally:
        locked.stop()
    r = subprocess.run([sys.executable, "-c", code, locked.dicomweb_url], capture_output=True, text=True, env=env)
    assert r.stdout.startswith("UNAVAILABLE") and "did not answer" in r.stdout and locked.dicomweb_url in r.stdout, r.stdout
