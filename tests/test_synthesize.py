"""augflow synthesize: class resolution, balancing, provenance, determinism and atomic output."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_dataset

from augflow.cli import cli
from augflow.data.store import read_images, read_info, sha256_file
from augflow.errors import ConfigError
from augflow.synthesize import Selection, balance_counts, synthesize, training_counts
from augflow.train.loop import train
from augflow.train.recipe import load_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    # Imbalanced: 3 classes with 6, 3, 3 subjects.
    data = make_dataset(tmp / "d.h5", n_subjects=12, slices=2, num_classes=4)
    result = train(data, tmp / "run", load_recipe(None, [*TINY, "train.max_steps=2"]), progress=False)
    return result.run_dir


def test_class_by_name_case_insensitive(run, tmp_path):
    out = tmp_path / "s.h5"
    result = synthesize(run, out, {"CLASS1": 5}, seed=1, batch_size=2, progress=False)
    info = read_info(out)
    assert result.counts["class1"] == 5 and len(info) == 5 and info.source == "synthetic"
    assert set(info.labels) == {1} and all(s.startswith("synthetic-class1-") for s in info.subjects)
    prov = info.provenance
    assert prov["model_sha256"] == sha256_file(run / "model.pt")
    assert prov["seed"] == 1 and prov["temperature"] == 0.8 and prov["counts"]["class1"] == 5
    assert prov["rejected_nonfinite"] == 0 and prov["recipe"]["train"]["batch_size"] == 8
    images = read_images(out)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_same_seed_same_images(run, tmp_path):
    a = synthesize(run, tmp_path / "a.h5", {"class0": 3, "class2": 2}, seed=7, progress=False).out
    b = synthesize(run, tmp_path / "b.h5", {"class0": 3, "class2": 2}, seed=7, progress=False).out
    c = synthesize(run, tmp_path / "c.h5", {"class0": 3, "class2": 2}, seed=8, progress=False).out
    assert np.array_equal(read_images(a), read_images(b))
    assert not np.array_equal(read_images(a), read_images(c))


def test_cli_per_class_equals_the_api(run, tmp_path):
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--per-class", "2", "--seed", "3", "--out",
                                      str(tmp_path / "cli.h5")])
    assert result.exit_code == 0, result.output
    api = synthesize(run, tmp_path / "api.h5", {f"class{k}": 2 for k in range(4)}, seed=3, progress=False).out
    assert list(np.bincount(read_info(tmp_path / "cli.h5").labels)) == [2, 2, 2, 2]
    assert np.array_equal(read_images(tmp_path / "cli.h5"), read_images(api))


def test_unknown_class_lists_valid_names_and_writes_nothing(run, tmp_path):
    with pytest.raises(ConfigError, match="unknown class 'Prism'; valid classes: class0, class1, class2, class3"):
        synthesize(run, tmp_path / "x.h5", {"Prism": 3}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_balance_counts():
    assert balance_counts({"a": 10, "b": 4, "c": 7}) == {"a": 0, "b": 6, "c": 3}
    assert balance_counts({"a": 10, "b": 4, "c": 7}, target=8) == {"a": 0, "b": 4, "c": 1}
    with pytest.raises(ConfigError):
        balance_counts({"a": 1, "b": 2}, target=0)


def test_non_finite_samples_are_redrawn_and_counted(run, tmp_path, monkeypatch):
    import torch

    from augflow.flows import MagicFlow

    original = MagicFlow.sample
    calls = []

    def sometimes_nan(self, y, temperature=1.0, generator=None):
        x = original(self, y, temperature, generator)
        calls.append(len(y))
        if len(calls) == 1:
            x[0] = float("nan")  # the first draw of the first batch is broken
        return x

    monkeypatch.setattr(MagicFlow, "sample", sometimes_nan)
    out = tmp_path / "s.h5"
    result = synthesize(run, out, {"class0": 4}, progress=False)
    assert result.rejected_nonfinite == 1 and calls == [4, 1]
    assert read_info(out).provenance["rejected_nonfinite"] == 1
    assert torch.isfinite(torch.from_numpy(read_images(out))).all()


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A model trained without --val on an imbalanced file: 8, 4 and 2 subjects of 2 slices (16, 8, 4 images)."""
    from augflow.data.store import write_dataset

    tmp = tmp_path_factory.mktemp("imbalanced")
    subjects = np.repeat(np.arange(14), 2)
    labels = np.where(subjects < 8, 0, np.where(subjects < 12, 1, 2))
    images = np.random.default_rng(0).random((28, 1, 8, 8), dtype=np.float32)
    data = write_dataset(tmp / "d.h5", images, labels, [f"s{s}" for s in subjects], np.zeros(28, dtype=np.int64),
                         ["big", "mid", "small"])
    run = train(data, tmp / "run", load_recipe(None, [*TINY, "train.max_steps=2", "train.val_fraction=0.3"]),
                progress=False).run_dir
    return data, run


def test_balance_tops_up_the_whole_training_file_not_only_the_rows_trained_on(imbalanced, tmp_path):
    from augflow.synthesize import topup_counts

    data, run = imbalanced
    trained_on = training_counts(run)
    assert sum(trained_on.values()) < 28  # train held a subject-wise part out for validation
    counts, record = topup_counts(run)
    assert counts == {"big": 0, "mid": 8, "small": 12} and record["counted_from"].startswith("the model's whole")
    out = synthesize(run, tmp_path / "t.h5", counts, counts_source=record, progress=False).out
    together = np.bincount(np.concatenate([read_info(data).labels, read_info(out).labels]), minlength=3)
    assert together.tolist() == [16, 16, 16]  # real + top-up is balanced
    assert read_info(out).provenance["counts_source"]["real_counts"] == {"big": 16, "mid": 8, "small": 4}


def test_max_ratio_caps_the_synthetic_images_per_real_image(imbalanced):
    from augflow.synthesize import topup_counts

    _, run = imbalanced
    assert topup_counts(run, max_ratio=1.5)[0] == {"big": 0, "mid": 8, "small": 6}  # min(16 - n, floor(1.5 n))
    assert topup_counts(run, max_ratio=0.5)[0] == {"big": 0, "mid": 4, "small": 2}
    assert topup_counts(run, target=10, max_ratio=3)[0] == {"big": 0, "mid": 2, "small": 6}


def test_posterior_selection_keeps_only_confident_samples_and_records_the_acceptance(imbalanced, tmp_path,
                                                                                     monkeypatch):
    import torch

    from augflow.classify import likelihood

    # A known scorer: class 2's log-likelihood grows with the image mean, the others are flat, so p(2 | x) is a
    # logistic function of the mean and a threshold keeps the brighter samples only.
    def scores(model, x, k, shift_radius=0):
        mean = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([torch.zeros(len(x), 2), 200 * (mean - 0.5)], dim=1)

    monkeypatch.setattr(likelihood, "class_log_likelihoods", scores)
    data, run = imbalanced
    out = synthesize(run, tmp_path / "s.h5", {"small": 10}, selection=Selection("posterior", 0.6), batch_size=16,
                     progress=False).out
    images, prov = read_images(out), read_info(out).provenance["selection"]
    assert len(images) == 10
    log_pi = np.log(np.array(training_counts(run)["small"]) / sum(training_counts(run).values()))
    others = np.log(np.array([training_counts(run)[c] for c in ("big", "mid")]) / sum(training_counts(run).values()))
    own = 200 * (images.reshape(10, -1).mean(1) - 0.5) + log_pi
    p_small = np.exp(own) / (np.exp(own) + np.exp(others).sum())
    assert (p_small >= 0.6 - 1e-5).all()  # every kept sample passes the threshold
    assert prov["method"] == "posterior" and prov["min_confidence"] == 0.6
    assert prov["kept"]["small"] >= 10 and prov["drawn"]["small"] > prov["kept"]["small"]  # some were rejected
    assert prov["acceptance_rate"]["small"] == pytest.approx(prov["kept"]["small"] / prov["drawn"]["small"])


def test_a_selection_that_keeps_nothing_stops_after_a_quarter_of_its_budget(imbalanced, tmp_path, monkeypatch):
    import torch

    from augflow.classify import likelihood

    # Flat class scores: p(small | x) is its prior 4 / 28 < 0.6 for every sample, so nothing is ever kept. The budget
    # is 20 draws x 10 images = 200; after 80 draws (5 batches) even the 99.9% upper bound of the acceptance, 0.083,
    # cannot give 10 images in the other 120 (at 64 draws the bound, 0.102, still could).
    monkeypatch.setattr(likelihood, "class_log_likelihoods", lambda model, x, k, shift_radius=0: torch.zeros(len(x), 3))
    _, run = imbalanced
    out = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match=r"class 'small' kept 0 of 80 samples drawn \(0.0%\), short of the 10 asked "
                                          r"for; at that rate the other 120 draws of its budget would not make up the "
                                          r"rest; loosen --min-confidence"):
        synthesize(run, out, {"small": 10}, selection=Selection("posterior", 0.6), batch_size=16, progress=False)
    assert not out.exists()


def test_posterior_selection_of_a_dp_model_ignores_a_calibration_fitted_on_real_images(imbalanced, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from augflow import synthesize as module
    from augflow.runs import calibration_file, write_json

    _, trained = imbalanced
    run = shutil.copytree(trained, tmp_path / "run")
    write_json({"calibration_temperature": 7.0, "class_biases": None, "prior": "train"}, calibration_file(run))
    selection = Selection("posterior", 0.01)
    plain = read_info(synthesize(run, tmp_path / "a.h5", {"small": 2}, selection=selection,
                                 progress=False).out).provenance["selection"]
    assert plain["calibration_temperature"] == 7.0 and plain["calibration"] == "calibration.json"
    fake = type("L", (), {"dp": True, "to_dict": lambda self: {"dp": True}})()
    monkeypatch.setattr(module.Ledger, "from_dict", staticmethod(lambda stored: fake))
    private = read_info(synthesize(run, tmp_path / "b.h5", {"small": 2}, selection=selection,
                                   progress=False).out).provenance["selection"]
    assert private["calibration_temperature"] == 1.0 and private["calibration"].startswith("ignored: the model is DP")


def test_classifier_selection_trains_on_the_real_file_and_records_it(imbalanced, tmp_path, monkeypatch):
    monkeypatch.setenv("AUGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    data, run = imbalanced
    out = synthesize(run, tmp_path / "s.h5", {"mid": 3}, selection=Selection("classifier", 0.05, data),
                     progress=False).out
    prov = read_info(out).provenance["selection"]
    assert prov["trained_on_sha256"] == sha256_file(data) and prov["kept"]["mid"] >= 3
    assert list((tmp_path / "cache" / "encoders").glob("*.pt"))  # the classifier is cached for the next call


def test_a_dp_model_selects_with_a_classifier_of_data_declared_public(imbalanced, tmp_path, monkeypatch):
    """--select-public: selecting DP samples with a classifier of public images is post-processing, so a DP model
    allows it and records the declaration; the model's own training file declared public is refused."""
    from augflow import synthesize as module
    from augflow.data.store import write_dataset
    from augflow.errors import PrivacyError

    monkeypatch.setenv("AUGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    data, run = imbalanced
    info = read_info(data)
    public = write_dataset(tmp_path / "public.h5", np.random.default_rng(1).random((12, 1, 8, 8), dtype=np.float32),
                           np.arange(12) % 3, [f"p{i}" for i in range(12)], np.zeros(12, dtype=np.int64),
                           info.class_names)
    fake = type("L", (), {"dp": True, "to_dict": lambda self: {"dp": True}})()
    from_dict = module.Ledger.from_dict
    monkeypatch.setattr(module.Ledger, "from_dict", staticmethod(lambda stored: fake))
    with pytest.raises(ConfigError, match="drop --select classifier .*--select-public FILE"):
        synthesize(run, tmp_path / "a.h5", {"mid": 3}, selection=Selection("classifier", 0.05, public),
                   progress=False)
    out = synthesize(run, tmp_path / "s.h5", {"mid": 3}, selection=Selection("classifier", 0.05, public, public=True),
                     progress=False).out
    prov = read_info(out).provenance["selection"]
    assert prov["declared_public"] and prov["trained_on_sha256"] == sha256_file(public)
    assert prov["trained_on"] == "public.h5" and "declared public by the user" in prov["classifier"]
    with monkeypatch.context() as without_dp:  # a model without DP may select with its own training file
        without_dp.setattr(module.Ledger, "from_dict", from_dict)
        assert read_info(synthesize(run, tmp_path / "n.h5", {"mid": 3}, selection=Selection(
            "classifier", 0.05, data, public=True), progress=False).out).provenance["selection"]["declared_public"]
    with pytest.raises(PrivacyError, match=r"--select-public .*d.h5 is the model's own training file"):
        synthesize(run, tmp_path / "p.h5", {"mid": 3}, selection=Selection("classifier", 0.05, data, public=True),
                   progress=False)
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / "a.h5").exists()
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--out", str(tmp_path / "c.h5"),
                                      "--per-class", "2", "--select-public", str(public)])
    assert result.exit_code != 0 and "--select-public goes with --select classifier or realism" in result.output
    assert not (tmp_path / "c.h5").exists()


def test_realism_selection_keeps_the_samples_its_discriminator_finds_real(imbalanced, tmp_path, monkeypatch):
    """With the image mean m as the feature (as m and m^2, so the logistic regression's logit is a parabola in m),
    the selection keeps one interval of means around the real images of the class, rejects both far ends, and keeps
    about its keep fraction of draws like the pilot's."""
    from augflow.audit import baseline
    from augflow.data.store import read_images
    from augflow.models import load_model
    from augflow.synthesize import PILOT, _Selector

    monkeypatch.setenv("AUGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    mean = lambda x: x.flatten(1).mean(1, keepdim=True)  # noqa: E731
    monkeypatch.setattr(baseline, "penultimate", lambda model, x: torch.cat([mean(x), mean(x) ** 2], 1))
    data, run = imbalanced
    flow, meta = load_model(run / "model.pt", with_meta=True)
    selection = Selection("realism", real=data, keep_fraction=0.3)
    selector = _Selector(selection, flow, meta, run / "model.pt", torch.device("cpu"), progress=False)
    levels = torch.linspace(0, 1, 101)
    # Pilot samples spread evenly over [0, 1]; the real "small" images are uniform noise, of mean about 0.5.
    grid = iter(levels[torch.randperm(101, generator=torch.Generator().manual_seed(0))].repeat(5).split(50))
    selector.prepare(2, lambda: next(grid).view(-1, 1, 1, 1).expand(-1, 1, 8, 8), "small")
    assert selector.details["pilot"]["small"] >= PILOT
    kept = selector.keep(levels.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone(), 2).flatten(1).mean(1)
    assert 25 <= len(kept) <= 35  # the draws are spread like the pilot: about 30% pass its 70% quantile
    real_means = read_images(data)[read_info(data).labels == 2].reshape(4, -1).mean(1)
    assert kept.min() <= real_means.mean() <= kept.max()  # around the real images
    steps = (kept * 100).round().long()  # the kept grid points: one interval
    assert torch.equal(steps, torch.arange(int(steps.min()), int(steps.max()) + 1))
    assert 0.0 not in kept and 1.0 not in kept  # the far ends look synthetic
    assert selector.kept[2] == len(kept) and selector.drawn[2] == 101


def test_realism_scores_samples_in_float32_under_amp(imbalanced, tmp_path, monkeypatch):
    """The pilot is scored outside the sampler's autocast and the kept samples inside it: both must see the same
    float32 features, or the threshold set on the pilot would not apply to the samples."""
    from augflow.models import load_model
    from augflow.synthesize import _Selector

    monkeypatch.setenv("AUGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    data, run = imbalanced
    flow, meta = load_model(run / "model.pt", with_meta=True)
    selection = Selection("realism", real=data)
    selector = _Selector(selection, flow, meta, run / "model.pt", torch.device("cpu"), progress=False)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = selector._features(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.array_equal(selector._features(images), plain)


def test_realism_selection_needs_a_real_image_of_the_class(imbalanced, tmp_path, monkeypatch):
    from augflow.data.store import write_dataset

    monkeypatch.setenv("AUGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    data, run = imbalanced
    info = read_info(data)
    keep = info.labels != 2
    real = write_dataset(tmp_path / "no-small.h5", read_images(data)[keep], info.labels[keep],
                         list(np.asarray(info.subjects)[keep]), np.zeros(int(keep.sum()), dtype=np.int64),
                         info.class_names)
    with pytest.raises(ConfigError, match="has no image of class 'small'"):
        synthesize(run, tmp_path / "s.h5", {"small": 2}, selection=Selection("realism", 0.5, real), progress=False)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("args, message", [
    (["--balance", "--select", "realism"], "--select realism needs --real FILE"),
    (["--balance", "--select", "posterior", "--min-confidence", "0"], "--min-confidence must be in (0, 1)"),
    (["--balance", "--select", "posterior", "--min-confidence", "1.5"], "--min-confidence must be in (0, 1)"),
    (["--balance", "--max-ratio", "0"], "--max-ratio must be > 0"),
    (["--balance", "--select", "classifier"], "--select classifier needs --real FILE"),
    (["--balance", "--select", "best"], "'best' is not one of 'none', 'posterior', 'classifier'"),
    (["--per-class", "2", "--max-ratio", "2"], "--target-count and --max-ratio go with --balance"),
    (["--balance", "--real", "{other}"], "--real"),
])
def test_bad_selection_and_balance_options_are_named_and_write_nothing(imbalanced, tmp_path, args, message):
    _, run = imbalanced
    other = make_dataset(tmp_path / "other.h5", num_classes=2)  # classes differ from the model's
    out = tmp_path / "out.h5"
    args = [a.format(other=other) for a in args]
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--out", str(out), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_denoise_is_one_tweedie_step_along_the_exact_score(run):
    from augflow.models import load_model
    from augflow.synthesize import _denoised

    flow = load_model(run).double()
    x = flow.sample(torch.tensor([1, 1, 1]), generator=torch.Generator().manual_seed(0))
    sigma = 0.05
    score = (_denoised(flow, x, 1, sigma) - x) / sigma**2
    # Independent of autograd: the directional derivative of log p(x | 1) by central differences.
    y, v, h = torch.ones(3, dtype=torch.long), torch.randn(x.shape, dtype=x.dtype), 1e-6
    numeric = (flow.log_prob(x + h * v, y) - flow.log_prob(x - h * v, y)) / (2 * h)
    assert torch.allclose((score * v).sum(dim=(1, 2, 3)), numeric, rtol=1e-5, atol=1e-4)


def test_denoise_records_the_training_noise_and_needs_one(run, tmp_path):
    out = tmp_path / "d.h5"
    synthesize(run, out, {"class0": 2}, denoise=True, progress=False)
    assert read_info(out).provenance["denoise_sigma"] == 0.01  # the recipe's augment.noise_std
    plain = train(make_dataset(tmp_path / "plain.h5", n_subjects=8, slices=2), tmp_path / "plain",
                  load_recipe(None, [*TINY, "train.max_steps=1", "augment.noise_std=0"]), progress=False).run_dir
    with pytest.raises(ConfigError, match="trained without it .*drop --denoise"):
        synthesize(plain, tmp_path / "x.h5", {"class0": 2}, denoise=True, progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_near_moves_from_the_real_images_to_ordinary_samples_with_the_strength(imbalanced, tmp_path):
    from augflow.synthesize import Anchors

    data, run = imbalanced
    real, labels = read_images(data), read_info(data).labels
    small = real[labels == 2]  # 4 images
    out = synthesize(run, tmp_path / "near.h5", {"small": 8}, near=Anchors(data, 1e-6), progress=False).out
    images = read_images(out)
    # Almost no noise: each sample is the decoding of a real image's own latent, i.e. that image, and the 4
    # anchors take turns (each twice).
    distance = np.abs(images[:, None] - small[None]).reshape(8, 4, -1).max(-1)
    assert (distance.min(1) < 1e-3).all()
    assert np.bincount(distance.argmin(1), minlength=4).tolist() == [2, 2, 2, 2]
    prov = read_info(out).provenance["near"]
    assert prov == {"real": "d.h5", "real_sha256": sha256_file(data), "strength": 1e-6, "anchor_classes": "same",
                    "derived_from_real_images": True}
    # Strength 1 ignores the anchor: the same draws as ordinary sampling with that seed.
    full = synthesize(run, tmp_path / "full.h5", {"small": 8}, near=Anchors(data, 1.0), seed=4, progress=False).out
    plain = synthesize(run, tmp_path / "plain.h5", {"small": 8}, seed=4, progress=False).out
    assert np.allclose(read_images(full), read_images(plain), atol=1e-5)
    # In between, samples leave the real images behind.
    half = synthesize(run, tmp_path / "half.h5", {"small": 8}, near=Anchors(data, 0.5), progress=False).out
    assert (np.abs(read_images(half)[:, None] - small[None]).reshape(8, 4, -1).max(-1).min(1) > 1e-2).all()


@pytest.mark.parametrize("prior", ["class_gaussian", "class_diagonal"])
def test_near_shrinks_the_deviation_from_the_class_mean_of_a_class_prior(prior):
    from augflow.flows import MagicFlow, MagicFlowConfig

    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 8, 8), num_classes=2, full_res_steps=("application",), channel_steps=1,
                             checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4, prior=prior)
    flow = MagicFlow(config).double().eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))  # leave the identity initialisation
        y, x = torch.tensor([1, 1, 0]), torch.rand(3, 1, 8, 8, dtype=torch.float64)
        real, (means, log_scales) = flow.encode(x, y)[0], flow.prior(y)
        strength, temperature = 0.6, 0.8  # sqrt(1 - 0.6^2) = 0.8
        near = flow.encode(flow.sample_near(x, y, y, strength, temperature, torch.Generator().manual_seed(0)), y)[0]
        generator = torch.Generator().manual_seed(0)
        for z_near, z, mu, log_sigma in zip(near, real, means, log_scales, strict=True):
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
            torch.testing.assert_close(z_near, mu + 0.8 * (z - mu) + strength * temperature * log_sigma.exp() * eps)
        # Strength 1 ignores the anchor: an ordinary sample, mu_y + T sigma_y eps.
        full = flow.sample_near(x, y, y, 1.0, temperature, torch.Generator().manual_seed(1))
        torch.testing.assert_close(full, flow.sample(y, temperature, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("prior", ["class_gaussian", "class_diagonal"])
def test_anchors_of_another_class_are_translated_through_the_standardised_latent(prior):
    from augflow.flows import MagicFlow, MagicFlowConfig
    from augflow.synthesize import _AnchorImages

    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 8, 8), num_classes=3, full_res_steps=("application",), channel_steps=1,
                             checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4, prior=prior)
    flow = MagicFlow(config).double().eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x, c = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 0, 2])
        anchors = _AnchorImages(x, c, {1: torch.tensor([0, 1, 2, 3])})
        order = torch.tensor([3, 0, 1, 2])
        x_next, c_next = anchors.batch(order, 1, 2, "cpu")  # the 2nd and 3rd anchors of the order: rows 0 and 1
        torch.testing.assert_close(x_next, x[[0, 1]])
        assert c_next.tolist() == [0, 2]
        # Decoded as class 1: its prior mean and scale around the anchor's deviation standardised by its own
        # class's (0 and 2) prior.
        y = torch.tensor([1, 1])
        translated = flow.encode(flow.sample_near(x_next, c_next, y, 1e-9, 0.8, torch.Generator().manual_seed(0)),
                                 y)[0]
        z_own, (mu_own, s_own) = flow.encode(x_next, c_next)[0], flow.prior(c_next)
        for z, z_c, mu_c, s_c, mu, s in zip(translated, z_own, mu_own, s_own, *flow.prior(y), strict=True):
            torch.testing.assert_close(z, mu + s.exp() * (z_c - mu_c) / s_c.exp())


def test_medsymmflow_near_starts_its_ode_on_the_real_images_path():
    from augflow.symmflow import SymmFlow, SymmFlowConfig

    torch.manual_seed(0)
    model = SymmFlow(SymmFlowConfig(image_shape=(1, 8, 8), num_classes=3, base_channels=8, channel_mult=(1, 2),
                                    steps=10)).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    # Strength 1: the ordinary sample with the same generator.
    torch.testing.assert_close(model.sample_near(x, y, y, 1.0, 0.9, torch.Generator().manual_seed(3)),
                               model.sample(y, 0.9, torch.Generator().manual_seed(3)))
    # Strength -> 0: the real image (no integration time left, sigma_min of noise).
    torch.testing.assert_close(model.sample_near(x, y, y, 1e-6, 1.0, torch.Generator().manual_seed(3)), x,
                               atol=1e-3, rtol=0)
    # In between, the distance to the anchor grows with the strength.
    distances = [(model.sample_near(x, y, y, s, 1.0, torch.Generator().manual_seed(3)) - x).abs().mean().item()
                 for s in (0.1, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2], distances


def test_anchor_classes_choose_the_rows_that_anchor_each_class(imbalanced):
    from augflow.models import load_model
    from augflow.runs import model_file
    from augflow.synthesize import Anchors

    data, run = imbalanced
    labels = read_info(data).labels
    flow, meta = load_model(model_file(run), with_meta=True)
    for classes, expected in [("same", labels == 2), ("other", labels != 2), ("all", labels >= 0)]:
        rows = Anchors(data, 0.3, classes).load(flow, meta, model_file(run), [0, 0, 5]).rows[2]
        assert sorted(rows.tolist()) == np.flatnonzero(expected).tolist()
    with pytest.raises(ConfigError, match="--anchor-classes must be one of same, other, all"):
        Anchors(data, 0.3, "neighbours").load(flow, meta, model_file(run), [0, 0, 5])


@pytest.mark.parametrize("args, message", [
    (["--near", "{data}", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--near", "{data}", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--strength", "0.3"], "--strength and --anchor-classes go with --near FILE"),
    (["--anchor-classes", "other"], "--strength and --anchor-classes go with --near FILE"),
    (["--near", "{data}", "--anchor-classes", "neighbours"], "'neighbours' is not one of 'same', 'other', 'all'"),
    (["--near", "{other}"], "--near"),
])
def test_bad_near_options_are_named_and_write_nothing(imbalanced, tmp_path, args, message):
    data, run = imbalanced
    other = make_dataset(tmp_path / "other.h5", num_classes=2)  # classes differ from the model's
    out = tmp_path / "out.h5"
    args = [a.format(data=data, other=other) for a in args]
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--out", str(out), "--balance", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--near", "--select classifier", "--zero-background"])
def test_options_that_read_real_images_are_refused_for_a_dp_model(imbalanced, tmp_path, monkeypatch, option):
    """Anchors, a selecting classifier trained on the real file and a background threshold read off its pixels all
    make the released images depend on real data that the DP ledger did not account for."""
    from augflow import synthesize as module
    from augflow.synthesize import Anchors

    data, run = imbalanced
    monkeypatch.setattr(module.Ledger, "from_dict", staticmethod(lambda stored: type("L", (), {"dp": True})()))
    kwargs = {"--near": {"near": Anchors(data)},
              "--select classifier": {"selection": Selection("classifier", real=data, cache_dir=tmp_path)},
              "--select realism": {"selection": Selection("realism", real=data, cache_dir=tmp_path)},
              "--zero-background": {"background_from": data}}[option]
    with pytest.raises(ConfigError, match=f"guarantee would not cover the released images; drop {option} "):
        synthesize(run, tmp_path / "b.h5", {"small": 2}, progress=False, **kwargs)
    assert not list(tmp_path.glob("*.h5"))


def test_per_level_temperatures_from_the_cli_are_used_and_recorded(run, tmp_path):
    from augflow.models import load_model

    levels = len(load_model(run / "model.pt").latent_shapes)
    spec = ",".join(["1.2"] + ["0.3"] * (levels - 2) + ["0"])
    out = tmp_path / "levels.h5"
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--per-class", "2", "--seed", "3",
                                      "--temperature", spec, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_info(out).provenance["temperature"] == [float(t) for t in spec.split(",")]
    plain = synthesize(run, tmp_path / "plain.h5", {f"class{k}": 2 for k in range(4)}, temperature=1.2, seed=3,
                       progress=False).out
    assert not np.array_equal(read_images(out), read_images(plain))


@pytest.mark.parametrize("value, message", [
    ("warm", "'warm' is not a number or a comma-separated list"),
    ("1,0.5", "--temperature: per-level temperatures need one value per latent part"),
    ("{zeros}", "each per-level value must be in range [0, 2] and one above 0"),
    ("3", "--temperature must be in range (0, 2]"),
])
def test_bad_temperatures_are_named_and_write_nothing(run, tmp_path, value, message):
    from augflow.models import load_model

    value = value.format(zeros=",".join(["0"] * len(load_model(run / "model.pt").latent_shapes)))
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--per-class", "2", "--temperature", value,
                                      "--out", str(out)])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_medsymmflow_takes_one_temperature():
    from augflow.symmflow import SymmFlow, SymmFlowConfig
    from augflow.synthesize import _checked_temperature

    model = SymmFlow(SymmFlowConfig(image_shape=(1, 8, 8), num_classes=3, base_channels=8, channel_mult=(1, 2)))
    assert _checked_temperature(model, 0.9) == 0.9
    with pytest.raises(ConfigError, match="per-level temperatures .* are for MAGIC-Flow's latent parts; a symmflow"):
        _checked_temperature(model, (1.0, 0.5))


def test_zero_background_is_learned_from_the_real_file_and_given_to_the_samples(run, tmp_path):
    """A real file whose outer pixels are exactly 0 and whose tissue is >= 0.3: the threshold is half the darkest
    tissue's 0.1% quantile, and every sample below it becomes 0; without such a background nothing changes."""
    from augflow.data.store import write_dataset
    from augflow.synthesize import zero_background

    rng = np.random.default_rng(0)
    images = np.zeros((24, 1, 8, 8), dtype=np.float32)
    images[:, :, 2:6, 2:6] = rng.uniform(0.3, 1.0, size=(24, 1, 4, 4))
    real = write_dataset(tmp_path / "masked.h5", images, np.arange(24) % 4, [f"s{i // 2}" for i in range(24)],
                         np.zeros(24, dtype=np.int64), [f"class{k}" for k in range(4)])
    background = zero_background(real)
    tissue = images[images > 0]
    assert background["zero_fraction"] == pytest.approx(0.75)
    assert background["threshold"] == pytest.approx(np.quantile(tissue, 0.001) / 2)
    counts = {f"class{k}": 3 for k in range(4)}
    plain = read_images(synthesize(run, tmp_path / "plain.h5", counts, seed=2, progress=False).out)
    out = synthesize(run, tmp_path / "bg.h5", counts, seed=2, progress=False, background_from=real).out
    snapped = read_images(out)
    below = plain < background["threshold"]
    assert below.any() and (snapped[below] == 0).all() and np.array_equal(snapped[~below], plain[~below])
    assert read_info(out).provenance["background"] == background
    # Random images have no exact-zero background: no threshold, the samples stay as they are.
    assert zero_background(make_dataset(tmp_path / "noisy.h5", num_classes=4))["threshold"] is None


def test_zero_background_needs_the_real_file(run, tmp_path):
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--per-class", "2", "--zero-background",
                                      "--out", str(out)])
    assert result.exit_code != 0 and "--zero-background needs --real FILE" in result.output, result.output
    assert not out.exists()


def test_guidance_is_used_recorded_and_refused_for_a_model_without_a_null_label(run, tmp_path):
    guided = train(make_dataset(tmp_path / "d.h5", n_subjects=12, slices=2, num_classes=4), tmp_path / "guided",
                   load_recipe(None, [*TINY, "train.max_steps=2", "model.label_dropout=0.2"]), progress=False).run_dir
    plain = synthesize(guided, tmp_path / "g1.h5", {"class1": 4}, seed=1, progress=False).out
    strong = synthesize(guided, tmp_path / "g3.h5", {"class1": 4}, seed=1, progress=False, guidance=3.0).out
    assert read_info(strong).provenance["guidance"] == 3.0 and read_info(plain).provenance["guidance"] == 1.0
    shown = CliRunner().invoke(cli, ["info", str(guided)]).output
    assert "classifier-free guidance: trained with label dropout 0.2 (augflow synthesize --guidance W)" in shown
    assert "guidance" not in CliRunner().invoke(cli, ["info", str(run)]).output
    assert not np.array_equal(read_images(plain), read_images(strong))
    with pytest.raises(ConfigError, match="guidance 2 needs a model trained with label dropout"):
        synthesize(run, tmp_path / "x.h5", {"class1": 2}, progress=False, guidance=2.0)
    with pytest.raises(ConfigError, match=r"--guidance must be in range \[0, 10\]"):
        synthesize(guided, tmp_path / "x.h5", {"class1": 2}, progress=False, guidance=-1.0)
    assert not (tmp_path / "x.h5").exists()
