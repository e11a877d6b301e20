"""The classifier two-sample test: chance for one distribution, near 1 for two, blind to the class mix."""

import numpy as np
import pytest

from augflow.audit.detectability import detectability, matched_rows, two_sample_auc


def subjects(n: int, slices: int = 2, prefix: str = "s") -> np.ndarray:
    return np.array([f"{prefix}{i // slices}" for i in range(n)])


def test_matched_rows_give_every_class_the_smallest_count_in_every_set():
    labels = {"a": np.array([0] * 5 + [1] * 2 + [2] * 4), "b": np.array([0] * 3 + [1] * 6), "c": np.array([0, 1] * 4)}
    rows = matched_rows(labels)
    for name, y in labels.items():
        assert list(np.bincount(y[rows[name]], minlength=3)) == [3, 2, 0], name
        assert len(set(rows[name])) == len(rows[name])


def test_one_distribution_scores_chance_and_a_shift_scores_near_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same = two_sample_auc(a, subjects(200), b, subjects(200, prefix="t"))
    shifted = two_sample_auc(a + 1.0, subjects(200), b, subjects(200, prefix="t"))
    assert abs(same - 0.5) < 0.1, same
    assert shifted > 0.95, shifted  # the Bayes classifier: Phi(|shift| / sqrt 2) = Phi(2.83) = 0.998


def test_slices_of_one_subject_stay_in_one_fold():
    """Both sides drawn alike, but each subject's slices share a strong offset: a classifier that saw a subject's
    other slices in training would recognise them; grouped folds keep it at chance."""
    rng = np.random.default_rng(1)

    def side(n_subjects: int) -> np.ndarray:
        offsets = rng.normal(scale=3.0, size=(n_subjects, 16))
        return np.repeat(offsets, 4, axis=0) + 0.1 * rng.normal(size=(4 * n_subjects, 16))

    auc = two_sample_auc(side(40), subjects(160, 4), side(40), subjects(160, 4, "t"))
    assert abs(auc - 0.5) < 0.15, auc


def test_too_few_subjects_give_none():
    x = np.zeros((8, 4))
    assert two_sample_auc(x, subjects(8, 2), x, subjects(8, 2, "t")) is None  # 4 subjects < 5 folds


@pytest.mark.parametrize("seed", [0, 1])
def test_a_different_class_mix_alone_is_not_detected(seed):
    """Synthetic images of the minority classes only (a top-up) against a real set dominated by another class: the
    class mix would give them away; matched rows leave only the images."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(3, 8))

    def draw(counts):
        y = np.repeat(np.arange(3), counts)
        return centres[y] + rng.normal(size=(len(y), 8)), y

    (xs, ys), (xt, yt), (xr, yr) = draw([60, 60, 0]), draw([100, 60, 60]), draw([100, 40, 40])
    result = detectability({"features": {"synthetic": xs, "train": xt, "real": xr}},
                           {"synthetic": ys, "train": yt, "real": yr},
                           {"synthetic": subjects(len(ys), 1, "g"), "train": subjects(len(yt)),
                            "real": subjects(len(yr), 2, "t")}, seed=seed)
    assert result["n"] == 100  # the smallest count of each class: 60 + 40 + 0
    assert abs(result["features"]["synthetic"] - 0.5) < 0.15, result
    assert abs(result["features"]["real"] - 0.5) < 0.15, result
