"""Fidelity on known answers: FID/KID of identical and shifted sets, agreement with torch-fidelity and prdc,
a collapsed generator, the cached domain encoder and the Inception path from a local weights file."""

import numpy as np
import prdc
import pytest
from audit_helpers import blobs, write_blobs

from augflow.audit.features import EncoderRecipe, domain_encoder_path, encoder_key, feature_space
from augflow.audit.fidelity import (
    FrechetToReference,
    compare,
    fid_bootstrap,
    fidelity,
    frechet_distance,
    prdc_metrics,
    torch_fidelity_metrics,
)
from augflow.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(n, d=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_identical_sets_have_zero_fid_and_same_distribution_zero_kid():
    a = gaussian(200)
    out = compare(a, a.copy(), bootstraps=20)
    assert out["fid"] == pytest.approx(0, abs=1e-6)
    assert out["fid_ci95"][0] <= out["fid"] + 1e-9 <= out["fid_ci95"][1] + 1e-9
    # KID is unbiased for independent samples (a set against itself is not one: its kernel diagonal enters K_XY)
    same = compare(a, gaussian(200, seed=1), bootstraps=0)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3


def test_fid_and_kid_grow_monotonically_with_a_shift():
    ref = gaussian(300, seed=0)
    outs = [compare(ref, gaussian(300, shift=s, seed=1), bootstraps=0) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    fids, kids = [o["fid"] for o in outs], [o["kid"] for o in outs]
    assert fids == sorted(fids) and kids == sorted(kids)
    assert fids[0] < 0.5 < fids[-1] / 10  # a same-distribution set is near 0; a 2-sigma shift is ~4 * d
    assert fids[-1] == pytest.approx(16 * 4, rel=0.15)  # |mean shift|^2 = d * 2^2


@pytest.mark.parametrize("n", [20, 80])  # fewer and more samples than dimensions
def test_fast_frechet_equals_torch_fidelity_formula(n):
    ref, cand = gaussian(60, d=40, seed=0), gaussian(n, d=40, shift=0.3, seed=1)
    assert FrechetToReference(ref)(cand) == pytest.approx(frechet_distance(ref, cand), rel=1e-6)


def test_bootstrap_interval_brackets_the_estimate():
    ref, cand = gaussian(100, seed=0), gaussian(100, shift=0.5, seed=1)
    fid = FrechetToReference(ref)
    lo, hi = fid_bootstrap(fid, cand, 50, seed=0)
    assert lo < fid(cand) < hi
    assert fid_bootstrap(fid, cand, 50, seed=0) == [lo, hi]  # seeded


def test_prdc_equals_the_prdc_package():
    real, fake = gaussian(60, seed=0), gaussian(50, shift=0.3, seed=1)
    ours = prdc_metrics(real, fake)
    ref = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    assert ours == pytest.approx({k: float(v) for k, v in ref.items()})


def test_collapsed_generator_high_precision_low_recall_and_coverage():
    real = gaussian(100, seed=0)
    collapsed = np.repeat(real[:1], 100, axis=0)  # one real image, repeated
    out = prdc_metrics(real, collapsed)
    assert out["precision"] == 1.0 and out["recall"] == 0.0 and out["coverage"] < 0.1
    fresh = prdc_metrics(real, gaussian(100, seed=1))
    assert fresh["recall"] > 0.5 and fresh["coverage"] > 0.5


def test_per_class_rows_are_size_matched_and_missing_classes_are_none():
    f, y = gaussian(90, seed=0), np.repeat([0, 1, 2], 30)
    synth, ys = gaussian(25, seed=1), np.r_[np.zeros(5), np.ones(20)].astype(int)  # no class 2
    out = fidelity(f, y, synth, ys, gaussian(90, seed=2), y, ["a", "b", "c"], bootstraps=5)
    assert out["overall"]["synthetic"]["n_candidate"] == out["overall"]["real"]["n_candidate"] == 25
    assert out["per_class"]["b"]["synthetic"]["n_candidate"] == 20
    assert out["per_class"]["a"]["synthetic"]["precision"] is None  # 5 images: too few for k = 5
    assert out["per_class"]["c"]["synthetic"]["fid"] is None


@pytest.fixture(scope="module")
def domain_space(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoder")
    train = write_blobs(tmp / "train.h5", [8, 8, 8], seed=0, prefix="train")
    return feature_space("domain", train, recipe=EncoderRecipe(epochs=1, batch_size=8), cache_dir=tmp / "cache"), \
        train, tmp


def test_torch_fidelity_with_the_registered_domain_extractor_equals_the_features(domain_space):
    space, _, _ = domain_space
    real, _ = blobs([10, 10, 10], seed=1)
    fake, _ = blobs([8, 8, 8], seed=2, noise=0.2)
    engine = torch_fidelity_metrics(space, real, fake, seed=0)
    f_real, f_fake = space.extract(real), space.extract(fake)
    assert f_real.shape == (30, 512)
    assert engine["fid"] == pytest.approx(FrechetToReference(f_real)(f_fake), rel=1e-4)
    ours = compare(f_real, f_fake, bootstraps=0)
    assert engine["kid"] == pytest.approx(ours["kid"], rel=1e-3, abs=1e-6)


def test_domain_encoder_is_cached_by_training_file_and_recipe(domain_space):
    space, train, tmp = domain_space
    recipe = EncoderRecipe(epochs=1, batch_size=8)
    path = domain_encoder_path(train, recipe, tmp / "cache")
    assert path == space.weights_path and path.parent == tmp / "cache"
    mtime = path.stat().st_mtime_ns
    assert domain_encoder_path(train, recipe, tmp / "cache").stat().st_mtime_ns == mtime  # reused, not retrained
    other = EncoderRecipe(epochs=1, batch_size=8, seed=1)
    assert encoder_key("abc", recipe) != encoder_key("abc", other) != encoder_key("abd", other)


def test_inception_needs_a_local_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="--inception-weights"):
        feature_space("inception", tmp_path / "train.h5")
    with pytest.raises(ConfigError, match="domain"):
        feature_space("clip", tmp_path / "train.h5")


def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    """The Inception path end to end, with random weights written to a local file (nothing is downloaded)."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as m:  # build an untrained network once, to have a weights file of the right layout
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    space = feature_space("inception", tmp_path / "unused.h5", inception_weights=tmp_path / "inception.pth")
    real, _ = blobs([2, 2], seed=1)  # 299 px Inception passes are slow on a CPU: few images
    fake, _ = blobs([2, 1], seed=2)
    f_real, f_fake = space.extract(real), space.extract(fake)
    assert f_real.shape == (4, 2048)
    engine = torch_fidelity_metrics(space, real, fake)
    assert engine["fid"] == pytest.approx(FrechetToReference(f_real)(f_fake), rel=1e-3, abs=1e-3)
