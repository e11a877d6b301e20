"""The augflow HDF5 dataset format, shared by real and synthetic data.

Schema version 1. One file holds N two-dimensional slices of equal shape:

================  ===========================  ==================================================
name              type                         meaning
================  ===========================  ==================================================
``images``        float32 (N, C, H, W)         intensities in [0, 1]; chunked per image, gzip
``labels``        int64 (N,)                   class index in [0, K)
``subjects``      UTF-8 string (N,)            subject id (slices of a subject share it)
``slice_index``   int64 (N,)                   slice position in its volume (offset from centre)
================  ===========================  ==================================================

File attributes: ``class_names`` (JSON list of K names), ``schema_version`` (int), ``source``
("real" | "synthetic"), ``created_at`` (ISO 8601, UTC), ``augflow_version``, ``provenance`` (JSON object).

Writers write into a temporary file in the target folder and rename it atomically when complete, so an
interrupted run never leaves a half-written file under the final name. The reader validates the schema and
raises :class:`~augflow.errors.DataError` naming the file and the problem. :class:`SliceDataset` reads
images lazily, one at a time, so large files never sit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from augflow.atomic import atomic_path
from augflow.errors import DataError
from augflow.version import __version__

SCHEMA_VERSION = 1
SOURCES = ("real", "synthetic")
_STRING = h5py.string_dtype(encoding="utf-8")
_SCAN_BLOCK = 256  # images per block when scanning values, keeps validation memory flat


@dataclass
class DatasetInfo:
    """What a validated file holds (everything but the images)."""

    path: Path
    image_shape: tuple[int, int, int]
    class_names: list[str]
    labels: np.ndarray
    subjects: np.ndarray
    slice_index: np.ndarray
    source: str
    schema_version: int
    created_at: str
    augflow_version: str
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def require_images(self, option: str) -> DatasetInfo:
        """``self``, or a DataError naming ``option`` (``"--data"``) if the file holds no image."""
        if not len(self):
            raise DataError(f"{option} {self.path}: the file holds no images; give a dataset with at least one")
        return self

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def summary(self) -> dict:
        """A JSON-serialisable description, as printed by ``augflow info``."""
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "source": self.source,
            "num_images": len(self),
            "image_shape": list(self.image_shape),
            "num_subjects": int(len(np.unique(self.subjects))),
            "class_counts": self.class_counts(),
            "created_at": self.created_at,
            "augflow_version": self.augflow_version,
            "provenance": self.provenance,
        }


class DatasetWriter:
    """Stream slices into a new dataset file; the file appears under its name only when complete.

    Use as a context manager. On an exception the temporary file is removed and nothing is written.

    Arguments:
        path: The final file name.
        image_shape: (C, H, W) of every image.
        class_names: The K class names; labels index into them.
        source: "real" or "synthetic".
        provenance: JSON-serialisable description of how the data was made; may be updated until close.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_shape: tuple[int, int, int],
        class_names: list[str],
        source: str = "real",
        provenance: dict | None = None,
    ):
        if source not in SOURCES:
            raise DataError(f"source must be one of {SOURCES}, but is: {source!r}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise DataError(f"image_shape must be (C, H, W) with positive sizes, but is: {image_shape}")
        if len(class_names) < 1 or len(set(class_names)) != len(class_names):
            raise DataError(f"class_names must be non-empty and unique, but are: {class_names}")
        self.path = Path(path)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.class_names = [str(c) for c in class_names]
        self.source = source
        self.provenance = dict(provenance or {})
        self._file: h5py.File | None = None
        self._atomic = atomic_path(self.path)
        self._n = 0

    def __enter__(self) -> DatasetWriter:
        f = self._file = h5py.File(self._atomic.__enter__(), "w")
        c, h, w = self.image_shape
        f.create_dataset(
            "images", shape=(0, c, h, w), maxshape=(None, c, h, w), dtype="float32",
            chunks=(1, c, h, w), compression="gzip", compression_opts=4, shuffle=True,
        )
        f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        f.create_dataset("subjects", shape=(0,), maxshape=(None,), dtype=_STRING, chunks=(4096,))
        f.create_dataset("slice_index", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        return self

    def append(self, images, labels, subjects, slice_index) -> None:
        """Add a batch: images (B, C, H, W) in [0, 1], labels (B,), subjects (B,), slice_index (B,)."""
        assert self._file is not None, "use DatasetWriter as a context manager"
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        subjects = np.asarray(subjects, dtype=object).reshape(-1)
        slice_index = np.asarray(slice_index, dtype=np.int64).reshape(-1)
        b = len(images)
        if images.shape[1:] != self.image_shape:
            raise DataError(f"{self.path}: images must have shape (B, {self.image_shape}), got {images.shape}")
        if not (len(labels) == len(subjects) == len(slice_index) == b):
            raise DataError(f"{self.path}: images, labels, subjects and slice_index differ in length")
        _check_values(self.path, images, labels, len(self.class_names), offset=self._n)
        for name, values in (("images", images), ("labels", labels), ("subjects", subjects),
                             ("slice_index", slice_index)):
            ds = self._file[name]
            ds.resize(self._n + b, axis=0)
            ds[self._n:] = values
        self._n += b

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        try:
            if exc_type is None:
                f.attrs["class_names"] = json.dumps(self.class_names)
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["source"] = self.source
                f.attrs["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                f.attrs["augflow_version"] = __version__
                f.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True)
        finally:
            f.close()
        self._atomic.__exit__(exc_type, exc, tb)  # renames on success, deletes the temporary file otherwise


def write_dataset(path, images, labels, subjects, slice_index, class_names, source="real", provenance=None):
    """Write a whole dataset at once (atomically). See :class:`DatasetWriter`."""
    images = np.asarray(images, dtype=np.float32)
    with DatasetWriter(path, images.shape[1:], class_names, source, provenance) as writer:
        writer.append(images, labels, subjects, slice_index)
    return Path(path)


def read_info(path: str | os.PathLike, check_values: bool = True) -> DatasetInfo:
    """Open and validate a dataset file; return its metadata (images stay on disk).

    Arguments:
        path: An augflow HDF5 file.
        check_values: Also scan the images, in blocks, for NaN/Inf and values outside [0, 1].

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device or pipe)"
        raise DataError(f"{path}: is {kind}; give an augflow .h5 dataset file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        version = f.attrs.get("schema_version")
        if version is None:
            raise DataError(f"{path}: attribute 'schema_version' is missing; not an augflow dataset")
        if int(version) != SCHEMA_VERSION:
            raise DataError(f"{path}: unknown schema_version {int(version)}; this augflow reads {SCHEMA_VERSION}")
        for name in ("images", "labels", "subjects", "slice_index"):
            if name not in f:
                raise DataError(f"{path}: dataset '{name}' is missing")
        images = f["images"]
        if images.ndim != 4 or images.dtype != np.float32:
            raise DataError(f"{path}: 'images' must be float32 (N, C, H, W), got {images.dtype} {images.shape}")
        n = images.shape[0]
        for name, kind in (("labels", "i"), ("slice_index", "i")):
            ds = f[name]
            if ds.shape != (n,) or ds.dtype.kind != kind:
                raise DataError(f"{path}: '{name}' must be integer ({n},), got {ds.dtype} {ds.shape}")
        if f["subjects"].shape != (n,) or h5py.check_string_dtype(f["subjects"].dtype) is None:
            raise DataError(f"{path}: 'subjects' must be strings ({n},), got {f['subjects'].dtype}")
        try:
            class_names = json.loads(f.attrs["class_names"])
            provenance = json.loads(f.attrs.get("provenance", "{}"))
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{path}: attribute 'class_names' or 'provenance' is missing or not JSON ({e})") from None
        source = str(f.attrs.get("source", ""))
        if source not in SOURCES:
            raise DataError(f"{path}: attribute 'source' must be one of {SOURCES}, got {source!r}")
        labels = f["labels"][:].astype(np.int64)
        if check_values:
            for start in range(0, n, _SCAN_BLOCK):
                _check_values(path, images[start:start + _SCAN_BLOCK], labels[start:start + _SCAN_BLOCK],
                              len(class_names), offset=start)
        else:
            _check_values(path, None, labels, len(class_names))
        return DatasetInfo(
            path=path,
            image_shape=tuple(int(s) for s in images.shape[1:]),
            class_names=list(class_names),
            labels=labels,
            subjects=f["subjects"].asstr()[:].astype(object),
            slice_index=f["slice_index"][:].astype(np.int64),
            source=source,
            schema_version=int(version),
            created_at=str(f.attrs.get("created_at", "")),
            augflow_version=str(f.attrs.get("augflow_version", "")),
            provenance=provenance,
        )


def _check_values(path, images, labels, num_classes, offset=0) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = bad[0]
        raise DataError(f"{path}: label {labels[i]} at row {offset + i} is out of range [0, {num_classes})")
    if images is None:
        return
    images = np.asarray(images)
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        raise DataError(f"{path}: image at row {offset + int(np.argmin(finite))} contains NaN or Inf")
    if images.size and (images.min() < 0 or images.max() > 1):
        flat = images.reshape(len(images), -1)
        rows = np.flatnonzero((flat < 0).any(1) | (flat > 1).any(1))
        raise DataError(f"{path}: image at row {offset + int(rows[0])} has values outside [0, 1]")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(images: h5py.Dataset, indices) -> np.ndarray:
    """Rows of an open ``images`` dataset in the given order (repeats allowed) as float32 (n, C, H, W)."""
    # h5py fancy indexing needs strictly increasing indices: read each row once, then reorder.
    unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    if not len(unique):
        return np.empty((0, *images.shape[1:]), dtype=np.float32)
    return images[unique][inverse]


def read_images(path: str | os.PathLike, indices=None) -> np.ndarray:
    """Read images (all, or the given row indices) into memory as float32 (n, C, H, W)."""
    with h5py.File(path, "r") as f:
        return f["images"][:] if indices is None else read_rows(f["images"], indices)


class RowReader:
    """Batches of a subset of one file's rows as tensors, with the file kept open (the training loop's reader).

    Arguments:
        path: The dataset file.
        rows: The subset: position ``i`` of the reader is row ``rows[i]`` of the file.
        labels: The labels of those rows.
    """

    _MEAN_BLOCK = 512  # images per read when averaging, keeps memory flat

    def __init__(self, path: str | os.PathLike, rows: np.ndarray, labels: np.ndarray):
        self.path, self.rows, self.labels = Path(path), rows, labels
        self._images = h5py.File(path, "r")["images"]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32) and labels (int64) at the given positions of the subset."""
        images = read_rows(self._images, self.rows[positions])
        return torch.from_numpy(images), torch.from_numpy(self.labels[positions]).long()

    def mean_image(self) -> np.ndarray:
        """The mean image of the subset, float32 (C, H, W)."""
        total = np.zeros(self._images.shape[1:], dtype=np.float64)
        for start in range(0, len(self.rows), self._MEAN_BLOCK):
            total += self.batch(np.arange(start, min(start + self._MEAN_BLOCK, len(self.rows))))[0].sum(0).numpy()
        return (total / len(self.rows)).astype(np.float32)


class SliceDataset(Dataset):
    """A lazy torch ``Dataset`` of ``(image, label)`` over an augflow file (optionally a subset of rows).

    The file handle is opened on first access in each process, so the dataset works with DataLoader workers.

    Arguments:
        path: The dataset file (validated on construction).
        indices: Row subset to expose (default: all rows).
        transform: Optional callable applied to each image tensor (C, H, W).
    """

    def __init__(self, path: str | os.PathLike, indices=None, transform=None):
        self.info = read_info(path, check_values=False)
        self.path = self.info.path
        self.indices = np.arange(len(self.info)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = self.info.labels[self.indices]
        self.transform = transform
        self._images = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._images is None:
            self._images = h5py.File(self.path, "r")["images"]
        image = torch.from_numpy(self._images[int(self.indices[i])])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __getstate__(self):  # h5py handles cannot be pickled into DataLoader workers
        state = self.__dict__.copy()
        state["_images"] = None
        return state
