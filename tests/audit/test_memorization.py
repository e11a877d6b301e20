"""Memorization and membership inference on known answers: planted copies are flagged, fresh samples are not;
exchangeable members and non-members give AUC ~0.5; the epsilon bound matches Clopper-Pearson by hand."""

import math

import numpy as np
import pytest
from audit_helpers import blobs
from scipy.stats import beta

from augflow.audit.memorization import epsilon_lower_bound, membership_inference, memorization

pytestmark = pytest.mark.usefixtures("one_thread")


def features(images, seed=0):
    """A fixed random projection of the pixels: a stand-in feature space."""
    flat = images.reshape(len(images), -1)
    return flat @ np.random.default_rng(seed).normal(size=(flat.shape[1], 32))


@pytest.fixture
def sets():
    train, _ = blobs([40, 40, 40], seed=0)
    heldout, _ = blobs([30, 30, 30], seed=1)
    return train, heldout


def test_planted_exact_and_noised_copies_are_flagged(sets):
    train, heldout = sets
    rng = np.random.default_rng(2)
    exact = train[:10]
    noised = np.clip(train[10:20] + rng.normal(0, 0.01, train[10:20].shape), 0, 1).astype(np.float32)
    synthetic = np.concatenate([exact, noised])
    out = memorization(synthetic, heldout, train, features(synthetic), features(heldout), features(train))
    assert out["copy_fraction"] >= 0.95 and out["pixel"]["copy_fraction"] >= 0.95
    assert out["exact_copies"] == 10 and out["near_copies"] == 10
    assert out["pixel"]["ratio"] < 0.2
    pairs = out["closest_pairs"]
    assert len(pairs) == 16 and [p["distance"] for p in pairs] == sorted(p["distance"] for p in pairs)
    assert {(p["synthetic"], p["train"]) for p in pairs[:10]} == {(i, i) for i in range(10)}  # the exact ones


def test_fresh_samples_are_not_flagged(sets):
    train, heldout = sets
    fresh, _ = blobs([30, 30, 30], seed=3)
    out = memorization(fresh, heldout, train, features(fresh), features(heldout), features(train))
    assert out["copy_fraction"] < 0.05 and out["exact_copies"] == 0 and out["near_copies"] <= 1
    assert out["pixel"]["ratio"] == pytest.approx(1, abs=0.1)


def test_exchangeable_members_and_nonmembers_give_auc_one_half():
    rng = np.random.default_rng(0)
    out = membership_inference(rng.normal(size=2000), rng.normal(size=2000), seed=0)
    assert out["auc"] == pytest.approx(0.5, abs=0.03)
    assert out["epsilon_lower_bound"] < 0.3 and out["tpr_at_fpr"]["0.01"] < 0.05
    assert out["fpr_resolvable"] == {"0.01": True, "0.001": True}


def test_separable_members_give_a_large_auc_and_a_positive_bound():
    rng = np.random.default_rng(0)
    out = membership_inference(rng.normal(4, 1, 1000), rng.normal(0, 1, 1000), seed=0)
    assert out["auc"] > 0.99 and out["tpr_at_fpr"]["0.01"] > 0.8 and out["epsilon_lower_bound"] > 2


def test_the_auc_interval_over_subjects_is_wide_when_few_held_out_subjects_differ():
    """Slices of one subject share its likelihood level: with 3 held-out subjects an AUC far from 0.5 can be how those
    subjects differ, not membership, and the bootstrap over subjects says so; with 60 subjects it is narrow."""
    rng = np.random.default_rng(0)

    def subjects(n_subjects, slices=5):
        level = rng.normal(0, 1, n_subjects)  # a subject effect, the same for members and non-members
        return np.repeat(level, slices) + rng.normal(0, 0.2, n_subjects * slices), np.repeat(
            np.arange(n_subjects), slices)

    members, member_ids = subjects(60)
    few, few_ids = subjects(3)
    many, many_ids = subjects(60)
    narrow = membership_inference(members, many, member_subjects=member_ids, nonmember_subjects=many_ids)
    wide = membership_inference(members, few, member_subjects=member_ids, nonmember_subjects=few_ids)
    assert narrow["auc_interval"][0] < 0.5 < narrow["auc_interval"][1]
    assert np.ptp(narrow["auc_interval"]) < 0.25 < np.ptp(wide["auc_interval"])
    assert wide["auc_interval"][0] <= wide["auc"] <= wide["auc_interval"][1]
    assert (wide["n_member_subjects"], wide["n_nonmember_subjects"]) == (60, 3)
    assert membership_inference(members, many)["auc_interval"] is None  # no subjects: no interval


def test_epsilon_bound_by_hand():
    # A perfect test on 1000 + 1000 examples; each Clopper-Pearson bound at 97.5% (Bonferroni over the pair).
    n, delta = 1000, 1e-5
    tpr_lo = beta.ppf(0.025, n, 1)  # = 0.025 ** (1 / n)
    fpr_hi = beta.ppf(0.975, 1, n)  # = 1 - 0.025 ** (1 / n)
    expected = math.log((tpr_lo - delta) / fpr_hi)
    assert epsilon_lower_bound(n, 0, 0, n, delta)[()] == pytest.approx(expected)
    assert expected == pytest.approx(math.log(0.025 ** (1 / n) / (1 - 0.025 ** (1 / n))), abs=1e-3)
    assert epsilon_lower_bound(500, 500, 500, 500, delta)[()] == 0  # a coin flip proves nothing


def test_membership_scores_cover_both_families():
    import torch

    from augflow.audit.run import membership_scores
    from augflow.flows import MagicFlow, MagicFlowConfig
    from augflow.symmflow import SymmFlow
    from augflow.symmflow.model import SymmFlowConfig

    rng = np.random.default_rng(0)
    images = rng.random((6, 1, 8, 8), dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    flow = MagicFlow(MagicFlowConfig(image_shape=(1, 8, 8), num_classes=2, full_res_steps=("checkerboard",),
                                     channel_steps=1, checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4))
    expected = flow.log_prob(torch.from_numpy(images), torch.from_numpy(labels)).detach().double().numpy()
    np.testing.assert_allclose(membership_scores(flow, images, labels, batch_size=4), expected, rtol=1e-5)
    symm = SymmFlow(SymmFlowConfig(image_shape=(1, 8, 8), num_classes=2, base_channels=8, channel_mult=(1, 2),
                                   attention_resolutions=(), num_heads=1).validate())
    scores = membership_scores(symm, images, labels, batch_size=4)  # minus the flow-matching loss: no likelihood
    assert scores.shape == (6,) and np.all(np.isfinite(scores)) and np.all(scores < 0)
    np.testing.assert_array_equal(scores, membership_scores(symm, images, labels, batch_size=4))  # seeded draws
