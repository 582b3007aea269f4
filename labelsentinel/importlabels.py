"""``labelsentinel import-labels``: bring pseudo-labels (NIfTI or DICOM SEG) into a MONAI Label datastore.

    labelsentinel import-labels --studies DIR   FILE... [--image ID ...] [--label-names JSON] [--tag original]
    labelsentinel import-labels --server URL    FILE... [--image ID ...] [--label-names JSON] [--tag original]

- A local studies folder: the label is written to ``DIR/labels/<tag>/<image id>.nii.gz``.
- A running server (its datastore may be a DICOMweb PACS): the label is sent with
  ``PUT /datastore/label?image=ID&tag=<tag>``; for a DICOMweb datastore it stays in the server's cache (a
  pseudo-label is not a reviewed label, so it is not written to the PACS as a SEG).

The image a file belongs to: ``--image`` (one per file, in order), else, for a DICOM SEG, the series it
refers to (on a DICOMweb server the image id *is* the SeriesInstanceUID; in a local folder the image whose
datastore info or ``series.json`` names that series), else the file name. A SEG's segments map to label ids
by segment name, else by segment number; a segment that matches neither, a SEG that refers to a series the
datastore does not have, or a NIfTI on another grid than its image are errors that say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from labelsentinel.dicom import DicomError, read_seg, seg_to_label
from labelsentinel.io import VolumeError, describe_geometry, load_label_names, save_nifti


class ImportError_(ValueError):
    """A label that cannot be imported, with the reason."""


def _is_url(s: str) -> bool:
    return s.startswith("http://") or s.startswith("https://")


def _is_dicom(path: str) -> bool:
    if path.endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


class _Target:
    """Where labels go: a local studies folder or a running server."""

    def __init__(self, where: str, timeout: float = 300):
        self.where = where.rstrip("/")
        self.remote = _is_url(where)
        self.timeout = timeout
        self._images = None
        self._tmp = tempfile.mkdtemp(prefix="labelsentinel-import-")
        if not self.remote and not os.path.isdir(where):
            raise ImportError_(f"studies folder {where!r} does not exist")

    def _get(self, path, **kw):
        import requests

        try:
            r = requests.get(self.where + path, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise ImportError_(f"cannot reach {self.where}: {e}") from e
        if r.status_code != 200:
            raise ImportError_(f"{self.where}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def images(self) -> list[str]:
        if self._images is None:
            if self.remote:
                self._images = list(self._get("/labelsentinel/quality").json()["images"])
            else:
                from labelsentinel.serve import check_studies

                self._images = [os.path.basename(p).split(".nii")[0].split(".nrrd")[0]
                                for p in check_studies(self.where, allow_empty=True)]
        return self._images

    def close(self) -> None:
        """Remove the temporary folder (images downloaded from the server to check grids)."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def label_names(self) -> dict[int, str]:
        if self.remote:
            # The names the server scores with (its studies' label_names.json, --conf label_names, the models'
            # labels), as the studies folder's label_names.json is used for a local import.
            served = self._get("/labelsentinel/quality").json().get("label_names")
            if served:
                return {int(k): str(v) for k, v in served.items()}
            info = self._get("/info/").json()
            # The models' own name -> id maps (info["labels"] is a list of names, as OHIF needs it).
            names = {int(v): str(k) for m in (info.get("models") or {}).values()
                     if isinstance(m.get("labels"), dict) for k, v in m["labels"].items()}
            if names:
                return names
            labels = info.get("labels") or {}
            if isinstance(labels, dict):
                return {int(v): str(k) for k, v in labels.items()}
            return {i + 1: str(n) for i, n in enumerate(labels)}
        p = os.path.join(self.where, "label_names.json")
        return load_label_names(p) if os.path.isfile(p) else {}

    def image_file(self, image_id: str) -> str:
        if self.remote:
            out = os.path.join(self._tmp, f"{abs(hash(image_id))}.nii.gz")
            if not os.path.isfile(out):
                import requests

                try:
                    r = requests.get(self.where + "/datastore/image", params={"image": image_id}, timeout=self.timeout)
                except requests.RequestException as e:
                    raise ImportError_(f"cannot reach {self.where}: {e}") from e
                if r.status_code != 200:
                    try:
                        why = r.json().get("detail") or r.text
                    except ValueError:
                        why = r.text
                    raise ImportError_(f"image {image_id!r}: the server {self.where} answered HTTP {r.status_code}: "
                                       f"{str(why)[:400]}")
                with open(out, "wb") as f:
                    f.write(r.content)
            return out
        for ext in (".nii.gz", ".nii", ".nrrd"):
            p = os.path.join(self.where, image_id + ext)
            if os.path.isfile(p):
                return p
        raise ImportError_(f"image {image_id!r} not found in {self.where}")

    def series_to_image(self, series_uid: str) -> str | None:
        if self.remote:
            return series_uid if series_uid in self.images() else None
        p = os.path.join(self.where, "series.json")  # written by `labelsentinel dicom-upload --studies` users
        if os.path.isfile(p):
            with open(p) as f:
                m = json.load(f)
            for image_id, uid in m.items():
                if uid == series_uid:
                    return image_id
        ds = os.path.join(self.where, "datastore_v2.json")
        if os.path.isfile(ds):
            with open(ds) as f:
                objs = json.load(f).get("objects", {})
            for image_id, o in objs.items():
                if (o.get("image", {}).get("info", {}) or {}).get("SeriesInstanceUID") == series_uid:
                    return image_id
        return None

    def save(self, image_id: str, array: np.ndarray, affine: np.ndarray, tag: str) -> str:
        if not self.remote:
            out = os.path.join(self.where, "labels", tag, f"{image_id}.nii.gz")
            save_nifti(out, array, affine)
            return out
        import requests

        tmp = os.path.join(self._tmp, "label.nii.gz")
        save_nifti(tmp, array, affine)
        try:
            with open(tmp, "rb") as f:
                r = requests.put(f"{self.where}/datastore/label", params={"image": image_id, "tag": tag},
                                 files={"label": ("label.nii.gz", f, "application/gzip")}, data={"params": "{}"},
                                 timeout=self.timeout)
        except requests.RequestException as e:
            raise ImportError_(f"cannot reach {self.where}: {e}") from e
        if r.status_code != 200:
            raise ImportError_(f"{image_id}: the server refused the label: HTTP {r.status_code}: {r.text[:300]}")
        return f"{self.where}/datastore/label?label={image_id}&tag={tag}"


def _on_image_grid(label_path: str, image_path: str, image_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The label's voxels in the image's voxel order. The same grid flipped or with permuted axes is reoriented;
    any other grid is an error with both geometries."""
    import nibabel as nib

    try:
        lab = nib.load(label_path)
        img = nib.load(image_path)
    except Exception as e:
        raise ImportError_(f"{label_path}: cannot be read ({e})") from e
    arr = np.asanyarray(lab.dataobj)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ImportError_(f"{label_path}: a 3D label is needed, got shape {arr.shape}")
    if arr.shape == img.shape[:3] and np.allclose(lab.affine, img.affine, atol=1e-3):
        return arr, img.affine
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(lab.affine),
                                           nib.orientations.io_orientation(img.affine))
    moved = nib.orientations.apply_orientation(arr, ornt)
    aff = lab.affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)
    if moved.shape == img.shape[:3] and np.allclose(aff, img.affine, atol=1e-2):
        return moved, img.affine
    raise ImportError_(f"{label_path} is not on the grid of its image {image_name or image_path}: label "
                       f"{describe_geometry(arr.shape, lab.affine)}; image {describe_geometry(img.shape[:3], img.affine)}")


def import_one(target: _Target, path: str, image_id: str | None, names: dict[int, str], tag: str) -> dict:
    if not os.path.isfile(path):
        raise ImportError_(f"{path}: file not found")
    given = image_id is not None  # --image: a server looks it up itself (a series just added to its PACS)
    if _is_dicom(path):
        try:
            seg = read_seg(path)
        except DicomError as e:
            raise ImportError_(str(e)) from e
        if image_id is None:
            image_id = target.series_to_image(seg.referenced_series)
            if image_id is None:
                raise ImportError_(f"{path}: the SEG refers to series {seg.referenced_series}, which is not in the "
                                   f"datastore {target.where} ({len(target.images())} images); load that series "
                                   "first or give --image")
        elif not target.remote and image_id not in target.images():
            raise ImportError_(f"{path}: image {image_id!r} is not in the datastore {target.where}")
        if not names:
            raise ImportError_(f"{path}: label names are needed to map the SEG's segments to label ids "
                               "(--label-names JSON)")
        try:
            arr, affine, mapping = seg_to_label(seg, target.image_file(image_id), names)
        except DicomError as e:
            raise ImportError_(f"{path}: {e}") from e
        kind = "DICOM SEG"
    else:
        if image_id is None:
            image_id = os.path.basename(path).split(".nii")[0]
        if not (given and target.remote) and image_id not in target.images():
            raise ImportError_(f"{path}: image {image_id!r} is not in the datastore {target.where}"
                               + ("" if given else " (give --image ID)"))
        arr, affine = _on_image_grid(path, target.image_file(image_id), image_id if target.remote else None)
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.allclose(arr, np.round(arr)):
                raise ImportError_(f"{path}: a label must hold integer ids, found fractional values")
        arr = np.round(arr).astype(np.int64)
        ids = sorted(int(v) for v in np.unique(arr) if v)
        unknown = [i for i in ids if names and i not in names]
        if unknown:
            raise ImportError_(f"{path}: label id(s) {unknown} not in the label names; add them (--label-names)")
        if arr.min() < 0:
            raise ImportError_(f"{path}: negative label ids")
        arr = arr.astype(np.uint8 if arr.max() < 256 else np.uint16)
        mapping = {i: i for i in ids}
        kind = "NIfTI"
    where = target.save(image_id, arr, affine, tag)
    return {"file": path, "kind": kind, "image": image_id, "tag": tag, "labels": sorted(set(mapping.values())),
            "saved": where}


def import_labels(where: str, files: list[str], label_names: str | dict | None = None, image_ids=None,
                  tag: str = "original", quiet: bool = False) -> list[dict]:
    """Import every file (see the module doc); raises ImportError_ at the first file that cannot be imported."""
    if image_ids and len(image_ids) != len(files):
        raise ImportError_(f"{len(image_ids)} --image value(s) for {len(files)} file(s)")
    target = _Target(where)
    try:
        names = dict(target.label_names())
        if isinstance(label_names, dict):
            names.update({int(k): v for k, v in label_names.items()})
        elif label_names:
            names.update(load_label_names(label_names))
        out = []
        for i, f in enumerate(files):
            r = import_one(target, f, image_ids[i] if image_ids else None, names, tag)
            out.append(r)
            if not quiet:
                print(f"{f} ({r['kind']}) -> {r['image']} [{tag}], {len(r['labels'])} structure(s)", file=sys.stderr)
        return out
    finally:
        target.close()


def cmd_import(args) -> int:
    try:
        res = import_labels(args.server or args.studies, args.files, args.label_names, args.image, args.tag)
    except (ImportError_, VolumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-labels", help="import pseudo-labels (NIfTI or DICOM SEG) into a datastore")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--studies", help="local studies folder")
    g.add_argument("--server", help="running Label Sentinel server (any datastore, e.g. DICOMweb)")
    p.add_argument("files", nargs="+", help="label files: .nii.gz/.nii or DICOM SEG (.dcm)")
    p.add_argument("--image", action="append", help="image id of each file, in order (default: from the SEG or file name)")
    p.add_argument("--label-names", help="JSON id -> name (default: the studies' label_names.json / the server's labels)")
    p.add_argument("--tag", default="original", help="label tag (default original); `final` is for reviewed labels")
    p.set_defaults(func=cmd_import)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="labelsentinel import-labels")
    sub = p.add_subparsers()
    register(sub)
    return cmd_import(p.parse_args(["import-labels", *(argv or sys.argv[1:])]))
