"""Subject-wise splits: no subject in two parts, class stratification, determinism."""

import warnings

import numpy as np
import pytest
from conftest import make_dataset

from augflow.data.splits import split_file, subject_kfold, subject_split
from augflow.data.store import read_info
from augflow.errors import ConfigError


def _synthetic_labels(n_subjects=60, seed=0):
    rng = np.random.default_rng(seed)
    subject_class = rng.integers(0, 4, n_subjects)
    slices = rng.integers(1, 6, n_subjects)
    subjects = np.repeat([f"s{i}" for i in range(n_subjects)], slices)
    labels = np.repeat(subject_class, slices)
    return labels, subjects


def test_split_has_no_subject_leakage_and_covers_all_rows():
    labels, subjects = _synthetic_labels()
    parts = subject_split(labels, subjects, val=0.1, test=0.2, seed=3)
    sets = {k: set(subjects[v]) for k, v in parts.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(len(labels)))
    # Every class is represented in every part (each has >= 10 subjects here).
    for rows in parts.values():
        assert set(labels[rows]) == set(labels)


def test_split_is_deterministic_and_seed_dependent():
    labels, subjects = _synthetic_labels()
    a = subject_split(labels, subjects, seed=1)
    b = subject_split(labels, subjects, seed=1)
    c = subject_split(labels, subjects, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


@pytest.mark.parametrize("val, test", [(-0.1, 0.2), (0.5, 0.5), (0.1, 1.0)])
def test_split_rejects_bad_fractions(val, test):
    labels, subjects = _synthetic_labels()
    with pytest.raises(ConfigError):
        subject_split(labels, subjects, val=val, test=test)


def test_kfold_grouped():
    labels, subjects = _synthetic_labels()
    folds = subject_kfold(labels, subjects, k=5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(labels)))
    for train, test in folds:
        assert not set(subjects[train]) & set(subjects[test])
    with pytest.raises(ConfigError, match="k must not exceed"):
        subject_kfold(labels[:3], subjects[:3], k=5)


def test_split_file_writes_three_parts(tmp_path):
    src = make_dataset(tmp_path / "d.h5", n_subjects=30, slices=2)
    parts = split_file(src, tmp_path / "out", val=0.2, test=0.2, seed=0)
    infos = {k: read_info(p) for k, p in parts.items()}
    assert sum(len(i) for i in infos.values()) == 60
    subject_sets = [set(i.subjects) for i in infos.values()]
    assert sum(len(s) for s in subject_sets) == len(set().union(*subject_sets)) == 30
    assert infos["test"].provenance["split"] == "test"
    assert infos["train"].provenance["parent_provenance"] == {"test": True}


def test_split_file_warns_when_a_part_has_no_image_of_a_class(tmp_path):
    # 3 subjects per class: 10% of them rounds to no validation subject, 34% to one test subject.
    src = make_dataset(tmp_path / "d.h5", n_subjects=9, slices=2)
    with pytest.warns(UserWarning, match=r"val\.h5: no image of class\(es\) \['class0', 'class1', 'class2'\]"):
        split_file(src, tmp_path / "out", val=0.1, test=0.34, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every part has every class: silent
        split_file(src, tmp_path / "ok", val=0.34, test=0.34, seed=0)
