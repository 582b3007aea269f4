import multiprocessing as mp
import os

from labelsentinel.store import Store, file_stamp


def _writer(path, k, n):
    s = Store(path)
    for i in range(n):
        s.put_quality(f"case_{k}_{i}", "original", "1:1", "v1", record={"k": k, "i": i})


def test_records_survive_concurrent_writers_and_reopen(tmp_path):
    path = str(tmp_path / "s" / "sentinel.db")
    Store(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, k, 25)) for k in range(3)]
    for p in procs:
        p.start()
    _writer(path, 9, 25)  # and this process at the same time
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = Store(path)  # a "restart"
    rows = s.quality("original")
    assert len(rows) == 4 * 25
    assert {r["record"]["k"] for r in rows} == {0, 1, 2, 9}


def test_incremental_stamps_errors_and_settings(tmp_path):
    s = Store(str(tmp_path / "db.sqlite"))
    f = tmp_path / "x.nii.gz"
    f.write_bytes(b"abc")
    st = file_stamp(str(f))
    s.put_quality("a", "original", st, "v1", record={"x": 1})
    assert s.is_current("a", "original", st, "v1")
    assert not s.is_current("a", "original", st, "v2")
    f.write_bytes(b"abcd")
    assert not s.is_current("a", "original", file_stamp(str(f)), "v1")
    s.put_quality("b", "original", "0:0", "v1", error="b: cannot be read")
    assert [r["image_id"] for r in s.quality("original")] == ["a"]
    assert s.get_quality("b", "original")["error"] == "b: cannot be read"
    s.remove_quality("a")
    assert s.get_quality("a", "original") is None
    assert s.get_setting("budget") is None
    s.set_setting("budget", {"cases": 5})
    assert Store(str(tmp_path / "db.sqlite")).get_setting("budget") == {"cases": 5}
    assert os.path.exists(tmp_path / "db.sqlite")


def test_cached_quality_rows_follow_writes_from_other_connections(tmp_path):
    """quality() keeps parsed records while the table is unchanged; a write by another process (here another
    Store on the same file) is seen at once: new rows, replaced rows, errors and removals."""
    from labelsentinel.store import Store

    a, b = Store(str(tmp_path / "s.db")), Store(str(tmp_path / "s.db"))
    a.put_quality("c1", "original", "s1", "v", record={"case": "c1", "structures": [{"id": 1, "predicted_dice": 0.5}]})
    first = a.quality("original")
    assert a.quality("original") == first  # served from the cache, equal
    b.put_quality("c2", "original", "s1", "v", record={"case": "c2", "structures": []})
    assert [r["image_id"] for r in a.quality("original")] == ["c1", "c2"]
    b.put_quality("c1", "original", "s2", "v", record={"case": "c1", "structures": [{"id": 1, "predicted_dice": 0.9}]})
    assert a.quality("original")[0]["record"]["structures"][0]["predicted_dice"] == 0.9
    b.put_quality("c2", "original", "s3", "v", error="cannot be read")
    assert [r["image_id"] for r in a.quality("original")] == ["c1"]
    assert a.get_quality("c2", "original")["error"] == "cannot be read"
    b.remove_quality("c1")
    assert [r["image_id"] for r in a.quality("original", include_errors=True)] == ["c2"]
    assert a.get_quality("c1", "original") is None


def test_scoring_redoes_a_label_when_names_expected_structures_or_the_file_change(tmp_path):
    import numpy as np

    from labelsentinel.io import save_nifti
    from labelsentinel.strategies.scoring import LabelItem, score_labels

    img, lab = np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.int16)
    lab[2:5, 2:5, 2:5] = 1
    save_nifti(str(tmp_path / "img.nii"), img, np.eye(4))
    save_nifti(str(tmp_path / "lab.nii"), lab, np.eye(4))

    class Est:  # like the real estimator, its answer depends on the names and the label
        def predict(self, image, label, spacing, names):
            return [{"id": 1, "name": names.get(1), "predicted_dice": 0.9 if names.get(1) else 0.5,
                     "voxels": int((label == 1).sum()), "flags": []}]

    s = Store(str(tmp_path / "db"))
    item = [LabelItem("c", "original", str(tmp_path / "img.nii"), str(tmp_path / "lab.nii"))]
    assert score_labels(item, s, "v", Est, {})["scored"] == ["c/original"]
    assert score_labels(item, s, "v", Est, {})["unchanged"] == 1
    assert score_labels(item, s, "v", Est, {1: "liver"})["scored"] == ["c/original"]  # names added
    assert s.get_quality("c", "original")["record"]["structures"][0]["name"] == "liver"
    assert score_labels(item, s, "v", Est, {1: "liver"}, expected={1, 2})["scored"] == ["c/original"]
    assert s.get_quality("c", "original")["record"]["missing"] == [{"id": 2, "name": None}]
    # another label of the same size with the same modification time (cp -p, rsync -t)
    st0 = os.stat(tmp_path / "lab.nii")
    save_nifti(str(tmp_path / "new.nii"), np.zeros_like(lab), np.eye(4))
    os.utime(tmp_path / "new.nii", ns=(st0.st_atime_ns, st0.st_mtime_ns))
    os.replace(tmp_path / "new.nii", tmp_path / "lab.nii")
    assert os.stat(tmp_path / "lab.nii").st_size == st0.st_size
    assert score_labels(item, s, "v", Est, {1: "liver"}, expected={1, 2})["scored"] == ["c/original"]
    assert s.get_quality("c", "original")["record"]["structures"][0]["voxels"] == 0
