"""Tests of augflow.data.phantom (demo data): schema, counts, determinism, learnability."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from augflow.data import phantom
from augflow.data.phantom import (
    CLASS_COUNTS,
    MAX_OFFSET,
    SLICES_PER_SUBJECT,
    TASKS,
    class_counts,
    generate_demo_data,
    simulate_subject,
)
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def scanner_file(tmp_path_factory):
    return generate_demo_data(
        "scanner",
        tmp_path_factory.mktemp("ph") / "scanner.h5",
        size=SIZE,
        seed=0,
        scale=0.2,
        progress=False,
    )


@pytest.fixture(scope="module")
def modality_file(tmp_path_factory):
    return generate_demo_data(
        "modality",
        tmp_path_factory.mktemp("ph") / "modality.h5",
        size=SIZE,
        seed=0,
        scale=0.05,
        progress=False,
    )


def _digest(path) -> str:
    return hashlib.sha256(read_images(path).tobytes()).hexdigest()


def test_tasks_and_paper_counts():
    assert list(TASKS) == ["scanner", "modality"]
    for task, names in TASKS.items():
        assert list(CLASS_COUNTS[task]) == names
    assert sum(CLASS_COUNTS["scanner"].values()) == 1352
    assert CLASS_COUNTS["modality"] == {
        "T1": 527,
        "T2": 535,
        "FLAIR": 526,
        "FDG-PET": 522,
        "amyloid-PET": 516,
        "tau-PET": 518,
    }
    assert set(phantom.SCANNERS) == set(TASKS["scanner"])
    assert set(phantom.MODALITIES) == set(TASKS["modality"])


def test_class_counts_scaled():
    assert class_counts("scanner", 0.2) == {
        "Gyroscan Intera": 64,
        "Intera": 37,
        "GE IOP": 15,
        "TrioTim PPMI": 8,
        "TrioTim SALD": 99,
        "Prisma": 14,
        "Prisma Fit": 33,
    }
    assert class_counts("scanner") == CLASS_COUNTS["scanner"]
    assert set(class_counts("modality", 1e-6).values()) == {1}  # at least one slice per class


def test_scanner_file_schema_and_counts(scanner_file):
    info = read_info(scanner_file)  # validates the schema, finiteness and [0, 1]
    assert info.class_names == TASKS["scanner"]
    assert info.image_shape == (1, SIZE, SIZE)
    assert info.source == "real"
    assert info.class_counts() == class_counts("scanner", 0.2)
    images = read_images(scanner_file)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.max() == 1.0 and images.std() > 0.1  # normalised, not blank


def test_subjects_have_several_slices(scanner_file):
    info = read_info(scanner_file, check_values=False)
    per_subject = Counter(info.subjects)
    assert len(per_subject) == sum(
        -(-n // SLICES_PER_SUBJECT) for n in info.class_counts().values()
    )
    assert all(1 <= n <= SLICES_PER_SUBJECT for n in per_subject.values())
    assert np.mean([n == SLICES_PER_SUBJECT for n in per_subject.values()]) > 0.8
    assert info.slice_index.min() >= -MAX_OFFSET and info.slice_index.max() <= MAX_OFFSET
    for subject in per_subject:
        rows = info.subjects == subject
        assert len(set(info.labels[rows])) == 1  # a subject belongs to one class
        assert len(set(info.slice_index[rows])) == rows.sum()  # distinct slices
    assert "scanner-PrismaFit-0000" in per_subject


def test_provenance(scanner_file):
    prov = read_info(scanner_file, check_values=False).provenance
    assert prov["generator"] == "augflow.data.phantom"
    assert (prov["task"], prov["seed"], prov["size"], prov["scale"]) == ("scanner", 0, SIZE, 0.2)
    assert prov["template"] == "MNI152 ICBM 2009a (nilearn)"
    assert set(prov["scanners"]) == set(TASKS["scanner"])
    assert prov["scanners"]["GE IOP"]["window"] == "hann"
    assert prov["class_counts"] == class_counts("scanner", 0.2)


def test_modality_file(modality_file):
    info = read_info(modality_file)
    assert info.class_names == TASKS["modality"]
    assert info.class_counts() == class_counts("modality", 0.05)
    assert info.provenance["task"] == "modality" and "modalities" in info.provenance
    images = read_images(modality_file)[:, 0]
    mean = {name: images[info.labels == c].mean() for c, name in enumerate(info.class_names)}
    assert all(0.02 < m < 0.9 for m in mean.values())


def test_modality_contrasts():
    # T2: CSF (the ventricles, at the brain centre) brighter than in T1; PET smoother than MRI
    t1, _ = simulate_subject("modality", 0, 0, size=64, num_slices=1)
    t2, _ = simulate_subject("modality", 1, 0, size=64, num_slices=1)
    fdg, _ = simulate_subject("modality", 3, 0, size=64, num_slices=1)
    tissue = phantom._template(64).tissue[MAX_OFFSET]  # (3, W, W) undeformed, centre slice
    csf = tissue[2].reshape(64, 2, 64, 2).mean((1, 3)) > 0.8
    assert t2[0, 0][csf].mean() > t1[0, 0][csf].mean() + 0.2

    def roughness(img):
        return np.abs(np.diff(img, axis=-1)).mean() / (img.mean() + 1e-6)

    assert roughness(fdg[0, 0]) < roughness(t1[0, 0])


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path, scanner_file):
    again = generate_demo_data(
        "scanner", tmp_path / "again.h5", size=SIZE, seed=0, scale=0.2, progress=False
    )
    assert _digest(again) == _digest(scanner_file)
    other = generate_demo_data(
        "scanner", tmp_path / "other.h5", size=SIZE, seed=1, scale=0.2, progress=False
    )
    assert _digest(other) != _digest(scanner_file)
    assert not np.array_equal(read_info(other).slice_index, read_info(scanner_file).slice_index)


def test_another_seed_simulates_other_subjects_the_public_pretraining_set(tmp_path, scanner_file):
    # recipes/scanner-public.toml pretrains on seed 1 before a DP fine-tune on seed 0: no image may recur, and a
    # seed-1 image must be no closer to the seed-0 images than seed-0 subjects are to each other (other subjects,
    # not the same ones re-simulated with other noise).
    public = generate_demo_data("scanner", tmp_path / "public.h5", size=SIZE, seed=1, scale=0.2, progress=False)
    a, b = read_images(scanner_file).reshape(len(read_info(scanner_file)), -1).astype(np.float64), \
        read_images(public).reshape(len(read_info(public)), -1).astype(np.float64)
    assert not {x.tobytes() for x in a} & {x.tobytes() for x in b}
    subjects = np.asarray(read_info(scanner_file).subjects, dtype=str)

    def distances(p, q):
        return np.sqrt(((p * p).sum(1)[:, None] + (q * q).sum(1)[None] - 2 * p @ q.T).clip(0))

    within = distances(a, a)
    within[subjects[:, None] == subjects[None]] = np.inf  # another subject of the same file
    cross, other = np.median(distances(b, a).min(1)), np.median(within.min(1))
    assert cross > 0.9 * other, (cross, other)
    same_subject = distances(a, a)[subjects[:, None] == subjects[None]]
    assert np.median(same_subject[same_subject > 0]) < 0.75 * other  # the distance tells subjects apart


def test_subject_is_what_the_file_holds(scanner_file):
    info = read_info(scanner_file, check_values=False)
    rows = np.flatnonzero(info.subjects == "scanner-Intera-0002")
    images, offsets = simulate_subject("scanner", 1, 2, seed=0, size=SIZE)
    np.testing.assert_array_equal(read_images(scanner_file, rows), images)
    np.testing.assert_array_equal(info.slice_index[rows], offsets)


@pytest.mark.parametrize("task", list(TASKS))
def test_fewer_slices_are_a_subset(task):
    """A class's last subject (fewer slices at a smaller scale) keeps its full-scale slices."""
    for c in (0, len(TASKS[task]) - 1):
        full, full_offsets = simulate_subject(task, c, 3, seed=2, size=SIZE, num_slices=4)
        few, few_offsets = simulate_subject(task, c, 3, seed=2, size=SIZE, num_slices=2)
        assert set(few_offsets) <= set(full_offsets)
        np.testing.assert_array_equal(few, full[np.isin(full_offsets, few_offsets)])


def test_deterministic_across_thread_settings(tmp_path, scanner_file):
    code = (
        "import hashlib, sys; from augflow.data.phantom import simulate_subject as s; "
        "print(hashlib.sha256(s('scanner', 5, 1, seed=0, size=32)[0].tobytes()).hexdigest())"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = hashlib.sha256(
        simulate_subject("scanner", 5, 1, seed=0, size=32)[0].tobytes()
    ).hexdigest()
    assert out == here


def test_orientation_superior_up_neurological():
    vol = np.zeros((197, 1, 189))  # (x, y, z) RAS
    vol[0, 0, 188] = 1.0  # patient's left, most superior
    grid = phantom._to_grid(vol, 197, prefilter=False)[0]
    row, col = np.unravel_index(np.argmax(grid), grid.shape)
    assert row < 10  # superior at the top
    assert col == 0  # patient's left on the image left, as `augflow prepare` shows it


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"task": "mnist"}, "task"),
        ({"size": 8}, "size"),
        ({"size": 1000}, "size"),
        ({"size": 32.5}, "size"),
        ({"size": True}, "size"),
        ({"scale": 0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"scale": math.nan}, "scale"),
        ({"scale": math.inf}, "scale"),
        ({"scale": "1"}, "scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs, argument):
    args = {
        "task": "scanner",
        "out": tmp_path / "x.h5",
        "size": SIZE,
        "scale": 0.01,
        "progress": False,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=argument):
        generate_demo_data(**args)
    assert not (tmp_path / "x.h5").exists()


def test_scanner_task_is_learnable_but_not_trivial(tmp_path):
    """Histograms + logistic regression, subject-wise split: well above chance, below 100 %."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    path = generate_demo_data(
        "scanner", tmp_path / "s.h5", size=SIZE, seed=0, scale=0.5, progress=False
    )
    info = read_info(path, check_values=False)
    images = read_images(path)[:, 0]
    features = (
        np.stack([np.histogram(im, bins=32, range=(0, 1))[0] for im in images]) / images[0].size
    )
    scores = []
    for train, test in GroupShuffleSplit(5, test_size=0.3, random_state=0).split(
        features, info.labels, info.subjects
    ):
        assert not set(info.subjects[train]) & set(info.subjects[test])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        model.fit(features[train], info.labels[train])
        scores.append(balanced_accuracy_score(info.labels[test], model.predict(features[test])))
    accuracy = float(np.mean(scores))
    assert 0.35 < accuracy < 0.95, f"balanced accuracy {accuracy:.3f} (chance 1/7)"
