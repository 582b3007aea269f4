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
  the name of its label id (from ``label_info`` entries with ``idx``/``id``, else the app's label names).
- the PACS's list of labelled series is cached for ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 h): a final label
  saved through this server counts at once.
- the PACS unreachable: listing answers from the last good answer (logged), and saving a final label fails
  with a clear 503 that names the PACS; the annotator's file is kept under ``CACHE/unsent/`` so no work is
  lost, and nothing saved before is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
NETWORK_ERRORS = (requests.RequestException, ConnectionError, OSError)


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

    def list_images(self):
        return self._remember("list_images", super().list_images)

    def get_labeled_images(self, label_tag=None, labels=None):
        remote = self._remember("labeled_images", lambda: super(SentinelDICOMWebDatastore, self).get_labeled_images())
        local = LocalDatastore.get_labeled_images(self)  # final labels saved through this server, at once
        images = set(self.list_images())
        return sorted(set(remote) | (set(local) & images))

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
        """The SeriesInstanceUID of a SEG in the PACS that refers to the image series ('' if none)."""
        from pydicom.dataset import Dataset

        for js in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(js)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                           str(seg.SeriesInstanceUID))[0])
            refs = meta.get("ReferencedSeriesSequence") or []
            if refs and str(refs[0].get("SeriesInstanceUID", "")) == image_id:
                return str(seg.SeriesInstanceUID)
        return ""

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
            out.append(e)
        return out

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from lib.datastore import name_problem, refuse_bad_label, remap_by_label_info

        label_tag = label_tag or FINAL
        for value, what in ((label_tag, "label tag"), (image_id, "image id")):  # both become cache paths
            problem = name_problem(value, what)
            if problem:
                raise HTTPException(status_code=422, detail=f"the label was NOT saved: {problem}")
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
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        except NETWORK_ERRORS as e:
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
