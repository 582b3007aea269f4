"""Reading and checking images and labels (NIfTI, and NRRD through SimpleITK when installed).

Every function raises :class:`VolumeError` with a message a user can act on: the file, what is wrong and,
for geometry problems, both geometries.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np


class VolumeError(ValueError):
    """A file that cannot be used as an image or a label, with the reason."""


@dataclass
class Volume:
    path: str
    array: np.ndarray  # (X, Y, Z) in the file's voxel order
    affine: np.ndarray  # 4 x 4 voxel -> world (RAS for NIfTI)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def geometry(self) -> str:
        return describe_geometry(self.array.shape, self.affine)


def describe_geometry(shape, affine) -> str:
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    org = np.asarray(affine)[:3, 3]
    return (
        f"shape {tuple(int(s) for s in shape)}, spacing ({', '.join(f'{s:.3g}' for s in sp)}) mm, "
        f"origin ({', '.join(f'{o:.4g}' for o in org)})"
    )


def _is_nifti(path: str) -> bool:
    return path.endswith(".nii") or path.endswith(".nii.gz")


def load_volume(path: str, dtype=None) -> Volume:
    """Load a 3D volume; raise VolumeError naming the file for anything unreadable."""
    if not os.path.exists(path):
        raise VolumeError(f"{path}: file not found")
    try:
        if _is_nifti(path):
            import nibabel as nib

            img = nib.load(path)
            arr = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
        elif path.endswith(".nrrd") or path.endswith(".mha") or path.endswith(".mhd"):
            try:
                import SimpleITK as sitk
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise VolumeError(f"{path}: reading {os.path.splitext(path)[1]} needs SimpleITK") from e
            img = sitk.ReadImage(path)
            arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # z,y,x -> x,y,z
            direction = np.array(img.GetDirection()).reshape(3, 3)
            affine = np.eye(4)
            affine[:3, :3] = direction * np.array(img.GetSpacing())[None, :]
            affine[:3, 3] = img.GetOrigin()
            # ITK uses LPS; convert to RAS like NIfTI.
            affine = np.diag([-1, -1, 1, 1]) @ affine
        else:
            raise VolumeError(f"{path}: unsupported file type (use .nii, .nii.gz or .nrrd)")
    except VolumeError:
        raise
    except Exception as e:  # nibabel/zlib/EOF errors for corrupt and truncated files
        raise VolumeError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return Volume(path=path, array=arr, affine=affine)


def load_image(path: str) -> Volume:
    """An image: float32, no NaN or infinity."""
    vol = load_volume(path)
    arr = vol.array.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise VolumeError(f"{path}: image contains {n} NaN or infinite voxel(s)")
    vol.array = arr
    return vol


def load_label(path: str) -> Volume:
    """A label map: integer ids >= 0."""
    vol = load_volume(path)
    arr = vol.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.isfinite(arr).all():
            raise VolumeError(f"{path}: label contains NaN or infinite values")
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            bad = arr[np.mod(arr, 1) != 0]
            raise VolumeError(
                f"{path}: label values must be integers, found non-integer values such as {float(bad.flat[0]):g}"
            )
    if arr.size and arr.min() < 0:
        raise VolumeError(f"{path}: label values must be >= 0, found {int(arr.min())}")
    vol.array = arr.astype(np.int32, copy=False)
    return vol


def _header_grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of a volume, from the header alone for NIfTI."""
    if _is_nifti(path):
        import nibabel as nib

        img = nib.load(path)
        return tuple(int(x) for x in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
    vol = load_volume(path)
    return tuple(vol.array.shape), vol.affine


def grid_difference(label_affine: np.ndarray, image_affine: np.ndarray) -> str:
    """How two affines of the same voxel shape differ, in words (origin shift, spacing, axis directions)."""
    a, b = np.asarray(label_affine, dtype=np.float64), np.asarray(image_affine, dtype=np.float64)
    parts = []
    shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    if shift > 1e-6:
        parts.append(f"origin moved {shift:.3g} mm")
    sa, sb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(sa, sb, atol=1e-6):
        parts.append("other spacing")
    if not np.allclose(a[:3, :3] / np.where(sa == 0, 1, sa), b[:3, :3] / np.where(sb == 0, 1, sb), atol=1e-6):
        parts.append("other axis directions")
    return ", ".join(parts) or "affines differ"


def label_upload_problem(image_path: str, label_path: str, atol: float = 1e-3) -> str | None:
    """Why ``label_path`` cannot be stored as the label of the image at ``image_path`` (None: it can): the file
    cannot be read, is not a label map, or is not on the image's grid (another voxel shape, or the same shape
    with another origin, spacing or orientation: the affines must agree within ``atol`` mm, as
    :func:`same_grid` and the scoring's :func:`check_same_grid` require). A format this package does not read,
    or an image it cannot read, is not judged here (None)."""
    if not (_is_nifti(label_path) or label_path.endswith((".nrrd", ".mha", ".mhd"))):
        return None
    try:
        lab = load_label(label_path)
    except VolumeError as e:
        return str(e).replace(label_path, "the label file")
    if not image_path or not os.path.isfile(image_path):
        return None
    try:
        shape, affine = _header_grid(image_path)
    except Exception:
        return None
    if tuple(lab.array.shape) != shape:
        return (f"the label is {' x '.join(map(str, lab.array.shape))} voxels but the image is "
                f"{' x '.join(map(str, shape))}: save the label on the image's grid")
    image = Volume(path=image_path, array=np.broadcast_to(np.zeros((), np.uint8), shape), affine=affine)
    if not same_grid(image, lab, atol):
        return (f"the label is not on the image's grid ({grid_difference(lab.affine, affine)}): label "
                f"{lab.geometry()}; image {image.geometry()}: save the label on the image's grid")
    return None


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=atol)


def check_same_grid(image: Volume, label: Volume, atol: float = 1e-3) -> None:
    if not same_grid(image, label, atol):
        raise VolumeError(
            "label and image are on different grids: "
            f"image {image.path}: {image.geometry()}; label {label.path}: {label.geometry()}"
        )


def resample_label_to(label: Volume, image: Volume) -> Volume:
    """Nearest-neighbour resampling of a label onto an image's grid (world coordinates)."""
    from scipy.ndimage import map_coordinates

    vox2vox = np.linalg.inv(label.affine) @ image.affine
    grid = np.indices(image.array.shape, dtype=np.float64).reshape(3, -1)
    coords = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    out = map_coordinates(label.array, coords, order=0, mode="constant", cval=0)
    return Volume(path=label.path, array=out.reshape(image.array.shape).astype(np.int32), affine=image.affine.copy())


def load_label_names(path: str | None) -> dict[int, str]:
    """``{"1": "spleen", ...}`` -> ``{1: "spleen"}``. Also accepts MONAI Label style ``{"spleen": 1}``."""
    if not path:
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise VolumeError(f"{path}: label names file not found") from e
    except json.JSONDecodeError as e:
        raise VolumeError(f"{path}: label names file is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise VolumeError(f"{path}: label names must be a JSON object mapping id to name")
    out: dict[int, str] = {}
    for k, v in raw.items():
        if str(k).isdigit():
            out[int(k)] = str(v)
        elif isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            out[int(v)] = str(k)
        else:
            raise VolumeError(f"{path}: cannot read entry {k!r}: {v!r} (expected id -> name)")
    empty = sorted(i for i, n in out.items() if not n.strip())
    if empty:
        raise VolumeError(f"{path}: id(s) {empty} have an empty name")
    return out


def save_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file; .nii.gz output is byte-for-byte deterministic (nibabel writes gzip mtime 0)."""
    import nibabel as nib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    if np.issubdtype(array.dtype, np.integer):
        img.header.set_data_dtype(array.dtype)
    tmp = path + ".tmp" + (".nii.gz" if path.endswith(".gz") else ".nii")
    nib.save(img, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(path: str, fill, mode: int | None = None) -> None:
    """Write ``path`` so that it always holds either its old or its new content: a crash at any moment leaves no
    empty or partial file (``fill(f)`` writes a temp file in the same folder; fsync; os.replace). ``mode``: the
    new file's permissions (default: the old file's, else 0o644)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        if mode is None:
            try:
                mode = os.stat(path).st_mode & 0o777
            except OSError:
                mode = 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write(path: str, data: bytes) -> None:
    atomic_replace(path, lambda f: f.write(data))


def atomic_copy(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` through a temp file next to it (never a partial ``dest``)."""

    def fill(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    atomic_replace(dest, fill, mode=0o644)
