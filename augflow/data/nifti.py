"""Turn a manifest of 3D NIfTI volumes into an augflow dataset of 2D slices (``augflow prepare``).

The manifest is a UTF-8 CSV file with a header line and the columns ``path,label[,subject]``
(column names are case-insensitive and may come in any order; any other column is an error, so a
typo such as ``lable`` is never silently dropped). Relative paths are relative to the manifest's
folder. ``subject`` defaults to the file name without ``.nii``/``.nii.gz``. The class names of the
output are the sorted unique labels, compared as strings (so ``"10"`` sorts before ``"2"``). Row
numbers in messages are CSV line numbers, the header being line 1.

Pipeline, one volume at a time (memory stays flat whatever the number of volumes):

1. **Validate up front** (fast, no voxel data read): manifest structure, empty paths or labels,
   duplicate files, missing files, NIfTI headers (readable, one 3D volume, enough slices).
2. **Load** with nibabel, applying the header scaling (``scl_slope``/``scl_inter``) in float32. A 4D
   image with exactly one volume is squeezed to 3D. A ``.nii.gz`` is first decompressed to its
   end so its CRC is checked (nibabel alone stops before the trailer and would decode some
   damaged streams into wrong values). Reject Inf voxels and constant volumes, and NaN voxels unless
   ``nan_as_background``: masked volumes (SPM, some PET pipelines) mark the outside of the mask with NaN,
   which then becomes 0, the background of step 4; their count goes into the provenance.
3. **Reorient** to the closest canonical RAS+ orientation (:func:`nibabel.as_closest_canonical`):
   array axis 0 runs left to right, 1 posterior to anterior, 2 inferior to superior. Voxel sizes
   are read from the canonical affine.
4. **Normalise** robustly per volume: clip to the 0.5 and 99.5 percentiles of the *nonzero*
   voxels (zero is background in skull-stripped or masked MRI and would otherwise pull the low
   percentile down) and map linearly to [0, 1]. If those percentiles coincide (e.g. a mask-like
   volume) the whole-volume percentiles are used, and failing that the minimum and maximum.
5. **Slice**: the central slice along the axis (sagittal = RAS axis 0, coronal = 1, axial = 2;
   centre index ``(n - 1) // 2``) and its nearest neighbours in the order 0, +1, -1, +2, -2, ...;
   ``slice_index`` stores that offset from the centre.
6. **Orient for display**, superior (or, for axial, anterior) up, in neurological convention
   (the subject's left on the image left):

   ========  ===========================  =========================
   axis      rows (top to bottom)         columns (left to right)
   ========  ===========================  =========================
   sagittal  z (superior to inferior)     y (posterior to anterior)
   coronal   z (superior to inferior)     x (left to right)
   axial     y (anterior to posterior)    x (left to right)
   ========  ===========================  =========================

7. **Square and resize** keeping the physical aspect ratio: each slice is resampled so its pixels
   are square in millimetres, padded with zeros (background) to a centred square and resized to
   ``size`` x ``size``. The three steps are composed into one antialiased bilinear resampling
   (:func:`torch.nn.functional.interpolate` with ``antialias=True``) to the aspect-preserving size,
   followed by zero padding, so the image is interpolated only once. Values are clipped to [0, 1].

Output: float32 images (N, 1, size, size) streamed into a :class:`~augflow.data.store.DatasetWriter`
with ``source="real"`` and a provenance record (manifest path and SHA-256, parameters,
normalisation, skipped rows).

Any bad row stops the run with a :class:`~augflow.errors.ManifestError` naming the manifest line,
the file and the reason, and no output (nor temporary) file is left behind. With ``skip_bad=True``
bad rows are skipped and reported in :attr:`PrepareResult.skipped` and ``provenance["skipped"]``;
a run in which every row is bad is still an error.
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from augflow.atomic import check_output
from augflow.data.store import DatasetWriter, sha256_file
from augflow.errors import ConfigError, ManifestError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("subject",)
NORMALISATION = (
    "per volume: clip to the 0.5-99.5 percentiles of the nonzero voxels "
    "(fallback: all voxels, then min-max) and map linearly to [0, 1]"
)
ORIENTATION = "RAS canonical; superior (axial: anterior) up, subject's left on the image left"
PERCENTILES = (0.5, 99.5)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What nibabel, gzip and zlib raise on unreadable, truncated or corrupt files, often lazily when
# the voxel data are read (EOFError for a cut .nii.gz, OSError for a short .nii, zlib.error or
# gzip.BadGzipFile for damaged compressed data, ImageFileError for a file that is not NIfTI).
_READ_ERRORS = (
    ImageFileError,
    EOFError,
    OSError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    TypeError,
    struct.error,
    IndexError,
)
_MAX_LISTED = 10  # skipped rows listed in the "every row is bad" message


@dataclass
class ManifestRow:
    """One usable manifest row.

    Arguments:
        line: CSV line number (the header is line 1).
        path: Absolute path of the NIfTI file.
        label: Class label (non-empty string).
        subject: Subject id (defaults to the file name without ``.nii``/``.nii.gz``).
    """

    line: int
    path: Path
    label: str
    subject: str


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote.

    Arguments:
        out: The dataset file.
        n_slices: Number of images written.
        n_volumes: Number of volumes they come from.
        class_names: The class names (sorted unique labels).
        skipped: Skipped rows as ``{"row": line, "path": file, "reason": text}``, sorted by
            line (``skip_bad`` only).
    """

    out: Path
    n_slices: int
    n_volumes: int
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)


class _VolumeError(ManifestError):
    """A file-level problem; ``reason`` is the message without the file name."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def prepare_dataset(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 64,
    slices_per_volume: int = 11,
    axis: str = "coronal",
    skip_bad: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    nan_as_background: bool = False,
) -> PrepareResult:
    """Extract normalised, square 2D slices from the NIfTI volumes of a manifest into a dataset.

    See the module docstring for the manifest format and the pipeline.

    Arguments:
        manifest: CSV file with a header and the columns ``path,label[,subject]``.
        out: The HDF5 dataset to write (atomically: it appears only when complete).
        size: Side of the square output images, in pixels (>= 1).
        slices_per_volume: Slices taken around the centre of each volume (>= 1).
        axis: "sagittal", "coronal" or "axial".
        skip_bad: Skip bad rows (reported in the result and the provenance) instead of stopping.
        progress: Show a progress bar over volumes.
        overwrite: Replace ``out`` if it exists (never the manifest or one of its volumes).
        nan_as_background: Set NaN voxels to 0 (the background of masked volumes) instead of rejecting the
            volume; Inf voxels are still rejected.

    Returns:
        A :class:`PrepareResult` with the output path, counts, class names and skipped rows.

    Raises:
        ConfigError: ``size``, ``slices_per_volume``, ``axis`` or ``out`` is invalid, ``out`` exists without
            ``overwrite``, or ``out`` is the manifest or one of its volumes.
        ManifestError: the manifest is missing or malformed, a row or its file is bad (naming
            the line, the file and the reason) and ``skip_bad`` is false, or every row is bad.
    """
    _check_arguments(size, slices_per_volume, axis)
    manifest = Path(manifest).expanduser()
    out = check_output(Path(out).expanduser(), overwrite, [manifest])

    skipped: list[dict] = []

    def reject(rec: dict) -> None:
        if not skip_bad:
            raise ManifestError(_describe(manifest, rec))
        skipped.append(rec)

    # Stage 1: everything that needs no voxel data, so a bad manifest fails fast.
    rows: list[ManifestRow] = []
    for item in _scan_manifest(manifest):
        if isinstance(item, dict):
            reject(item)
            continue
        try:
            check_header(item.path, axis, slices_per_volume)
        except _VolumeError as e:
            reject(_record(item.line, e.path, e.reason))
            continue
        rows.append(item)
    if not rows:
        raise ManifestError(_all_bad(manifest, skipped))
    check_output(out, overwrite, [row.path for row in rows])

    class_names = sorted({row.label for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    provenance = {
        "generator": "augflow prepare",
        "manifest": str(manifest.resolve()),
        "manifest_sha256": sha256_file(manifest),
        "size": size,
        "slices_per_volume": slices_per_volume,
        "axis": axis,
        "normalisation": NORMALISATION,
        "orientation": ORIENTATION,
        "n_volumes": 0,
        "skipped": skipped,
    }
    if nan_as_background:
        provenance["nan_voxels_set_to_background"] = 0

    # Stage 2: stream the volumes; an exception inside the writer removes its temporary file.
    n_volumes = n_slices = 0
    counts = dict.fromkeys(class_names, 0)
    with DatasetWriter(out, (1, size, size), class_names, "real", provenance) as writer:
        for row in tqdm(rows, desc="prepare", unit="volume", disable=not progress):
            try:
                volume, zooms, nan_voxels = load_volume(row.path, nan_as_background)
            except _VolumeError as e:
                reject(_record(row.line, e.path, e.reason))
                continue
            images, offsets = extract_slices(
                normalise_volume(volume), zooms, axis, slices_per_volume, size
            )
            if nan_as_background:
                provenance["nan_voxels_set_to_background"] += nan_voxels
            del volume
            n = len(images)
            writer.append(images, [index[row.label]] * n, [row.subject] * n, offsets)
            n_volumes += 1
            n_slices += n
            counts[row.label] += 1
        skipped.sort(key=lambda rec: rec["row"])
        if n_volumes == 0:
            raise ManifestError(_all_bad(manifest, skipped))
        provenance["n_volumes"] = n_volumes
        writer.provenance.update(provenance)

    empty = [name for name, c in counts.items() if c == 0]
    if empty:
        warnings.warn(
            f"{out}: class(es) {empty} have no images: all their volumes were skipped",
            stacklevel=2,
        )
    return PrepareResult(out, n_slices, n_volumes, class_names, skipped)


def read_manifest(manifest: str | os.PathLike) -> list[ManifestRow]:
    """Read and check a manifest without opening the NIfTI files.

    Arguments:
        manifest: CSV file with a header and the columns ``path,label[,subject]``.

    Returns:
        The rows, in file order.

    Raises:
        ManifestError: at the first problem (structure, empty path or label, unknown file type,
            duplicate or missing file), naming the line, the file and the reason.
    """
    manifest = Path(manifest).expanduser()
    rows = []
    for item in _scan_manifest(manifest):
        if isinstance(item, dict):
            raise ManifestError(_describe(manifest, item))
        rows.append(item)
    return rows


def check_header(path: str | os.PathLike, axis: str, slices_per_volume: int) -> tuple[int, ...]:
    """Check a NIfTI header without reading voxel data; return the canonical (RAS) 3D shape.

    Raises:
        ManifestError: the file is not readable NIfTI, is not a single 3D volume, or has fewer
            than ``slices_per_volume`` slices along ``axis``.
    """
    img = _load_image(path)
    shape = tuple(int(s) for s in img.shape)
    _check_shape(path, shape)
    try:
        ornt = nib.orientations.io_orientation(img.affine)
    except _READ_ERRORS as e:
        raise _VolumeError(path, f"invalid affine ({_name(e)})") from None
    canonical = [0, 0, 0]
    for i, (target, _) in enumerate(ornt.astype(int)):
        canonical[target] = shape[i]
    n = canonical[AXES[axis]]
    if n < slices_per_volume:
        raise _VolumeError(
            path,
            f"has {n} {axis} slices, fewer than slices_per_volume={slices_per_volume} "
            f"(canonical RAS shape {tuple(canonical)})",
        )
    return tuple(canonical)


def load_volume(path: str | os.PathLike, nan_as_background: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Load one NIfTI volume as scaled float32 data in canonical RAS orientation.

    Arguments:
        path: A ``.nii`` or ``.nii.gz`` file holding one 3D volume (4D with one volume is accepted).
        nan_as_background: Set NaN voxels (the outside of a masked volume) to 0 instead of rejecting them.

    Returns:
        ``(data, zooms, nan_voxels)``: float32 (X, Y, Z) with the header scaling applied, the voxel sizes
        in mm along the three canonical axes (from the canonical affine), and how many NaN voxels were set to 0.

    Raises:
        ManifestError: the file is unreadable, truncated or corrupt, not one 3D volume, holds
            Inf (or NaN, without ``nan_as_background``), or is constant.
    """
    img = _load_image(path)
    _check_shape(path, tuple(int(s) for s in img.shape))
    try:
        if str(path).lower().endswith(".gz"):
            _verify_gzip(path)
        img = nib.as_closest_canonical(nib.funcs.squeeze_image(img))
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
        affine = img.affine
    except _READ_ERRORS as e:
        reason = f"unreadable, truncated or corrupt NIfTI data ({_name(e)})"
        raise _VolumeError(path, reason) from None
    data = data.reshape(data.shape[:3])
    nan_voxels = 0
    finite = np.isfinite(data)
    if not finite.all():  # the usual, finite volume costs one pass
        nan = np.isnan(data)
        nan_voxels = int(nan.sum())
        infinite = int(finite.size - finite.sum()) - nan_voxels
        if infinite:
            raise _VolumeError(path, f"contains {infinite} Inf voxels")
        if not nan_as_background:
            raise _VolumeError(path, f"contains {nan_voxels} NaN voxels (if they mark the outside of a mask, "
                                     f"--nan-as-background sets them to 0)")
        data[nan] = 0.0
        del nan
    del finite
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise _VolumeError(path, f"constant volume (every voxel is {lo:g})")
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if not (np.isfinite(zooms).all() and (zooms > 0).all()):
        raise _VolumeError(path, f"invalid voxel sizes {tuple(zooms.round(4))} in the affine")
    return data, zooms, nan_voxels


def normalise_volume(data: np.ndarray) -> np.ndarray:
    """Robustly map a non-constant volume to [0, 1] (float32).

    Clip to the 0.5 and 99.5 percentiles of the nonzero voxels and rescale linearly. If those
    coincide, use the percentiles of all voxels, and failing that the minimum and maximum.
    """
    data = np.asarray(data, dtype=np.float32)
    nonzero = data[data != 0]
    candidates = [np.percentile(nonzero, PERCENTILES)] if nonzero.size else []
    del nonzero
    candidates += [np.percentile(data, PERCENTILES), (data.min(), data.max())]
    lo, hi = next(((lo, hi) for lo, hi in candidates if hi > lo), (0.0, 0.0))
    if hi <= lo:
        raise ValueError("cannot normalise a constant volume")
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def extract_slices(
    volume: np.ndarray,
    zooms: np.ndarray | tuple[float, float, float],
    axis: str,
    slices_per_volume: int,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Take the central slices of a canonical (RAS) volume, orient them, square and resize them.

    Arguments:
        volume: (X, Y, Z) intensities, normally already in [0, 1].
        zooms: Voxel sizes in mm along X, Y, Z.
        axis: "sagittal", "coronal" or "axial".
        slices_per_volume: Number of slices: centre, +1, -1, +2, -2, ...
        size: Output side in pixels.

    Returns:
        ``(images, offsets)``: float32 (n, 1, size, size) in [0, 1] and int64 (n,) offsets from
        the centre slice ``(length - 1) // 2``.

    Raises:
        ValueError: the volume has fewer than ``slices_per_volume`` slices along ``axis``.
    """
    a = AXES[axis]
    length = volume.shape[a]
    if length < slices_per_volume:
        raise ValueError(f"volume has {length} {axis} slices, fewer than {slices_per_volume}")
    offsets = np.array(list(_offsets(slices_per_volume)), dtype=np.int64)
    centre = (length - 1) // 2
    col_axis, row_axis = (d for d in range(3) if d != a)
    slab = np.moveaxis(np.take(volume, centre + offsets, axis=a), a, 0)  # (n, U, V)
    # Rows = the second in-plane axis descending (superior/anterior up), cols = the first one.
    slab = np.ascontiguousarray(slab.transpose(0, 2, 1)[:, ::-1, :], dtype=np.float32)  # (n, V, U)
    images = _fit_square(slab, float(zooms[row_axis]), float(zooms[col_axis]), size)
    return images, offsets


def _fit_square(slab: np.ndarray, row_mm: float, col_mm: float, size: int) -> np.ndarray:
    """Resample (n, H, W) to square mm pixels, zero-pad to a centred square, resize to size."""
    n, h, w = slab.shape
    height, width = h * row_mm, w * col_mm  # physical extent in mm
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    x = torch.from_numpy(slab)[:, None]  # (n, 1, H, W)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    x = F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=0.0)
    return x.clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)  # (n, 1, size, size)


def _offsets(n: int) -> Iterator[int]:
    """0, +1, -1, +2, -2, ... (n values)."""
    for i in range(n):
        yield (i + 1) // 2 if i % 2 else -(i // 2)


def _scan_manifest(manifest: Path) -> Iterator[ManifestRow | dict]:
    """Yield a :class:`ManifestRow` per good row and a skip record per bad row.

    Structural problems (missing file, not UTF-8 CSV, bad header) raise at once.
    """
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest file not found")
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, record) for record in reader]
    except UnicodeDecodeError as e:
        raise ManifestError(f"{manifest}: not a UTF-8 text file ({e})") from None
    except csv.Error as e:
        raise ManifestError(f"{manifest}: not a valid CSV file ({e})") from None
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot read the manifest ({_name(e)})") from None
    expected = "a header line 'path,label[,subject]'"
    if not lines:
        raise ManifestError(f"{manifest}: manifest is empty (expected {expected})")
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in header]
    if header_line != 1 or not any(columns):
        raise ManifestError(f"{manifest} line 1: expected {expected}, got an empty line")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ManifestError(f"{manifest} line 1: duplicated column(s) {duplicated}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{manifest} line 1: missing required column(s) {missing}; found {columns} "
            f"(expected {expected})"
        )
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ManifestError(
            f"{manifest} line 1: unknown column(s) {unknown}; allowed columns are "
            f"{list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        )
    where = {c: i for i, c in enumerate(columns)}
    seen: dict[Path, int] = {}
    n_rows = 0
    for line, record in lines[1:]:
        if not any(v.strip() for v in record):
            continue  # blank line
        n_rows += 1
        values = {c: record[i].strip() if i < len(record) else "" for c, i in where.items()}
        raw = values["path"]
        if len(record) != len(columns):
            yield _record(
                line,
                raw,
                f"has {len(record)} fields, expected {len(columns)} ({','.join(columns)})",
            )
            continue
        if not raw:
            yield _record(line, "", "empty path")
            continue
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        path = Path(os.path.abspath(path))
        if not values["label"]:
            yield _record(line, str(path), "empty label")
            continue
        if not path.name.lower().endswith(_NIFTI_SUFFIXES):
            yield _record(line, str(path), "not a NIfTI file name (expected .nii or .nii.gz)")
            continue
        key = path.resolve()
        if key in seen:
            yield _record(line, str(path), f"duplicate row: same file as line {seen[key]}")
            continue
        seen[key] = line
        if not path.exists():
            yield _record(line, str(path), "file not found")
            continue
        if not path.is_file():
            yield _record(line, str(path), "not a regular file")
            continue
        subject = values.get("subject") or _stem(path)
        yield ManifestRow(line, path, values["label"], subject)
    if n_rows == 0:
        raise ManifestError(f"{manifest}: no data rows (expected lines after the header)")


def _load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    try:
        img = nib.load(path, mmap=False)
    except FileNotFoundError:
        raise _VolumeError(path, "file not found") from None
    except _READ_ERRORS as e:
        raise _VolumeError(path, f"not a readable NIfTI file ({_name(e)})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise _VolumeError(path, f"not a NIfTI image (read as {type(img).__name__})")
    return img


def _verify_gzip(path: str | os.PathLike) -> None:
    """Decompress to the end so the gzip CRC is checked.

    nibabel reads only the bytes the image needs and never reaches the gzip trailer, so damage
    inside the compressed stream can decode silently into wrong voxel values.
    """
    with gzip.open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def _check_shape(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise _VolumeError(path, f"2D image (shape {shape}); expected a 3D volume")
    volumes = int(np.prod(shape[3:]))
    if volumes != 1:
        raise _VolumeError(path, f"{volumes} volumes (shape {shape}); expected one 3D volume")


def _check_arguments(size: int, slices_per_volume: int, axis: str) -> None:
    for name, value in (("size", size), ("slices_per_volume", slices_per_volume)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, but is: {value!r}")
    if axis not in AXES:
        raise ConfigError(f"axis must be one of {list(AXES)}, but is: {axis!r}")


def _record(line: int, path: str, reason: str) -> dict:
    return {"row": int(line), "path": str(path), "reason": reason}


def _describe(manifest: Path, rec: dict) -> str:
    where = f"{manifest} line {rec['row']}"
    if rec["path"]:
        where += f": {rec['path']}"
    return f"{where}: {rec['reason']}"


def _all_bad(manifest: Path, skipped: list[dict]) -> str:
    listed = "".join(f"\n  {_describe(manifest, rec)}" for rec in skipped[:_MAX_LISTED])
    more = len(skipped) - _MAX_LISTED
    tail = f"\n  ... and {more} more" if more > 0 else ""
    head = f"{manifest}: every row is bad ({len(skipped)} skipped), nothing to prepare:"
    return head + listed + tail


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _name(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
