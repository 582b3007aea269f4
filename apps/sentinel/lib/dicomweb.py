"""The app's DICOMweb datastore: MONAI Label 0.8.5's DICOMWebDatastore with the fixes Label Sentinel needs.

Image ids are SeriesInstanceUIDs; images are fetched once and cached as NIfTI (MONAI Label's cache folder,
``MONAI_LABEL_DICOMWEB_CACHE_PATH``). Pseudo-labels (``original`` and other non-final tags) live in that
cache only; a ``final`` label is also sent to the PACS as a DICOM SEG (dcmqi's ``itkimage2segimage``).

Fixed here:

- ``get_label_uri(label_id, "final")`` without an image id (how the quality scoring, the corrections and
  Slicer's ``/datastore/label`` call it) pointed at ``labels/final/.nii.gz`` and fetched the *image* series as
  if it were a SEG; here a final label saved through this server is read from the cache, and a SEG found only
  in the PACS is fetched and mapped to label ids by segment name (not by segment number, which dcmqi
  renumbers 1..n).
- segment names: MONAI Label names the SEG's segments by position in ``label_info``; here every segment gets
  the name of its label id (from ``label_info`` entries with ``idx``/``id``, else the app's label names), as
  its label and description, and the SEG series is described as "Label Sentinel final label" (MONAI Label:
  "AIName" and "Unknown"; its ContentCreatorName stays dcmqi's template's "Reader1").
- listing: MONAI Label caches the PACS's series and SEG lists for ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 h),
  so series and SEGs added to the PACS stayed invisible that long; here both lists are asked again after
  ``LABELSENTINEL_DICOMWEB_REFRESH`` seconds (default 30), an image id not in the list is looked up once more
  at once before it is refused, and a final label saved through this server counts at once. Every QIDO query
  pages through the answers (``offset``), so a PACS that answers page by page is listed in full (Orthanc's
  ``LimitFindResults`` cannot be paged past: it caps the whole search, offset included; leave it unset).
- an image id that is not one of this server's series (unknown, or outside ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``,
  e.g. an MR series in a CT server's PACS) answers 404 for an image request and for a label save; nothing is
  written to the PACS (MONAI Label answered 500, IndexError, or stored the SEG of a series it does not serve).
- a series whose slices are not evenly spaced (missing or duplicate slices) is refused with the reason (422,
  logged) instead of being served on a uniform grid where its slices, and any label saved on it, would be off.
- the NIfTI MONAI Label's ``dicom_to_nifti`` writes to the temp folder for every series fetched is removed once
  it is copied into the cache.
- the PACS unreachable: listing answers from the last good answer (logged), and saving a final label fails
  with a clear 503 that names the PACS; the annotator's file is kept under ``CACHE/unsent/`` so no work is
  lost, and nothing saved before is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
NETWORK_ERRORS = (requests.RequestException, ConnectionError, OSError)
REFRESH_ENV = "LABELSENTINEL_DICOMWEB_REFRESH"  # seconds between two listings of the PACS (default 30)


# SeriesDescription of the SEG a final label is stored as (what a PACS or OHIF lists the series as)
SEG_SERIES_DESCRIPTION = "Label Sentinel final label"


def refresh_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(REFRESH_ENV, "") or 30))
    except ValueError:
        logger.warning(f"{REFRESH_ENV}={os.environ.get(REFRESH_ENV)!r} is not a number of seconds; using 30")
        return 30.0


class PACSUnavailable(HTTPException):
    def __init__(self, url: str, what: str, err: Exception):
        super().__init__(status_code=503, detail=f"the DICOMweb server {url} cannot be reached ({what}): "
                                                 f"{type(err).__name__}: {str(err)[:200]}")


class SentinelDICOMWebDatastore(DICOMWebDatastore):
    """Made from the stock datastore the app built (client, cache, filter): see :meth:`adopt`."""

    names: dict[int, str] = {}

    @classmethod
    def adopt(cls, ds: DICOMWebDatastore, names: dict[int, str]) -> "SentinelDICOMWebDatastore":
        ds.__class__ = cls
        ds.names = dict(names)
        ds._last = {}
        ds._lists = {}  # key -> (time, list): the PACS's lists, asked again after refresh_seconds()
        ds._seg_refs = {}  # SEG SeriesInstanceUID -> the series it refers to ("" if none): a SEG never changes
        ds._seg_by_image = {}  # image id -> SEG SeriesInstanceUID in the PACS
        ds._spacing = {}  # image id -> (number of files, problem or None)
        ds._list_lock = threading.RLock()
        return ds

    @property
    def cache_dir(self) -> str:
        return self._datastore_path

    # ------------------------------------------------------------------ listing, robust to a PACS outage
    def _remember(self, key: str, fn):
        try:
            out = fn()
        except NETWORK_ERRORS as e:
            if key in self._last:
                logger.error(f"DICOMweb server {self._client.base_url} unreachable ({type(e).__name__}); "
                             f"answering {key} from the last good answer")
                return list(self._last[key])
            raise PACSUnavailable(self._client.base_url, key, e) from e
        self._last[key] = list(out)
        return out

    def _timed(self, key: str, fn, refresh: bool = False) -> list:
        """``fn()``'s answer, asked again when older than refresh_seconds() (or ``refresh``); outages: _remember."""
        with self._list_lock:
            got = self._lists.get(key)
            if got and not refresh and time.time() - got[0] < refresh_seconds():
                return list(got[1])
            out = self._remember(key, lambda: (self._check_reachable(), fn())[1])
            self._lists[key] = (time.time(), list(out))
            return list(out)

    def _check_reachable(self, timeout: float = 3.0) -> None:
        """A TCP connection to the PACS first: the DICOMweb client retries a refused connection for about 30 s,
        which, at every refresh of the lists during an outage, stalled the requests that asked for them."""
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(self._client.base_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        with socket.create_connection((u.hostname, port), timeout=timeout):
            pass

    def _search(self, filters) -> list[dict]:
        from labelsentinel.dicom import search_series_all

        return search_series_all(self._client, filters, warn=logger.warning)

    def list_images(self, refresh: bool = False):
        def query():
            uids = [str(js["0020000E"]["Value"][0]) for js in self._search(self._search_filter)
                    if (js.get("0020000E") or {}).get("Value")]
            return list(dict.fromkeys(uids))

        return self._timed("list_images", query, refresh)

    def _remote_labeled(self, refresh: bool = False) -> list[str]:
        """The listed series that have a SEG in the PACS (each SEG's metadata is asked once)."""
        def scan():
            images = set(self.list_images(refresh))
            by_image = {}
            for js in self._search({"Modality": "SEG"}):
                seg_uid = str(((js.get("0020000E") or {}).get("Value") or [""])[0])
                if seg_uid not in self._seg_refs:
                    study = str(((js.get("0020000D") or {}).get("Value") or [""])[0])
                    meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg_uid)[0])
                    refs = meta.get("ReferencedSeriesSequence") or []
                    self._seg_refs[seg_uid] = str(refs[0].get("SeriesInstanceUID", "") or "") if refs else ""
                ref = self._seg_refs[seg_uid]
                if ref in images:
                    by_image[ref] = seg_uid
                elif ref:
                    logger.debug(f"SEG {seg_uid} ignored: its series {ref} is not one of this server's images")
            self._seg_by_image = by_image
            return sorted(by_image)

        return self._timed("labeled_images", scan, refresh)

    def get_labeled_images(self, label_tag=None, labels=None):
        remote = self._remote_labeled()
        local = LocalDatastore.get_labeled_images(self)  # final labels saved through this server, at once
        images = set(self.list_images())
        return sorted(set(remote) | (set(local) & images))

    def _known_image(self, image_id: str, action: str) -> None:
        """404 unless ``image_id`` is one of this server's series (the list is asked again once before refusing:
        a series just added to the PACS). When the PACS cannot be reached and was never listed, nothing is
        refused here (the caller's own outage handling answers)."""
        try:
            if image_id in self.list_images() or image_id in self.list_images(refresh=True):
                return
        except PACSUnavailable:
            return
        raise HTTPException(status_code=404, detail=(
            f"{action}: image {image_id!r} is not one of this server's images (no series with this "
            f"SeriesInstanceUID matching {self._search_filter} in {self._client.base_url})"))

    # ------------------------------------------------------------------ images
    def get_image_uri(self, image_id: str) -> str:
        from monailabel.datastore.utils.convert import dicom_to_nifti
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        image_nii_gz = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        cached = os.path.isdir(image_dir) and os.listdir(image_dir)
        if not (cached and os.path.exists(image_nii_gz)):
            self._known_image(image_id, f"image {image_id} is not available")
        if not cached:
            try:
                dicom_web_download_series(None, image_id, image_dir, self._client, self._fetch_by_frame)
            except IndexError as e:  # the PACS has no such series (any more)
                shutil.rmtree(image_dir, ignore_errors=True)
                raise HTTPException(status_code=404, detail=f"image {image_id!r}: no such series in "
                                                            f"{self._client.base_url}") from e
            except NETWORK_ERRORS as e:
                shutil.rmtree(image_dir, ignore_errors=True)
                raise PACSUnavailable(self._client.base_url, f"fetching series {image_id}", e) from e
        if not self._convert_to_nifti:
            return image_dir
        problem = self._spacing_problem(image_id, image_dir)
        if problem:
            raise HTTPException(status_code=422, detail=f"image {image_id} is not served: {problem}")
        if not os.path.exists(image_nii_gz):
            tmp = dicom_to_nifti(image_dir)
            try:
                LocalDatastore.add_image(self, image_id, tmp, self._dicom_info(image_id))
            finally:
                if tmp and os.path.isfile(tmp) and os.path.realpath(tmp) != image_nii_gz:
                    os.unlink(tmp)  # MONAI Label's dicom_to_nifti leaves it in the temp folder
        return image_nii_gz

    def _spacing_problem(self, image_id: str, image_dir: str) -> str | None:
        """Why the cached series' slices cannot be served on one uniform grid (see dicom.slice_spacing_problem)."""
        import pydicom

        from labelsentinel.dicom import slice_spacing_problem

        files = sorted(os.listdir(image_dir))
        known = self._spacing.get(image_id)
        if known and known[0] == len(files):
            return known[1]
        dss = []
        for f in files:
            try:
                dss.append(pydicom.dcmread(os.path.join(image_dir, f), stop_before_pixels=True))
            except Exception:
                continue
        problem = slice_spacing_problem(dss, f"series {image_id}")
        if problem:
            logger.error(f"image {image_id} refused: {problem}")
        self._spacing[image_id] = (len(files), problem)
        return problem

    def image_error(self, image_id: str, save: bool = True) -> str | None:
        """Why a series already fetched is not served (uneven slices), else None; never fetches anything."""
        known = self._spacing.get(image_id)
        return known[1] if known else None

    def unreadable_images(self) -> dict[str, str]:
        return {i: p for i, (_, p) in self._spacing.items() if p}

    def unreadable_labels(self) -> dict[str, str]:
        return {}

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    # ------------------------------------------------------------------ labels
    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        image_id = image_id or label_id
        local = LocalDatastore.get_label_uri(self, image_id, FINAL)
        if local and os.path.isfile(local):
            return local
        seg_uid = label_id if label_id != image_id else self._seg_of(image_id)
        if not seg_uid:
            return ""
        return self._fetch_seg(image_id, seg_uid)

    def _seg_of(self, image_id: str) -> str:
        """The SeriesInstanceUID of a SEG in the PACS that refers to the image series ('' if none). Not in the
        last listing: the PACS is asked again (a SEG just stored by another tool); one QIDO query, the
        metadata of SEGs seen before is not fetched again."""
        for refresh in (False, True):
            self._remote_labeled(refresh)
            if image_id in self._seg_by_image:
                return self._seg_by_image[image_id]
        return ""

    def _download_labeled_data(self):
        """MONAI Label's, on the paged, refreshed lists: every listed series with a SEG in the PACS is fetched with
        its label (a series that cannot be served is left out, logged). Unlike MONAI Label, no final label is
        deleted from the cache here (a list answered from memory during an outage must not delete labels)."""
        try:
            self._remote_labeled(refresh=True)
        except PACSUnavailable as e:
            logger.error(f"training data: {e.detail}; using the cached images and labels")
            return
        for image_id, seg_uid in dict(self._seg_by_image).items():
            try:
                self.get_image_uri(image_id)
                self.get_label_uri(seg_uid, FINAL, image_id)
            except HTTPException as e:
                logger.error(f"training data: {image_id} left out: {e.detail}")

    def _fetch_seg(self, image_id: str, seg_uid: str) -> str:
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        from labelsentinel.dicom import read_seg, seg_to_label
        from labelsentinel.io import save_nifti

        seg_dir = os.path.join(self._datastore.label_path(FINAL), seg_uid)
        if not os.path.isdir(seg_dir) or not os.listdir(seg_dir):
            dicom_web_download_series(None, seg_uid, seg_dir, self._client, self._fetch_by_frame)
        files = sorted(os.listdir(seg_dir))
        seg = read_seg(os.path.join(seg_dir, files[0]))
        names = self.names or {i + 1: n for i, n in enumerate(seg.segments.values())}
        arr, affine, mapping = seg_to_label(seg, self.get_image_uri(image_id), names)
        out = os.path.join(self.cache_dir, "seg-import", f"{image_id}.nii.gz")
        save_nifti(out, arr, affine)
        LocalDatastore.save_label(self, image_id, out, FINAL, {**self._dicom_info(seg_uid), "segments": mapping})
        return LocalDatastore.get_label_uri(self, image_id, FINAL)

    def _segment_info(self, label_filename: str, label_info) -> list[dict]:
        """One entry per label value present, in increasing order, named after its id."""
        import numpy as np

        from labelsentinel.io import load_volume

        given = {}
        for e in label_info or []:
            if isinstance(e, dict):
                idx = e.get("idx", e.get("id", e.get("labelID")))
                if idx is not None:
                    given[int(idx)] = e
        values = [int(v) for v in np.unique(load_volume(label_filename).array) if v]
        out = []
        for v in values:
            e = dict(given.get(v, {}))
            e.setdefault("name", self.names.get(v, f"label_{v}"))
            e.setdefault("description", e["name"])  # MONAI Label's default SegmentDescription: "Unknown"
            out.append(e)
        if out:  # MONAI Label names the SEG series after the first entry's model_name, else "AIName"
            out[0].setdefault("model_name", SEG_SERIES_DESCRIPTION)
        return out

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from lib.datastore import drop_refused_upload

        try:
            return self._checked_save_label(image_id, label_filename, label_tag, label_info, label_id)
        except HTTPException as e:
            if e.status_code < 500:  # refused (a 503 keeps its copy under CACHE/unsent/ already)
                drop_refused_upload(label_filename)
            raise

    def _checked_save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from lib.datastore import name_problem, refuse_bad_label, remap_by_label_info

        label_tag = label_tag or FINAL
        for value, what in ((label_tag, "label tag"), (image_id, "image id")):  # both become cache paths
            problem = name_problem(value, what)
            if problem:
                raise HTTPException(status_code=422, detail=f"the label was NOT saved: {problem}")
        self._known_image(image_id, f"the {label_tag} label of {image_id} was NOT saved")
        if label_tag != FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        label_info = dict(label_info or {})
        remapped = None
        if label_filename.endswith((".nii", ".nii.gz")):  # a NIfTI (Slicer): checked against the series' grid
            refuse_bad_label(self, image_id, label_filename, label_tag)
            # Slicer's values 1..N, named in label_info: stored (cache and SEG) with the app's ids
            remapped, _, info_out = remap_by_label_info(label_filename, label_info.get("label_info"), self.names,
                                                        f"the {label_tag} label of {image_id}")
            if info_out is not None:
                label_info["label_info"] = info_out
        try:
            return self._save_final(image_id, remapped or label_filename, label_tag, label_info, label_id)
        finally:
            if remapped:
                os.unlink(remapped)

    def _save_final(self, image_id, label_filename, label_tag, label_info, label_id=""):
        if not label_filename.endswith(".bin"):
            try:
                label_info["label_info"] = self._segment_info(label_filename, label_info.get("label_info"))
            except Exception as e:  # unreadable: MONAI Label's own conversion reports it
                logger.warning(f"segment names for {image_id}: {e}")
        try:
            self._check_reachable()  # the PACS down: at once, not after the DICOMweb client's ~30 s of retries
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        except (*NETWORK_ERRORS, PACSUnavailable) as e:
            keep = os.path.join(self.cache_dir, "unsent", f"{image_id}-{int(time.time())}{_ext(label_filename)}")
            os.makedirs(os.path.dirname(keep), exist_ok=True)
            shutil.copyfile(label_filename, keep)
            logger.error(f"final label of {image_id} not saved: PACS unreachable; the file is kept at {keep}")
            raise HTTPException(status_code=503, detail=(
                f"the final label of {image_id} was NOT saved: the DICOMweb server {self._client.base_url} cannot be "
                f"reached ({type(e).__name__}). Your label is kept on the server at {keep}; save it again when the "
                "PACS is back. Labels saved before are not affected.")) from e


def _ext(path: str) -> str:
    for e in (".nii.gz", ".nii", ".nrrd", ".bin"):
        if path.endswith(e):
            return e
    return os.path.splitext(path)[1]


def adopt_remote(ds, names: dict[int, str]):
    """The app's remote datastore: a DICOMweb one gets the fixes above; others (XNAT, DSA) are left as they are."""
    if isinstance(ds, DICOMWebDatastore):
        return SentinelDICOMWebDatastore.adopt(ds, names)
    return ds
