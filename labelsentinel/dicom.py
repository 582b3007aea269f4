"""DICOM for Label Sentinel: NIfTI volumes as DICOM CT series, existing series with their UIDs checked, upload
to a DICOMweb PACS (STOW-RS), and DICOM SEG read back as label volumes.

    labelsentinel dicom-upload --studies DIR --dicomweb URL     # sample/NIfTI studies -> CT series in a PACS
    labelsentinel run-dicom [--studies DIR]                     # Orthanc + studies as DICOM + the server

UIDs of converted volumes are derived from a seed and the case id (same input, same UIDs), so uploading the
same studies twice does not create new series.
"""

from __future__ import annotations

import csv
import glob
import os
import signal
import sys
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI RAS <-> DICOM LPS


class DicomError(ValueError):
    """A DICOM input that cannot be used, with the reason."""


@dataclass
class SeriesInfo:
    study_uid: str
    series_uid: str
    patient_id: str
    datasets: list = field(default_factory=list)  # pydicom Datasets, in slice order
    sex: str = ""
    age: str = ""

    @property
    def n(self) -> int:
        return len(self.datasets)


def uid_for(seed, case_id: str, what: str) -> str:
    """A valid UID derived from (seed, case id, what): the same inputs always give the same UID."""
    return generate_uid(entropy_srcs=["labelsentinel", str(seed), str(case_id), what])


def dicom_age(age) -> str:
    """45 -> '045Y'; an existing DICOM age string ('045Y') is kept; '' for unknown."""
    if age is None or age == "":
        return ""
    s = str(age).strip()
    if len(s) == 4 and s[:3].isdigit() and s[3] in "DWMY":
        return s
    return f"{int(float(s)):03d}Y"


def dicom_sex(sex) -> str:
    s = (sex or "").strip().upper()[:1]
    if s and s not in "MFO":
        raise DicomError(f"patient sex {sex!r}: use M, F or O")
    return s


def volume_to_series(array: np.ndarray, affine: np.ndarray, case_id: str, seed=0, sex="", age=None,
                     study_uid: str | None = None, series_uid: str | None = None,
                     description: str = "Label Sentinel CT") -> SeriesInfo:
    """A 3D volume (X, Y, Z voxel order, NIfTI RAS affine, HU) as a DICOM CT series (one Dataset per z slice).

    The pixel grid is kept as is: column index = array axis 0, row index = axis 1, slice = axis 2, so a DICOM
    reader (SimpleITK, MONAI Label's DICOMweb datastore) gives back the same voxels on the same world grid.
    """
    if array.ndim != 3:
        raise DicomError(f"{case_id}: a 3D volume is needed, got shape {array.shape}")
    a = np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(sp <= 0):
        raise DicomError(f"{case_id}: degenerate affine (spacing {sp})")
    dirs = LPS @ (a[:3, :3] / sp)  # LPS direction of each array axis
    row_dir, col_dir = dirs[:, 0], dirs[:, 1]
    if abs(float(np.dot(row_dir, col_dir))) > 1e-4:
        raise DicomError(f"{case_id}: sheared affine cannot be written as DICOM")
    vol = np.clip(np.round(np.asarray(array, dtype=np.float64)), -32768, 32767).astype(np.int16)
    study_uid = study_uid or uid_for(seed, case_id, "study")
    series_uid = series_uid or uid_for(seed, case_id, "series")
    frame_uid = uid_for(seed, case_id, "frame")
    sex, age = dicom_sex(sex), dicom_age(age)
    out = SeriesInfo(study_uid, series_uid, case_id, sex=sex, age=age)
    for k in range(vol.shape[2]):
        sop_uid = uid_for(seed, case_id, f"sop-{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128  # dicomweb-client writes datasets as they are: with a preamble, a valid Part 10 file
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "Label Sentinel"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Label Sentinel study"
        ds.SeriesDescription = description
        ds.PatientName = case_id
        ds.PatientID = case_id
        ds.PatientBirthDate = ""
        ds.PatientSex = sex
        ds.PatientAge = age
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6g}" for v in LPS @ (a @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sp[1]:.6g}", f"{sp[0]:.6g}"]  # row spacing (axis 1), column spacing (axis 0)
        ds.SliceThickness = f"{sp[2]:.6g}"
        ds.SliceLocation = f"{float(ds.ImagePositionPatient[2]):.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        out.datasets.append(ds)
    return out


def nifti_to_series(path: str, case_id: str | None = None, seed=0, sex="", age=None, **kw) -> SeriesInfo:
    from labelsentinel.io import load_volume

    v = load_volume(path)
    if case_id is None:
        case_id = os.path.basename(path).split(".nii")[0]
    return volume_to_series(v.array, v.affine, case_id, seed=seed, sex=sex, age=age, **kw)


def load_series(folder: str, study_uid: str | None = None, series_uid: str | None = None,
                patient_id: str | None = None, sex: str | None = None, age=None) -> SeriesInfo:
    """Read an existing DICOM series; UIDs and demographics given here replace (or fill in) those of the files.

    A series whose files lack a Study or Series Instance UID is refused unless both are given: a DICOMweb PACS
    cannot store it and MONAI Label could not address it.
    """
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f))
    if not files:
        raise DicomError(f"{folder}: no files")
    dss = []
    for f in files:
        try:
            dss.append(pydicom.dcmread(f))
        except Exception as e:
            raise DicomError(f"{f}: not a DICOM file ({e})") from e
    series = {str(d.get("SeriesInstanceUID", "") or "") for d in dss}
    studies = {str(d.get("StudyInstanceUID", "") or "") for d in dss}
    missing = [n for n, vals, given in (("StudyInstanceUID", studies, study_uid),
                                        ("SeriesInstanceUID", series, series_uid)) if "" in vals and not given]
    if missing:
        raise DicomError(f"{folder}: {len(dss)} file(s) without {' and '.join(missing)}; a PACS cannot store them. "
                         "Assign UIDs explicitly (labelsentinel dicom-upload --series DIR --study-uid UID "
                         "--series-uid UID, or load_series(..., study_uid=, series_uid=))")
    if len(series - {""}) > 1 and not series_uid:
        raise DicomError(f"{folder}: files of {len(series)} different series; give one folder per series")
    if series_uid:
        series = {series_uid}
    if study_uid:
        studies = {study_uid}
    study_uid, series_uid = studies.pop(), series.pop()
    paths = {id(d): f for d, f in zip(dss, files)}
    dss.sort(key=lambda d: int(d.get("InstanceNumber") or 0))
    for i, d in enumerate(dss):
        if d.file_meta.TransferSyntaxUID.is_compressed:
            _decompress(d, paths[id(d)])
        d.StudyInstanceUID = study_uid
        d.SeriesInstanceUID = series_uid
        if not str(d.get("SOPInstanceUID", "") or ""):
            fm = getattr(d, "file_meta", None)
            d.SOPInstanceUID = str(getattr(fm, "MediaStorageSOPInstanceUID", "") or "") or uid_for(series_uid, i, "sop")
        if not str(d.get("SOPClassUID", "") or ""):
            fm = getattr(d, "file_meta", None)
            d.SOPClassUID = str(getattr(fm, "MediaStorageSOPClassUID", "") or "") or CTImageStorage
        if patient_id is not None:
            d.PatientID = patient_id
            if not str(d.get("PatientName", "") or ""):
                d.PatientName = patient_id
        if sex is not None:
            d.PatientSex = dicom_sex(sex)
        if age is not None:
            d.PatientAge = dicom_age(age)
        if getattr(d, "preamble", None) is None:
            d.preamble = b"\x00" * 128
        if hasattr(d, "file_meta"):
            d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
            d.file_meta.MediaStorageSOPClassUID = d.SOPClassUID
    d0 = dss[0]
    return SeriesInfo(study_uid, series_uid, str(d0.get("PatientID", "") or ""), dss,
                      str(d0.get("PatientSex", "") or ""), str(d0.get("PatientAge", "") or ""))


def slice_spacing_problem(datasets, what: str = "the series", rel_tol: float = 0.05, abs_tol: float = 0.01) -> str | None:
    """Why the slices of a series do not lie on one evenly spaced grid (missing or duplicate slices, varying
    steps), or None when they do (or there is nothing to check: fewer than 3 slices, no positions, several
    orientations). A NIfTI has one z spacing: a series with a gap would be served stretched, and labels saved on
    it would land on slice positions that do not exist.

    Positions are ImagePositionPatient along the slice normal (ImageOrientationPatient's row x column)."""
    pos, iops = [], set()
    for d in datasets:
        ipp, iop = d.get("ImagePositionPatient"), d.get("ImageOrientationPatient")
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            return None
        iops.add(tuple(round(float(v), 4) for v in iop))
        pos.append(([float(v) for v in ipp], [float(v) for v in iop]))
    if len(pos) < 3 or len(iops) != 1:
        return None
    iop = np.array(pos[0][1])
    normal = np.cross(iop[:3], iop[3:])
    z = np.sort([float(np.dot(p, normal)) for p, _ in pos])
    steps = np.diff(z)
    step = float(np.median(steps))
    if step <= abs_tol:
        return (f"{what}: {len(z)} slices but only {len(np.unique(np.round(z, 3)))} distinct slice positions "
                "(duplicate slices): load each slice once")
    bad = np.flatnonzero(np.abs(steps - step) > max(abs_tol, rel_tol * step))
    if not len(bad):
        return None
    uniform = (z[-1] - z[0]) / (len(z) - 1)  # the grid a reader assuming even spacing builds
    off = float(np.max(np.abs(z - (z[0] + uniform * np.arange(len(z))))))
    gaps = [f"{steps[j]:.3g} mm between {z[j]:.6g} and {z[j + 1]:.6g}" for j in bad[:3]]
    missing = int(round(float(np.sum(np.maximum(np.round(steps[bad] / step) - 1, 0)))))
    return (f"{what}: its {len(z)} slices are not evenly spaced (step {step:.3g} mm, but "
            f"{'; '.join(gaps)}{' ...' if len(bad) > 3 else ''} along the slice normal"
            f"{f'; about {missing} slice(s) missing' if missing else ''}): served on one uniform grid "
            f"({uniform:.4g} mm) its slices, and labels saved on it, would be up to {off:.3g} mm off. "
            "Store the complete series in the PACS")


def _decompress(d: Dataset, path: str) -> None:
    """Store compressed pixels (e.g. JPEG 2000) as plain little endian HU: a PACS without the codec cannot
    transcode them for DICOMweb clients that ask for uncompressed data (MONAI Label does)."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(path)  # GDCM decodes and applies the rescale: HU
    except Exception as e:
        raise DicomError(f"{path}: cannot decode the compressed pixel data ({e})") from e
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:
        arr = arr[0]
    if arr.shape != (int(d.Rows), int(d.Columns)):
        raise DicomError(f"{path}: decoded {arr.shape}, expected ({d.Rows}, {d.Columns})")
    d.PixelData = np.clip(np.round(arr), -32768, 32767).astype(np.int16).tobytes()
    d["PixelData"].VR = "OW"
    d["PixelData"].is_undefined_length = False
    d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 1
    d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
    d.RescaleIntercept, d.RescaleSlope = "0", "1"
    d.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    d.is_little_endian, d.is_implicit_VR = True, False


def write_series(info: SeriesInfo, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for d in info.datasets:
        p = os.path.join(out_dir, f"{d.SOPInstanceUID}.dcm")
        d.save_as(p, write_like_original=False)
        paths.append(p)
    return paths


class DicomUnavailable(DicomError):
    """The DICOMweb server cannot be reached, or refused the request (credentials): with the address and why."""


def _setting(name: str):
    """A MONAI Label setting as the server sees it: the environment variable, else monailabel.config's value."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        from monailabel.config import settings

        return getattr(settings, name, None)
    except Exception:
        return None


def dicomweb_client(url: str):
    """A DICOMweb client for ``url`` built as MONAI Label's DICOMweb datastore builds its own: credentials from
    ``MONAI_LABEL_DICOMWEB_USERNAME``/``_PASSWORD`` and the QIDO/WADO/STOW prefixes of its settings."""
    from dicomweb_client.api import DICOMwebClient

    session = None
    user, password = _setting("MONAI_LABEL_DICOMWEB_USERNAME"), _setting("MONAI_LABEL_DICOMWEB_PASSWORD")
    if user and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password)
    return DICOMwebClient(url=url.rstrip("/"), session=session,
                          qido_url_prefix=_setting("MONAI_LABEL_QIDO_PREFIX") or None,
                          wado_url_prefix=_setting("MONAI_LABEL_WADO_PREFIX") or None,
                          stow_url_prefix=_setting("MONAI_LABEL_STOW_PREFIX") or None)


def search_series_all(client, search_filters=None, fields=None, page: int = 0, warn=None) -> list[dict]:
    """Every series a QIDO-RS search matches, page by page (``offset``): a PACS that caps its answers (Orthanc's
    ``LimitFindResults``) would otherwise cut the list short without saying so. ``page``: the page size asked
    for (0: the server's own). Stops at an empty page or a page with nothing new (a server that ignores
    ``offset``; then ``warn`` is called with why the list may be incomplete)."""
    out, seen, offset = [], set(), 0
    while True:
        kw = {"offset": offset} if offset else {}
        if page:
            kw["limit"] = page
        res = client.search_for_series(search_filters=dict(search_filters or {}), fields=fields, **kw)
        new = [js for js in res if _series_uid(js) not in seen]
        for js in new:
            seen.add(_series_uid(js))
        out.extend(new)
        if not res or (page and len(res) < page):
            return out
        if not new:
            if warn:
                warn(f"the DICOMweb server {client.base_url} answered the same {len(res)} series again at offset "
                     f"{offset} (it ignores QIDO 'offset'): the list may be incomplete; raise its result limit")
            return out
        offset += len(res)


def _series_uid(js: dict) -> str:
    try:
        return str(js["0020000E"]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return ""


def upload(datasets, dicomweb_url: str, batch: int = 32) -> int:
    """STOW-RS the datasets to a DICOMweb server; returns how many were stored. Raises DicomError on refusal."""
    from requests import HTTPError, RequestException

    client = dicomweb_client(dicomweb_url)
    n = 0
    for i in range(0, len(datasets), batch):
        chunk = datasets[i:i + batch]
        try:
            client.store_instances(chunk)
        except (HTTPError, RequestException) as e:
            raise DicomError(f"{dicomweb_url}: storing {len(chunk)} instance(s) failed: {e}") from e
        n += len(chunk)
    return n


def series_demographics(source, series_uids=None) -> dict[str, dict]:
    """SeriesInstanceUID -> {"sex", "age" (years or None), "patient_id", "study_uid"} from QIDO-RS (every page).
    ``source``: a DICOMweb URL (a client with the server's credentials is made for it) or a DICOMweb client (the
    datastore's own). Raises DicomUnavailable (a DicomError) naming the PACS when it cannot be reached or
    refuses the query."""
    import requests

    client = dicomweb_client(source) if isinstance(source, str) else source
    dicomweb_url = source if isinstance(source, str) else getattr(client, "base_url", "the PACS")
    out = {}
    try:
        found = search_series_all(client, fields=["PatientSex", "PatientAge", "PatientID"])
    except (requests.RequestException, OSError) as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        why = (f"HTTP {code}" + (": check MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD" if code in (401, 403) else "")
               if code else f"{type(e).__name__}: {str(e)[:200]}")
        raise DicomUnavailable(f"the DICOMweb server {dicomweb_url} did not answer the series query ({why})") from e
    for js in found:
        d = Dataset.from_json(js)
        uid = str(d.get("SeriesInstanceUID", "") or "")
        if series_uids is not None and uid not in series_uids:
            continue
        out[uid] = {"sex": str(d.get("PatientSex", "") or ""), "age": age_years(d.get("PatientAge", "")),
                    "patient_id": str(d.get("PatientID", "") or ""), "study_uid": str(d.get("StudyInstanceUID", "") or "")}
    return out


def age_years(age) -> float | None:
    """'045Y' -> 45, '006M' -> 0.5, 45 -> 45; None when unknown."""
    if age is None or age == "":
        return None
    s = str(age).strip()
    try:
        if s[-1:] in "DWMY" and s[:-1].isdigit():
            return int(s[:-1]) / {"D": 365.25, "W": 52.18, "M": 12, "Y": 1}[s[-1]]
        return float(s)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- DICOM SEG
@dataclass
class SegVolume:
    image: object  # SimpleITK image of segment numbers (0 = background)
    segments: dict  # segment number -> SegmentLabel
    referenced_series: str
    study_uid: str


def read_seg(path: str) -> SegVolume:
    """A DICOM SEG file as a label image of segment numbers, with its segments and the series it refers to."""
    import pydicom_seg

    try:
        dcm = pydicom.dcmread(path)
    except Exception as e:
        raise DicomError(f"{path}: not a DICOM file ({e})") from e
    if str(dcm.get("Modality", "")) != "SEG" or "SegmentSequence" not in dcm:
        raise DicomError(f"{path}: not a DICOM SEG (Modality {dcm.get('Modality', '?')!r})")
    ref = ""
    if dcm.get("ReferencedSeriesSequence"):
        ref = str(dcm.ReferencedSeriesSequence[0].get("SeriesInstanceUID", "") or "")
    if not ref:
        raise DicomError(f"{path}: the SEG names no referenced series (ReferencedSeriesSequence)")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or "") for s in dcm.SegmentSequence}
    try:
        res = pydicom_seg.MultiClassReader().read(dcm)
    except Exception as e:
        raise DicomError(f"{path}: cannot read the segments ({e})") from e
    return SegVolume(res.image, segments, ref, str(dcm.get("StudyInstanceUID", "") or ""))


def segment_ids(segments: dict[int, str], label_names: dict[int, str]) -> tuple[dict[int, int], list[str]]:
    """({segment number: label id}, [segments that map to no id]) by the rules of :func:`seg_to_label`."""
    import re

    def norm(n) -> str:
        return re.sub(r"[\s_\-]+", "", str(n).lower())

    by_name = {norm(v): int(k) for k, v in label_names.items()}
    mapping, bad = {}, []
    for num, name in sorted(segments.items()):
        n = norm(name or "")
        m = re.fullmatch(r"(label|segment)?(\d*)", n)
        if m is None and n in by_name:
            mapping[num] = by_name[n]
        elif m is not None and m.group(1) != "segment" and m.group(2) and int(m.group(2)) in label_names:
            mapping[num] = int(m.group(2))  # "52", "label_52": the label id itself
        elif m is not None and int(num) in label_names:
            mapping[num] = int(num)  # no name of its own: its segment number
        else:
            bad.append(f"segment {num} ({name or 'no label'})")
    return mapping, bad


def seg_to_label(seg: SegVolume, reference_image: str, label_names: dict[int, str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Resample a SEG onto a reference image (NIfTI) and map its segments to label ids.

    A segment maps to the id whose name equals its SegmentLabel (ignoring case, spaces, hyphens and
    underscores: "Kidney right" is kidney_right); a segment named after an id ("52", "label_52", as the app
    names ids it has no name for) maps to that id; a segment without a name of its own (empty or "Segment N")
    maps to its segment number when that number is an id of ``label_names``. Any other segment
    (a name the label names do not know) is an error naming it: its number may mean another structure.
    Returns (label array in the reference's voxel order, the reference's affine, {segment number: label id}).
    """
    import nibabel as nib
    import SimpleITK as sitk

    mapping, bad = segment_ids(seg.segments, label_names)
    if bad:
        raise DicomError(f"SEG of series {seg.referenced_series}: {', '.join(bad)} not in the label names "
                         f"(known ids {min(label_names)}..{max(label_names)}, {len(label_names)} names); "
                         "add them to the label names file or fix the SEG")
    ref = sitk.ReadImage(reference_image)
    lab = sitk.Resample(seg.image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.image.GetPixelID())
    arr = sitk.GetArrayFromImage(lab)  # (z, y, x)
    lut = np.zeros(max(max(seg.segments, default=0), 0) + 1, dtype=np.uint16)
    for num, lid in mapping.items():
        lut[num] = lid
    arr = lut[np.clip(arr, 0, len(lut) - 1)]
    # The reference NIfTI's own voxel order (SimpleITK's index (x, y, z) = nibabel's array axes for files
    # SimpleITK wrote; for other files, go through the world grid of nibabel's affine).
    nii = nib.load(reference_image)
    vol = np.transpose(arr, (2, 1, 0))
    if vol.shape != nii.shape[:3]:
        raise DicomError(f"reference {reference_image}: shape {nii.shape} does not match its SimpleITK grid {vol.shape}")
    dtype = np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16
    return vol.astype(dtype), np.asarray(nii.affine), mapping


# ------------------------------------------------------------------------------------------ studies -> PACS
def read_cases_csv(studies: str) -> dict[str, dict]:
    """case id -> {"sex", "age"} from STUDIES/cases.csv or STUDIES/truth/cases.csv (sample data), if present."""
    for p in (os.path.join(studies, "cases.csv"), os.path.join(studies, "truth", "cases.csv")):
        if os.path.isfile(p):
            with open(p, newline="") as f:
                return {r.get("case") or r.get("image") or r.get("id"): {"sex": r.get("sex", ""), "age": r.get("age", "")}
                        for r in csv.DictReader(f)}
    return {}


def studies_images(studies: str) -> list[str]:
    return sorted(glob.glob(os.path.join(studies, "*.nii.gz")) + glob.glob(os.path.join(studies, "*.nii")))


def upload_studies(studies: str, dicomweb_url: str, seed=0, progress=print) -> dict[str, SeriesInfo]:
    """Every NIfTI image of a studies folder as a CT series in the PACS; returns case id -> SeriesInfo (no pixels)."""
    demo = read_cases_csv(studies)
    out = {}
    for p in studies_images(studies):
        cid = os.path.basename(p).split(".nii")[0]
        d = demo.get(cid, {})
        info = nifti_to_series(p, cid, seed=seed, sex=d.get("sex", ""), age=d.get("age") or None)
        upload(info.datasets, dicomweb_url)
        info.datasets = []
        out[cid] = info
        if progress:
            progress(f"  {cid}: series {info.series_uid} ({d.get('sex') or '?'}, {d.get('age') or '?'})")
    return out


def cmd_upload(args) -> int:
    try:
        if args.series:
            info = load_series(args.series, args.study_uid, args.series_uid, args.patient_id, args.sex, args.age)
            problem = slice_spacing_problem(info.datasets, args.series)
            if problem:  # stored all the same (it is the PACS's copy), but the server will refuse to serve it
                print(f"warning: {problem}. The Label Sentinel server refuses to serve such a series.", file=sys.stderr)
            upload(info.datasets, args.dicomweb)
            print(f"{args.series}: {info.n} instance(s) stored as series {info.series_uid}")
        else:
            res = upload_studies(args.studies, args.dicomweb, args.seed)
            print(f"{len(res)} series stored in {args.dicomweb}")
    except DicomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_dicom(args) -> int:
    """Orthanc + the studies as DICOM (with their original labels imported) + the MONAI Label server."""
    import subprocess
    import tempfile

    from labelsentinel.importlabels import import_labels
    from labelsentinel.orthanc import Orthanc, OrthancError, ensure_orthanc_installed
    from labelsentinel.serve import port_problem, server_command, server_env, stop_group, wait_for_info

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C, and a plain `kill` too, stop the server and Orthanc (started in the background, SIGINT may be ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    if not studies_images(args.studies):
        print(f"error: no NIfTI images in {args.studies!r} (create demo studies with `labelsentinel sample-data "
              f"--out {args.studies}`)", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:  # before Orthanc starts and the studies are loaded into it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from labelsentinel.orthanc import port_is_free

    for opt, port in (("--orthanc-port", args.orthanc_port), ("--orthanc-dicom-port", args.orthanc_dicom_port)):
        if port and not port_is_free(port):
            print(f"error: {opt} {port}: the port is in use on 127.0.0.1; stop what listens there or choose another",
                  file=sys.stderr)
            return 2
    try:
        ensure_orthanc_installed()
        pacs = Orthanc(args.orthanc_dir, http_port=args.orthanc_port, dicom_port=args.orthanc_dicom_port)
        if args.orthanc_dir and pacs.previous_http_port and not pacs.reused_ports and not args.orthanc_port:
            print(f"note: Orthanc's port of the last run in {args.orthanc_dir} ({pacs.previous_http_port}) is in use; "
                  f"using {pacs.http_port}", flush=True)
        pacs.start()
    except OrthancError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    proc = None
    try:
        print(f"Orthanc (DICOMweb) : {pacs.dicomweb_url}   (storage {pacs.workdir})", flush=True)
        print("loading the studies into Orthanc as DICOM CT series ...", flush=True)
        series = upload_studies(args.studies, pacs.dicomweb_url)
        if args.real_series:
            name = os.path.basename(os.path.normpath(args.real_series))
            info = load_series(args.real_series, uid_for(0, name, "study"), uid_for(0, name, "series"))
            upload(info.datasets, pacs.dicomweb_url)
            print(f"  {name}: series {info.series_uid} ({info.n} instances)")
        cache = args.cache or tempfile.mkdtemp(prefix="labelsentinel-dicomweb-cache-")
        if args.cache:
            keep_cache_for(cache, pacs.dicomweb_url)
        env = server_env(args.app)
        env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = cache
        url = f"http://{args.host}:{args.port}"
        conf = list(args.conf or [])
        names = os.path.join(args.studies, "label_names.json")
        if os.path.isfile(names) and not any(k == "label_names" for k, _ in conf):
            conf.append(["label_names", os.path.abspath(names)])
        cmd = server_command(args.app, pacs.dicomweb_url, args.host, args.port, conf)
        print("starting:", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # stopped as a group (see serve.stop_group)
        info = wait_for_info(url, args.wait, proc, args.port)
        if info is None:
            print("error: the server did not start (see its log above)", file=sys.stderr)
            return 1
        # The studies' labels, on a restart only those the server does not have yet: a pseudo-label imported
        # since (labelsentinel import-labels) is not replaced, and no second SEG of a final label is stored.
        have = _server_labels(url)
        label_names = names if os.path.isfile(names) else None
        for tag, what in (("original", "pseudo-label(s) as the `original` tag"),
                          ("final", "final label(s) (as DICOM SEG in Orthanc, so training can start)")):
            n = kept = 0
            for cid, s in series.items():
                lab = os.path.join(args.studies, "labels", tag, f"{cid}.nii.gz")
                if not os.path.isfile(lab):
                    continue
                if tag in have.get(s.series_uid, ()):
                    kept += 1
                    continue
                import_labels(url, [lab], label_names=label_names, image_ids=[s.series_uid], tag=tag, quiet=True)
                n += 1
            print(f"imported {n} {what}" + (f"; {kept} already on the server, kept" if kept else ""))
        print("")
        print(f"Label Sentinel is up on DICOMweb: {info.get('name')}")
        print(f"  OHIF viewer : {url}/ohif/")
        print(f"  3D Slicer   : MONAI Label module -> server address {url}")
        print(f"  Orthanc     : {pacs.url}/app/explorer.html   DICOMweb: {pacs.dicomweb_url}")
        print(f"  REST API    : {url}/  (info: {url}/info/)")
        print("Press Ctrl-C to stop.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
        pacs.stop(remove=args.orthanc_dir is None)


RUN_DICOM_STATE = ".labelsentinel-run-dicom.json"


def keep_cache_for(cache: str, dicomweb_url: str) -> None:
    """Make MONAI Label's DICOMweb cache of the last run in ``cache`` the one of ``dicomweb_url``.

    MONAI Label names the cache subfolder after a hash of the DICOMweb address; the pseudo-labels live only
    there. When Orthanc had to move to another port, the last run's subfolder is renamed to the new address's
    (when that one does not exist yet), so nothing imported before is lost."""
    import json

    from monailabel.utils.others.generic import md5_digest

    os.makedirs(cache, exist_ok=True)
    state = os.path.join(cache, RUN_DICOM_STATE)
    try:
        with open(state) as f:
            old_url = json.load(f).get("dicomweb_url") or ""
    except (OSError, ValueError):
        old_url = ""
    old, new = os.path.join(cache, md5_digest(old_url)), os.path.join(cache, md5_digest(dicomweb_url))
    if old_url and old_url != dicomweb_url and os.path.isdir(old) and not os.path.exists(new):
        os.rename(old, new)
        print(f"cache of the last run ({old_url}) kept for {dicomweb_url}: {new}", flush=True)
    with open(state, "w") as f:
        json.dump({"dicomweb_url": dicomweb_url}, f)


def _server_labels(url: str) -> dict[str, set]:
    """image id -> the label tags the server has (its datastore, final labels from the PACS included)."""
    import requests

    out: dict[str, set] = {}
    try:
        objs = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=120).json().get("objects") or {}
        for i, o in objs.items():
            out.setdefault(i, set()).update((o.get("labels") or {}).keys())
        for i in requests.get(f"{url}/labelsentinel/quality", timeout=120).json().get("labeled") or []:
            out.setdefault(i, set()).add("final")
    except (requests.RequestException, ValueError, AttributeError) as e:
        print(f"warning: cannot list the server's labels ({e}); importing all", file=sys.stderr)
    return out


def register(sub) -> None:
    p = sub.add_parser("dicom-upload", help="store NIfTI studies (as CT series) or a DICOM series in a DICOMweb PACS")
    p.add_argument("--dicomweb", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--studies", help="studies folder of NIfTI images (sex/age from cases.csv or truth/cases.csv)")
    g.add_argument("--series", help="folder of one existing DICOM series")
    p.add_argument("--seed", default=0, help="UID seed for converted volumes (same seed, same UIDs)")
    p.add_argument("--study-uid")
    p.add_argument("--series-uid")
    p.add_argument("--patient-id")
    p.add_argument("--sex")
    p.add_argument("--age")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("run-dicom", help="start Orthanc, store the studies in it as DICOM, start the server on it")
    p.add_argument("--studies", default="sample-apps/studies")
    p.add_argument("--app", default="apps/sentinel")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"))
    p.add_argument("--orthanc-dir", help="keep Orthanc's storage here (default: a temporary folder, removed at exit)")
    p.add_argument("--cache", help="MONAI Label's DICOMweb cache folder, where the pseudo-labels live (default: a "
                   "temporary folder); with the same --orthanc-dir and --cache a restart finds everything again")
    p.add_argument("--orthanc-port", type=int, help="Orthanc's HTTP port (default: the last run's in --orthanc-dir "
                   "when free, else a free one)")
    p.add_argument("--orthanc-dicom-port", type=int, help="Orthanc's DICOM port (default as --orthanc-port)")
    p.add_argument("--real-series", help="also load this DICOM series folder (UIDs assigned, like a series "
                   "anonymised down to empty UIDs)")
    p.add_argument("--wait", type=float, default=600)
    p.set_defaults(func=run_dicom)
