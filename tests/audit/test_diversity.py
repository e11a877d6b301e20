"""Diversity on known answers: the (MS-)SSIM variant fits the image size, identical pairs score 1, a collapsed
generator has intra-class MS-SSIM 1, above the real images'."""

import numpy as np
import pytest
from audit_helpers import CLASSES, blobs

from augflow.audit.diversity import diversity, random_pairs, similarity, ssim_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("side", "method", "win", "scales"), [
    (8, "ssim", 3, 1), (16, "ms-ssim", 3, 2), (32, "ms-ssim", 3, 3), (64, "ms-ssim", 3, 5), (192, "ms-ssim", 11, 5)])
def test_settings_fit_the_image_size(side, method, win, scales):
    s = ssim_settings(side)
    assert (s["method"], s["win_size"], s["scales"]) == (method, win, scales)
    if s["weights"] is not None and scales < 5:
        assert sum(s["weights"]) == pytest.approx(1)  # fewer scales: renormalised standard weights
    x = np.random.default_rng(0).random((3, 1, side, side), dtype=np.float32)
    assert similarity(x, x, s) == pytest.approx(np.ones(3))  # every variant runs at its size; identical -> 1
    assert np.all(similarity(x, x[::-1].copy(), s)[[0, 2]] < 0.5)


def test_pairs_are_distinct_and_respect_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [5, 1, 4])
    same = random_pairs(labels[:5], 200, rng, same_class=True)
    assert np.all(same[:, 0] != same[:, 1])
    cross = random_pairs(labels, 200, rng, same_class=False)
    assert np.all(labels[cross[:, 0]] != labels[cross[:, 1]])
    assert len(random_pairs(labels[5:6], 10, rng, same_class=True)) == 0  # one image: no pair


def test_collapsed_generator_has_intra_class_ms_ssim_one():
    real, y = blobs([12, 12, 12], size=32, seed=0)
    collapsed = np.concatenate([np.repeat(real[y == k][:1], 12, axis=0) for k in range(3)])
    out = diversity(collapsed, y, real, y, CLASSES, pairs=100, seed=0)
    assert out["settings"]["method"] == "ms-ssim" and out["settings"]["scales"] == 3
    assert out["synthetic"]["intra"] == pytest.approx(1.0)
    assert out["real"]["intra"] < 0.8 and out["real"]["inter"] < out["real"]["intra"]
    assert set(out["synthetic"]["per_class"]) == set(CLASSES)
    again = diversity(collapsed, y, real, y, CLASSES, pairs=100, seed=0)
    assert again == out  # seeded
