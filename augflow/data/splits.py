"""Subject-wise, class-stratified splits of a dataset file.

Slices of one subject are strongly correlated, so every split in augflow is grouped by subject: no subject ever
appears in two parts. Stratification is done at the subject level on each subject's majority class, which keeps
the class proportions of every part close to the whole file's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from augflow.atomic import check_output
from augflow.data.store import DatasetWriter, read_images, read_info, sha256_file
from augflow.errors import ConfigError

PARTS = ("train", "val", "test")
_COPY_BLOCK = 256


def subject_split(labels, subjects, val: float = 0.1, test: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Split row indices into train/val/test, grouped by subject and stratified by class.

    For every class, that class's subjects are shuffled and the first ``round(test * n)`` go to test, the next
    ``round(val * n)`` to val, the rest to train (a class with a single subject stays in train).

    Arguments:
        labels: (N,) class index per row.
        subjects: (N,) subject id per row.
        val: Fraction of each class's subjects for validation, in [0, 1).
        test: Fraction of each class's subjects for test, in [0, 1); val + test < 1.
        seed: Seed of the shuffle.

    Returns:
        {"train": rows, "val": rows, "test": rows}, each sorted.
    """
    for name, frac in (("val", val), ("test", test)):
        if not 0 <= frac < 1:
            raise ConfigError(f"--{name} must be in range [0, 1), but is: {frac}")
    if val + test >= 1:
        raise ConfigError(f"--val + --test must be below 1, but is: {val + test}")
    labels = np.asarray(labels)
    subjects = np.asarray(subjects).astype(str)
    unique_subjects, subject_of_row = np.unique(subjects, return_inverse=True)
    # Majority class per subject (a subject normally has one class).
    counts = np.zeros((len(unique_subjects), labels.max() + 1), dtype=np.int64)
    np.add.at(counts, (subject_of_row, labels), 1)
    subject_class = counts.argmax(1)

    rng = np.random.default_rng(seed)
    part_of_subject = np.zeros(len(unique_subjects), dtype=np.int64)  # 0 train, 1 val, 2 test
    for k in np.unique(subject_class):
        members = rng.permutation(np.flatnonzero(subject_class == k))
        n = len(members)
        if n < 2:
            continue
        n_test = int(round(test * n))
        n_val = int(round(val * n))
        n_val = min(n_val, n - n_test - 1)  # leave at least one subject for training
        part_of_subject[members[:n_test]] = 2
        part_of_subject[members[n_test:n_test + n_val]] = 1
    part_of_row = part_of_subject[subject_of_row]
    return {name: np.flatnonzero(part_of_row == i) for i, name in enumerate(PARTS)}


def subject_kfold(labels, subjects, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of (train rows, test rows), grouped by subject and stratified by class.

    A thin wrapper around scikit-learn's ``StratifiedGroupKFold`` with shuffling.
    """
    if k < 2:
        raise ConfigError(f"k must be at least 2, but is: {k}")
    n_subjects = len(np.unique(np.asarray(subjects).astype(str)))
    if n_subjects < k:
        raise ConfigError(f"k must not exceed the number of subjects ({n_subjects}), but is: {k}")
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    groups = np.asarray(subjects).astype(str)
    return [(train, test) for train, test in folds.split(np.zeros(len(labels)), labels, groups)]


def write_subset(src: str | os.PathLike, rows, out: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Copy the given rows of a dataset file into a new file (atomic), streaming in blocks."""
    info = read_info(src, check_values=False)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    prov = {"parent": str(Path(src).resolve()), "parent_provenance": info.provenance, **(provenance or {})}
    with DatasetWriter(out, info.image_shape, info.class_names, info.source, prov) as writer:
        for start in range(0, len(rows), _COPY_BLOCK):
            block = rows[start:start + _COPY_BLOCK]
            writer.append(read_images(src, block), info.labels[block], info.subjects[block],
                          info.slice_index[block])
    return Path(out)


def split_file(path, out_dir, val: float = 0.1, test: float = 0.2, seed: int = 0,
               overwrite: bool = False) -> dict[str, Path]:
    """Write ``train.h5``, ``val.h5`` and ``test.h5`` of a dataset file into ``out_dir``.

    Arguments:
        path: The dataset file.
        out_dir: Folder of the three parts (created).
        val, test, seed: See :func:`subject_split`.
        overwrite: Replace parts that exist (never ``path`` itself).

    Returns:
        {"train": path, "val": path, "test": path}.

    Raises:
        ConfigError: For fractions out of range, or a part that exists without ``overwrite`` or is ``path``.
        DataError: If the file holds no images.
    """
    info = read_info(path).require_images("DATA")
    out_dir = Path(out_dir)
    for name in PARTS:
        check_output(out_dir / f"{name}.h5", overwrite, [path], option="--out-dir")
    parts = subject_split(info.labels, info.subjects, val=val, test=test, seed=seed)
    for name, fraction in (("val", val), ("test", test)):
        missing = [c for i, c in enumerate(info.class_names) if not np.any(info.labels[parts[name]] == i)]
        if missing and fraction > 0:
            warnings.warn(f"{out_dir / f'{name}.h5'}: no image of class(es) {missing} (too few subjects for "
                          f"--{name} {fraction}): their recall cannot be measured on it, nor per-class offsets fitted",
                          stacklevel=2)
    digest = sha256_file(path)
    written = {}
    for name, rows in parts.items():
        prov = {"split": name, "val": val, "test": test, "seed": seed, "parent_sha256": digest}
        written[name] = write_subset(path, rows, out_dir / f"{name}.h5", prov)
    return written
