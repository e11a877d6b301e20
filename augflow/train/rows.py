"""The rows a training run learns from and validates on, and the fingerprint that ties its checkpoints to them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from augflow.data.splits import subject_split
from augflow.data.store import DatasetInfo, RowReader, read_info, sha256_file
from augflow.errors import ConfigError


@dataclass
class TrainingRows:
    """A run's training and validation rows.

    Attributes:
        info: The training file's.
        train: Reader of the training rows.
        val: Reader of the validation rows (possibly empty).
        subjects: ``(N,)`` the subject of each training row (the units of privacy under ``--dp-unit subject``).
        fingerprint: What the data are, not where: the SHA-256 of the training (and validation) file, the image
            shape and the row counts. A checkpoint resumes only on the same data (a byte-identical
            copy elsewhere is the same data).
    """

    info: DatasetInfo
    train: RowReader
    val: RowReader
    subjects: np.ndarray
    fingerprint: dict

    @classmethod
    def open(cls, data: str | Path, val: str | Path | None, val_fraction: float, seed: int) -> TrainingRows:
        """The rows of a training file and its validation file, or of a subject-wise split of the training file.

        Arguments:
            data: Training file (augflow HDF5). Its image shape and classes define the model.
            val: Validation file, or None: ``val_fraction`` of the subjects of ``data``, drawn with ``seed``.
            val_fraction: See ``val``.
            seed: See ``val``.

        Raises:
            ConfigError: If the validation file's classes or shape differ, or no training image is left.
            DataError: If a file holds no images.
        """
        data = Path(data)
        info = read_info(data).require_images("--data")
        if val is None:
            parts = subject_split(info.labels, info.subjects, val=val_fraction, test=0.0, seed=seed)
            train_rows, val_rows, val_path, val_labels = parts["train"], parts["val"], data, info.labels[parts["val"]]
        else:
            val = Path(val)
            val_info = read_info(val).require_images("--val")
            if val_info.class_names != info.class_names or val_info.image_shape != info.image_shape:
                raise ConfigError(f"--val {val}: classes {val_info.class_names} and shape {val_info.image_shape} "
                                  f"must match --data {data}: {info.class_names}, {info.image_shape}")
            train_rows, val_rows = np.arange(len(info)), np.arange(len(val_info))
            val_path, val_labels = val, val_info.labels
        if len(train_rows) == 0:
            raise ConfigError(f"--data {data}: no training images")
        fingerprint = {
            "data_sha256": sha256_file(data), "val_sha256": sha256_file(val) if val else None,
            "image_shape": list(info.image_shape),  # no class counts: under DP they are released only with noise
            "train_rows": len(train_rows), "val_rows": len(val_rows),
        }
        return cls(info, RowReader(data, train_rows, info.labels[train_rows]),
                   RowReader(val_path, val_rows, val_labels), info.subjects[train_rows], fingerprint)
