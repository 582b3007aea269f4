import json
import os

import nibabel as nib
import numpy as np
import pytest

from labelsentinel.io import (
    VolumeError,
    check_same_grid,
    load_image,
    load_label,
    load_label_names,
    resample_label_to,
    save_nifti,
)


def _write(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_roundtrip_and_grid_check(tmp_path):
    aff = np.diag([2.0, 2.0, 5.0, 1.0])
    img = load_image(_write(tmp_path / "i.nii.gz", np.zeros((4, 5, 6), np.int16), aff))
    lab = load_label(_write(tmp_path / "l.nii.gz", np.ones((4, 5, 6), np.uint8), aff))
    check_same_grid(img, lab)
    assert img.spacing == (2.0, 2.0, 5.0)
    other = load_label(_write(tmp_path / "o.nii.gz", np.ones((4, 5, 7), np.uint8), aff))
    with pytest.raises(VolumeError) as e:
        check_same_grid(img, other)
    assert "(4, 5, 6)" in str(e.value) and "(4, 5, 7)" in str(e.value)
    shifted = load_label(_write(tmp_path / "s.nii.gz", np.ones((4, 5, 6), np.uint8), aff @ np.diag([1, 1, 1, 1]) + np.array([[0, 0, 0, 3], [0] * 4, [0] * 4, [0] * 4])))
    with pytest.raises(VolumeError, match="origin"):
        check_same_grid(img, shifted)


def test_resample_label_to_image_grid(tmp_path):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:6, 2:6, 2:6] = 3
    fine = load_label(_write(tmp_path / "l.nii.gz", lab, np.diag([2.0, 2.0, 2.0, 1.0])))
    img = load_image(_write(tmp_path / "i.nii.gz", np.zeros((20, 20, 20), np.int16), np.diag([1.0, 1.0, 1.0, 1.0])))
    out = resample_label_to(fine, img)
    assert out.array.shape == (20, 20, 20) and (out.array == 3).sum() == 8 * 4 * 4 * 4


@pytest.mark.parametrize(
    "arr,match",
    [(np.full((3, 3, 3), 1.5, np.float32), "integers"), (np.full((3, 3, 3), -1, np.int16), ">= 0")],
)
def test_bad_label_values(tmp_path, arr, match):
    with pytest.raises(VolumeError, match=match):
        load_label(_write(tmp_path / "l.nii.gz", arr))


def test_nan_image_and_unreadable_files(tmp_path):
    arr = np.zeros((3, 3, 3), np.float32)
    arr[1, 1, 1] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        load_image(_write(tmp_path / "n.nii.gz", arr))
    with pytest.raises(VolumeError, match="not found"):
        load_image(str(tmp_path / "missing.nii.gz"))
    good = _write(tmp_path / "g.nii.gz", np.zeros((30, 30, 30), np.int16))
    data = open(good, "rb").read()
    trunc = tmp_path / "t.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="t.nii.gz: cannot be read"):
        load_image(str(trunc))


def test_label_names_both_conventions(tmp_path):
    p = tmp_path / "n.json"
    p.write_text(json.dumps({"1": "spleen", "52": "aorta"}))
    assert load_label_names(str(p)) == {1: "spleen", 52: "aorta"}
    p.write_text(json.dumps({"spleen": 1, "aorta": 52}))
    assert load_label_names(str(p)) == {1: "spleen", 52: "aorta"}
    p.write_text("{not json")
    with pytest.raises(VolumeError, match="not valid JSON"):
        load_label_names(str(p))
    p.write_text(json.dumps({"1": "spleen", "52": " "}))
    with pytest.raises(VolumeError, match=r"id\(s\) \[52\] have an empty name"):
        load_label_names(str(p))


def test_save_nifti_is_deterministic(tmp_path):
    arr = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    a, b = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")
    save_nifti(a, arr, np.eye(4))
    os.utime(a, (0, 0))
    save_nifti(b, arr, np.eye(4))
    assert open(a, "rb").read() == open(b, "rb").read()


def test_seg_segments_map_by_name_then_by_id_like_names_and_never_a_foreign_name_by_number():
    from labelsentinel.dicom import segment_ids

    names = {1: "spleen", 2: "kidney_right", 5: "liver", 52: "aorta", 99: "urinary_bladder"}
    mapping, bad = segment_ids({1: "Liver", 2: "Kidney right", 3: "label_52", 4: "Segment 1", 5: "", 6: "99"}, names)
    assert mapping == {1: 5, 2: 2, 3: 52, 5: 5, 6: 99}
    assert bad == ["segment 4 (Segment 1)"]  # no name of its own, and its number 4 is no id
    mapping, bad = segment_ids({99: "mystery_organ"}, names)  # its number is an id of another structure
    assert mapping == {} and bad == ["segment 99 (mystery_organ)"]


def test_image_checks_of_a_listing_write_their_cache_once(tmp_path, monkeypatch):
    """A listing of many new files used to rewrite the whole verdict cache after each file (1,000 new studies:
    8 s of JSON writing at start-up); checks with save=False are written once, at flush()."""
    from labelsentinel.imagecheck import ImageCheckCache

    paths = []
    for i in range(30):
        p = str(tmp_path / f"s{i}.nii.gz")
        save_nifti(p, np.zeros((4, 4, 4), np.float32), np.eye(4))
        paths.append(p)
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    cache_path = str(tmp_path / "checks.json")
    cache = ImageCheckCache(cache_path)
    writes = []
    real_save = ImageCheckCache._save
    monkeypatch.setattr(ImageCheckCache, "_save", lambda self: (writes.append(1), real_save(self)))
    assert all(cache.check(p, save=False) is None for p in paths)
    assert "bad.nii.gz" in cache.check(str(tmp_path / "bad.nii.gz"), save=False)
    assert writes == [] and not os.path.exists(cache_path)
    cache.flush()
    cache.flush()  # nothing new: no second write
    assert writes == [1]
    again = ImageCheckCache(cache_path)  # the verdicts survive a restart: nothing is read again
    monkeypatch.setattr(ImageCheckCache, "_read", lambda self, p: pytest.fail(f"{p} read again"))
    assert all(again.check(p) is None for p in paths) and again.check(str(tmp_path / "bad.nii.gz"))
