"""The app's local datastore: MONAI Label's LocalDatastore, made safe for annotation traffic.

- Unreadable images and labels are logged (file and reason), listed, and kept out of active learning and
  training; a case whose final label cannot be read counts as unlabelled (it is served again).
- ``datastore_v2.json`` is written atomically (temp file in the same folder, fsync, ``os.replace``): a crash
  never leaves it empty or cut short. One that cannot be read at start-up anyway (written by another tool,
  or by MONAI Label's own non-atomic writer) is kept aside, renamed, and the datastore is rebuilt from the
  files on disk, with a warning; no image or label file is lost.
- Uploads are checked before anything is written: ids and tags must be plain names (no path separators,
  ``..`` or NUL: HTTP 422), an image must be readable (422) and its id new (409: replacing an image would
  leave its labels on another grid), a label must be readable and on its image's grid (422), and its image
  must exist (404) and be readable (422). Label files are written atomically too.
- One current file per image and tag: saving ``X.nii`` where ``X.nii.gz`` exists moves the older one into
  ``.labelsentinel/label-history/`` (never deleted), so a later rebuild cannot bring back an old label. A label
  saved over one of the same tag (a second annotator's final, a re-submit) keeps the one it replaces there too
  (MONAI Label overwrote it), and the new label's info says which (``replaced``: its time, client id, file).
- 3D Slicer exports a segmentation with values 1..N in segment order and names them in
  ``params["label_info"]`` (``[{"name": "aorta", "idx": 7}, ...]``); the values are rewritten to the ids the
  app's structure names give (unknown names: HTTP 422), so a Slicer save stores the app's label ids.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from labelsentinel.imagecheck import ImageCheckCache
from labelsentinel.io import VolumeError, atomic_copy, atomic_write, label_upload_problem, load_image, load_label

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
HISTORY = os.path.join(".labelsentinel", "label-history")
# Image ids and label tags as real studies use them: file names (with single spaces inside, as "Patient 01"),
# DICOM UIDs (digits and dots).
_SAFE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]| (?! )){0,198}[A-Za-z0-9._-]|[A-Za-z0-9]")


def name_problem(value: str | None, what: str) -> str | None:
    """Why ``value`` cannot be used as an image id or label tag (it becomes part of a file path); None if it can."""
    if not value:
        return f"the {what} is empty"
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        return (f"the {what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' (starting with a letter "
                "or digit, single spaces inside; no path separators, '..' or control characters)")
    return None


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def refuse_bad_label(datastore, image_id: str, label_filename: str, label_tag: str) -> None:
    try:
        image = datastore.get_image_uri(image_id)
    except HTTPException as e:  # the datastore's own answer: 404 unknown image, 422 image not served
        if e.status_code >= 500:  # an outage: the caller's save reports it (and keeps the file)
            return
        raise
    except Exception:  # an unknown image: the caller's save reports it
        return
    problem = label_upload_problem(image, label_filename)
    if problem:
        logger.error(f"{label_tag} label of {image_id} refused: {problem}")
        raise _unprocessable(f"the {label_tag} label of {image_id} was NOT saved: {problem}")


def drop_refused_upload(label_filename: str) -> None:
    """Remove the temp file MONAI Label's ``PUT /datastore/label`` wrote the upload to, when the save is refused:
    the endpoint removes it in a background task that does not run when the request fails, so every refused
    save left a ``/tmp/tmp*.nii.gz``. Only a ``tmp*`` file directly in the temp folder is removed."""
    try:
        if (os.path.dirname(os.path.abspath(label_filename)) == os.path.abspath(tempfile.gettempdir())
                and os.path.basename(label_filename).startswith("tmp") and os.path.isfile(label_filename)):
            os.unlink(label_filename)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- label_info
def _norm_name(name) -> str:
    return re.sub(r"[\s_-]+", "_", str(name).strip().lower())


def _read_label_array(path: str):
    """(int64 array, writer(array, out_path)) for the label formats this app reads."""
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        arr = np.rint(np.asanyarray(img.dataobj)).astype(np.int64)

        def write(out: np.ndarray, dest: str) -> None:
            hdr = img.header.copy()
            hdr.set_data_dtype(out.dtype)
            new = type(img)(out, img.affine, hdr)
            new.header.set_slope_inter(1, 0)
            nib.save(new, dest)

        return arr, write
    if path.endswith((".nrrd", ".mha", ".mhd")):
        import SimpleITK as sitk

        img = sitk.ReadImage(path)
        arr = np.rint(sitk.GetArrayFromImage(img)).astype(np.int64)

        def write(out: np.ndarray, dest: str) -> None:
            new = sitk.GetImageFromArray(out)
            new.CopyInformation(img)
            sitk.WriteImage(new, dest, True)

        return arr, write
    return None, None


def remap_by_label_info(label_filename: str, label_info, names: dict[int, str],
                        what: str) -> tuple[str | None, dict, list | None]:
    """The label values a viewer sent, rewritten to the app's ids by structure name.

    3D Slicer exports the segments it saves with values 1..N in segment order and names them in ``label_info``
    (``[{"name": "aorta", "idx": 1}, ...]``). Each named value is mapped to the id ``names`` gives that name
    (case, spaces, hyphens and underscores ignored). Returns (path of a rewritten copy, or None when the file is
    already in the app's ids; {sent value: stored id}; label_info with each named entry's ``idx`` set to the app's
    id, None when there was nothing to map). Raises HTTP 422 for names the app does not know, or a
    rewrite that would merge a renamed structure with a value the file already holds for another one."""
    if not isinstance(label_info, list):
        return None, {}, None
    entries = [e for e in label_info if isinstance(e, dict) and str(e.get("name") or "").strip()]
    if not entries:
        return None, {}, None
    by_name: dict[str, int] = {}
    for i in sorted(names):
        by_name.setdefault(_norm_name(names[i]), int(i))
    unknown = [str(e["name"]) for e in entries if _norm_name(e["name"]) not in by_name]
    if unknown:
        known = ", ".join(names[i] for i in sorted(names)) or "none"
        raise _unprocessable(f"{what} was NOT saved: segment name(s) {unknown} are not structures of this app "
                             f"(known: {known}); rename the segment(s) to one of these names")
    info_out = [dict(e, idx=by_name[_norm_name(e["name"])]) if e in entries else e for e in label_info]
    arr, write = _read_label_array(label_filename)
    if arr is None:
        logger.warning(f"{what}: label_info names given but {os.path.basename(label_filename)} is not a format "
                       "this app rewrites; stored as sent")
        return None, {}, None
    present = {int(v) for v in np.unique(arr) if v}
    by_idx: dict[int, int] = {}
    for pos, e in enumerate(entries):
        raw = e.get("idx", e.get("id", e.get("labelID")))
        try:
            sent = int(raw) if raw is not None else pos + 1
        except (TypeError, ValueError):
            sent = pos + 1
        by_idx[sent] = by_name[_norm_name(e["name"])]
    mapping = by_idx
    if not present <= set(by_idx) and present <= set(range(1, len(entries) + 1)):
        # Slicer numbers idx by position among all its segments (skipped ones included) but exports the saved
        # segments as 1..N in order: the position is what the file holds.
        mapping = {pos + 1: by_name[_norm_name(e["name"])] for pos, e in enumerate(entries)}
    mapping = {v: t for v, t in mapping.items() if v in present}
    kept = present - set(mapping)
    clash = sorted({t for t in mapping.values() if t in kept})
    if clash:
        raise _unprocessable(f"{what} was NOT saved: the file holds value(s) {clash} without a name in label_info, "
                             f"and label_info maps other segments to the same id(s): name every segment")
    if all(v == t for v, t in mapping.items()):
        return None, mapping, info_out
    lut = {**{v: v for v in kept}, **mapping}
    out = np.zeros(arr.shape, np.int64)
    for v, t in lut.items():
        out[arr == v] = t
    top = max(lut.values(), default=0)
    out = out.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32)
    suffix = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") if label_filename.endswith(e)), "")
    fd, dest = tempfile.mkstemp(suffix=suffix, prefix="remapped-")
    os.close(fd)
    write(out, dest)
    logger.info(f"{what}: segment values rewritten to the app's ids by name: {mapping}")
    return dest, mapping, info_out


# ---------------------------------------------------------------------------------------------- label checks
class LabelCheckCache(ImageCheckCache):
    """Like the image checks: a label file is read once per version (size, mtime); the verdict is cached."""

    def check(self, path: str, save: bool = True) -> str | None:
        if not path.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
            return None  # a format this app does not read is not judged
        return super().check(path, save)

    what = "label"

    def _load(self, path: str) -> None:
        load_label(path)


class SentinelDatastore(LocalDatastore):
    """MONAI Label's local datastore with the checks and the crash safety described in this module's docstring."""

    def __init__(self, datastore_path: str, structure_names: dict | Callable[[], dict] | None = None, **kwargs):
        self._config_rebuilt = False
        self._structure_names = structure_names
        self._history_lock = threading.Lock()
        # MONAI Label reconciles the list from the file watcher's thread while requests change it: one at a time
        # (a reconcile iterating the list while another thread changed it failed with "dictionary changed size")
        self._model_lock = threading.RLock()
        labels_dir = kwargs.get("labels_dir", "labels")
        exts = kwargs.get("extensions", ("*.nii.gz", "*.nii"))
        exts = [exts] if isinstance(exts, str) else list(exts)
        self._exts = sorted((e.replace("*", "") for e in exts), key=len, reverse=True)
        self._history_dir = os.path.join(datastore_path, HISTORY)
        self._one_file_per_label(os.path.join(datastore_path, labels_dir))
        super().__init__(datastore_path, **kwargs)
        if self._config_rebuilt and kwargs.get("read_only"):
            self._reconcile_datastore()  # MONAI Label skips this when read-only; the list must come from the files
        self._checks = ImageCheckCache(os.path.join(datastore_path, ".labelsentinel", "image_checks.json"))
        self._label_checks = LabelCheckCache(os.path.join(datastore_path, ".labelsentinel", "label_checks.json"))
        bad = self.unreadable_labels()
        if bad:
            logger.warning(f"{len(bad)} label file(s) cannot be read; they are not used, and a case whose final label "
                           f"is one of them is served again: {bad}")

    # ------------------------------------------------------------------ structure names (label_info)
    def set_structure_names(self, names: dict | Callable[[], dict]) -> None:
        """The app's structure names (id -> name), or a function returning them: Slicer's segment names are
        mapped to label ids with them."""
        self._structure_names = names

    def structure_names(self) -> dict[int, str]:
        src = self._structure_names
        if src is None:  # not given: the app this datastore belongs to, once it is running
            from monailabel.interfaces.utils.app import apps

            owner = next((a for a in list(apps.values()) if getattr(a, "_datastore", None) is self), None)
            src = getattr(owner, "structure_names", None)
        try:
            names = src() if callable(src) else (src or {})
        except Exception as e:
            logger.error(f"structure names unavailable: {e}")
            names = {}
        return {int(k): str(v) for k, v in names.items()}

    def _reconcile_datastore(self):
        with self._model_lock:
            return super()._reconcile_datastore()

    # ------------------------------------------------------------------ the JSON file: atomic, recoverable
    def _update_datastore_file(self, lock=True):
        def _write_to_file():
            data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, data.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                _write_to_file()
        else:
            _write_to_file()

    def _init_from_datastore_file(self, throw_exception=False):
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as e:
            if not throw_exception:  # while running: keep what is in memory; the next write replaces the file
                logger.error(f"+++ Failed to load datastore => {e}")
                return
            self._set_aside_bad_config(e)

    def _set_aside_bad_config(self, err: Exception) -> None:
        path = self._datastore_config_path
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        bad, n = f"{path}.unreadable-{stamp}", 1
        while os.path.exists(bad):
            n += 1
            bad = f"{path}.unreadable-{stamp}-{n}"
        with FileLock(self._lock_file):
            os.replace(path, bad)
        self._config_ts = 0
        self._config_rebuilt = True
        first = str(err).strip().splitlines()
        logger.warning(f"the datastore file {path} cannot be read ({first[0] if first else type(err).__name__}"
                       f"{' ...' if len(first) > 1 else ''}); it is kept as {bad} and the datastore is rebuilt from the "
                       f"images and labels on disk in {self._datastore_path} (no file is lost; the labels' saved "
                       "info such as who saved them is not recovered)")

    # ------------------------------------------------------------------ one current file per image and tag
    def _label_files(self, tag_dir: str, image_id: str) -> list[str]:
        try:
            files = os.listdir(tag_dir)
        except OSError:
            return []
        return [f for f in files for e in self._exts if f == image_id + e]

    def _move_to_history(self, path: str, tag: str, why: str, copy: bool = False) -> str:
        """``path`` into the label history (never deleted); ``copy``: a copy, the file stays (it is about to be
        replaced atomically, so the current label exists at every moment)."""
        name = os.path.basename(path)
        ext = next((e for e in self._exts if name.endswith(e)), "")
        stem = name[: len(name) - len(ext)] if ext else name
        dest_dir = os.path.join(self._history_dir, tag)
        with self._history_lock:
            os.makedirs(dest_dir, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
            dest, n = os.path.join(dest_dir, f"{stem}.{stamp}{ext}"), 1
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(dest_dir, f"{stem}.{stamp}-{n}{ext}")
            if copy:
                atomic_copy(path, dest)
            else:
                os.replace(path, dest)
        logger.warning(f"{path} {'copied' if copy else 'moved'} to {dest}: {why}")
        return dest

    def _one_file_per_label(self, labels_dir: str) -> None:
        """Start-up: where one image and tag has files with several extensions, the newest stays."""
        if not os.path.isdir(labels_dir):
            return
        for tag in sorted(os.listdir(labels_dir)):
            tag_dir = os.path.join(labels_dir, tag)
            if not os.path.isdir(tag_dir):
                continue
            groups: dict[str, list[str]] = {}
            for f in os.listdir(tag_dir):
                ext = next((e for e in self._exts if f.endswith(e)), None)
                if ext:
                    groups.setdefault(f[: len(f) - len(ext)], []).append(os.path.join(tag_dir, f))
            for image_id, paths in groups.items():
                if len(paths) > 1:
                    paths.sort(key=os.path.getmtime)
                    for p in paths[:-1]:
                        self._move_to_history(p, tag, f"an older {tag} label of {image_id} than "
                                                      f"{os.path.basename(paths[-1])}")

    # ------------------------------------------------------------------ checks
    def image_error(self, image_id: str, save: bool = True) -> str | None:
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            return f"{image_id}: not in the datastore"
        # the path without realpath() (get_image_uri resolves links at each call): this runs for every case at every
        # next sample
        uri = os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))
        try:
            return self._checks.check(uri, save)
        except Exception as e:  # an id whose file vanished
            return f"{image_id}: {e}"

    def unreadable_images(self) -> dict[str, str]:
        out = {}
        try:
            for i in self.list_images():
                err = self.image_error(i, save=False)
                if err:
                    out[i] = err
        finally:
            self._checks.flush()
        return out

    def label_error(self, image_id: str, tag: str = FINAL, save: bool = True) -> str | None:
        """None if the image's label of this tag can be read as a label map (or there is none), else why not."""
        label = self._datastore.label(image_id, tag)
        if not label:
            return None
        # the path without realpath(): this runs for every labelled case at every next sample
        uri = os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext))
        try:
            return self._label_checks.check(uri, save)
        except Exception as e:
            return f"{uri}: {e}"

    def unreadable_labels(self) -> dict[str, str]:
        """``{"image/tag": reason}`` for every label file that cannot be read as a label map."""
        out = {}
        try:
            for image_id, obj in list(self._datastore.objects.items()):
                for tag in list(obj.labels):
                    err = self.label_error(image_id, tag, save=False)
                    if err:
                        out[f"{image_id}/{tag}"] = err
        finally:
            self._label_checks.flush()
        return out

    def get_labeled_images(self, label_tag=None, labels=None):
        try:
            return [i for i in super().get_labeled_images(label_tag, labels)
                    if not self.image_error(i, save=False) and not self.label_error(i, FINAL, save=False)]
        finally:
            self._checks.flush()
            self._label_checks.flush()

    def get_unlabeled_images(self, label_tag=None, labels=None):
        """Images without a final label, and those whose final label cannot be read (they need one)."""
        out = []
        try:
            for i, obj in list(self._datastore.objects.items()):
                if obj.labels.get(FINAL) and not self.label_error(i, FINAL, save=False):
                    continue
                if not self.image_error(i, save=False):
                    out.append(i)
        finally:
            self._checks.flush()
            self._label_checks.flush()
        return out

    def datalist(self, full_path=True):
        bad = {os.path.realpath(self.get_image_uri(i)) for i in self.unreadable_images()}
        return [d for d in super().datalist(full_path) if os.path.realpath(d["image"]) not in bad]

    # ------------------------------------------------------------------ uploads
    def _known_image(self, image_id: str, action: str) -> None:
        """404 for an image id the datastore does not have (422 if it could not even be one)."""
        if image_id in self._datastore.objects:
            return
        problem = name_problem(image_id, "image id")
        if problem:
            raise _unprocessable(f"{action}: {problem}")
        raise HTTPException(status_code=404, detail=f"{action}: image {image_id!r} is not in the datastore")

    def _check_tag(self, tag: str, action: str) -> None:
        if tag in self._datastore.tags() or tag in (FINAL, DefaultLabelTag.ORIGINAL.value):
            return
        problem = name_problem(tag, "label tag")
        if problem:
            raise _unprocessable(f"{action}: {problem}")

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """A new image: a plain, unused id (422 / 409) and a readable 3D image (422); written atomically."""
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or derived
        problem = name_problem(image_id, "image id")
        if problem:
            raise _unprocessable(f"the image was NOT added: {problem}")
        if image_ext not in self._exts:
            raise _unprocessable(f"the image {image_id} was NOT added: file type {image_ext or '(none)'} is not one "
                                 f"of this datastore's ({', '.join(self._exts)})")
        on_disk = [f for f in os.listdir(self._datastore.image_path())
                   if any(f == image_id + e for e in self._exts)]
        if image_id in self._datastore.objects or on_disk:
            raise HTTPException(status_code=409, detail=(
                f"the image was NOT added: image {image_id!r} already exists. Replacing it would leave its labels on "
                f"another image's grid: delete it first (DELETE /datastore/image?id={image_id}, which also deletes its "
                "labels) or upload under another id"))
        try:
            load_image(image_filename)
        except VolumeError as e:
            raise _unprocessable(f"the image {image_id} was NOT added: "
                                 f"{str(e).replace(image_filename, 'the uploaded file')}") from e
        name = self._filename(image_id, image_ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        logger.info(f"Adding Image: {image_id} => {image_filename}")
        with self._model_lock, FileLock(self._lock_file):
            # labels left on disk under this id (by another image once): they are not this image's labels
            labels_root = self._datastore.label_path(None)
            for tag in sorted(os.listdir(labels_root)):
                tag_dir = os.path.join(labels_root, tag)
                for f in self._label_files(tag_dir, image_id) if os.path.isdir(tag_dir) else []:
                    self._move_to_history(os.path.join(tag_dir, f), tag,
                                          f"left from an earlier image {image_id}; not a label of the new upload")
            atomic_copy(image_filename, dest)
            info = dict(image_info or {})
            info["ts"] = int(time.time())
            info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        with self._model_lock:
            self._known_image(image_id, "nothing was deleted")
            super().remove_image(image_id)
            if self._auto_reload:  # at once, not when the file watcher gets to it: a second delete answers 404
                self.refresh()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._model_lock:
            self._known_image(label_id, "nothing was deleted")
            if not self._datastore.label(label_id, label_tag):
                raise HTTPException(status_code=404, detail=f"nothing was deleted: image {label_id!r} has no "
                                                            f"{label_tag!r} label")
            super().remove_label(label_id, label_tag)
            if self._auto_reload:
                self.refresh()

    def save_label(self, image_id, label_filename, label_tag, label_info):
        try:
            return self._checked_save_label(image_id, label_filename, label_tag, label_info)
        except HTTPException:
            drop_refused_upload(label_filename)
            raise

    def _checked_save_label(self, image_id, label_filename, label_tag, label_info):
        """Refuses (nothing stored) a label for an unknown image (404), an unsafe tag or an unreadable image
        (422), and a label that cannot be read, is not on the image's grid, or names structures the app does not
        know (422): stored, it would mark the case as labelled while no training or correction could use it."""
        label_tag = label_tag or FINAL
        what = f"the {label_tag} label of {image_id}"
        self._check_tag(label_tag, f"{what} was NOT saved")
        self._known_image(image_id, f"{what} was NOT saved")
        err = self.image_error(image_id)
        if err:
            raise _unprocessable(f"{what} was NOT saved: its image cannot be read ({err}); replace the image first")
        refuse_bad_label(self, image_id, label_filename, label_tag)
        label_info = dict(label_info or {})
        remapped, mapping, info_out = remap_by_label_info(label_filename, label_info.get("label_info"),
                                                          self.structure_names(), what)
        if info_out is not None:
            label_info["label_info"] = info_out  # each segment's idx: the id stored in the file
        if remapped:
            label_info["label_values_sent"] = {str(k): v for k, v in mapping.items()}
        try:
            return self._store_label(image_id, remapped or label_filename, label_tag, label_info)
        finally:
            if remapped:
                os.unlink(remapped)

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        logger.info(f"Adding Label: {image_id} => {label_tag} => {label_filename}")
        with self._model_lock, FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            if not obj:  # deleted meanwhile
                raise HTTPException(status_code=404, detail=f"the {label_tag} label of {image_id} was NOT saved: "
                                                            f"image {image_id!r} is not in the datastore")
            os.makedirs(label_path, exist_ok=True)
            before, kept = obj.labels.get(label_tag), None
            if os.path.isfile(dest):  # the label it replaces goes to the history first: no saved label is lost
                kept = self._move_to_history(dest, label_tag, f"replaced by the {label_tag} label just saved", copy=True)
            atomic_copy(label_filename, dest)
            for f in self._label_files(label_path, image_id):
                if f != name:
                    kept = self._move_to_history(os.path.join(label_path, f), label_tag,
                                                 f"replaced by the {label_tag} label {name} just saved")
            if before is not None or kept:  # who saved the label this one replaces, and where it is kept
                prev = dict(before.info or {}) if before is not None else {}
                label_info["replaced"] = {"ts": prev.get("ts"), "client_id": prev.get("client_id"),
                                          "history": os.path.relpath(kept, self._datastore_path) if kept else None}
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id
