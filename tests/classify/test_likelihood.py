"""The likelihood classifier: batched K-class evaluation, calibration, selective prediction, CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY
from sklearn.metrics import balanced_accuracy_score

from augflow.classify.calibration import calibrate, fit_calibration, stored_calibration
from augflow.classify.likelihood import class_log_likelihoods, log_prior
from augflow.classify.metrics import (
    Scores,
    calibration_error_floor,
    expected_calibration_error,
    posterior,
    selective_prediction,
)
from augflow.cli import cli
from augflow.data.splits import write_subset
from augflow.data.store import read_info, write_dataset
from augflow.errors import ConfigError, DataError
from augflow.explain import explain_file
from augflow.flows import MagicFlow, MagicFlowConfig
from augflow.models import load_model
from augflow.train.loop import train
from augflow.train.recipe import load_recipe


@pytest.mark.parametrize("prior", [{}, {"prior": "class_gaussian"},
                                   {"prior": "class_gaussian", "conditional_couplings": False},
                                   {"prior": "class_diagonal", "conditional_couplings": False}],
                         ids=["standard", "class-gaussian", "class-gaussian-unconditional",
                              "class-diagonal-unconditional"])
def test_batched_classes_equal_a_per_class_loop(prior):
    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 8, 8), num_classes=3, full_res_steps=("application",),
                             channel_steps=1, checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4, **prior)
    model = MagicFlow(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave the identity initialisation so labels matter
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    batched = class_log_likelihoods(model, x, 3)
    loop = torch.stack([model.log_prob(x, torch.full((5,), k)) for k in range(3)], dim=1)
    torch.testing.assert_close(batched, loop.detach())
    assert batched.std(dim=1).min() > 0  # the label changes the likelihood

    # The hybrid objective: bits/dim of the true class plus lambda times the uniform-prior posterior's
    # cross-entropy, from the same K-class pass.
    y = torch.tensor([0, 2, 1, 1, 0])
    hybrid = model.training_loss(x, y, ce_weight=0.5)
    ce = torch.nn.functional.cross_entropy(loop, y, reduction="none")
    torch.testing.assert_close(hybrid, model.bits_per_dim(x, y) + 0.5 * ce)
    # With a class prior (train.ce_prior = "train"): the cross-entropy of softmax(log p(x | k) + log pi_k).
    log_pi = torch.log(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    adjusted = torch.nn.functional.cross_entropy(loop + log_pi, y, reduction="none")
    torch.testing.assert_close(model.training_loss(x, y, ce_weight=0.5, log_prior=log_pi),
                               model.bits_per_dim(x, y) + 0.5 * adjusted)
    assert not torch.allclose(adjusted, ce)
    # Label smoothing (train.label_smoothing): the target is (1 - eps) on the true class plus eps / K on every class.
    log_post = torch.log_softmax(loop, dim=1)
    smoothed = -(0.9 * log_post.gather(1, y[:, None])[:, 0] + 0.1 * log_post.mean(dim=1))
    torch.testing.assert_close(model.training_loss(x, y, ce_weight=0.5, label_smoothing=0.1),
                               model.bits_per_dim(x, y) + 0.5 * smoothed)
    torch.testing.assert_close(model.training_loss(x, y), model.bits_per_dim(x, y))
    with pytest.raises(ConfigError, match="the model scores 3 classes, but 2 are expected"):
        class_log_likelihoods(model, x, 2)


def test_selective_prediction_on_a_hand_made_example():
    correct = np.array([True] * 6 + [False] * 4)
    uncertainty = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.8, 0.95, 0.7])
    curve = selective_prediction(correct, uncertainty)
    assert curve["accuracy"][0] == 0.6  # nothing rejected
    assert curve["accuracy"][curve["rejected"].index(0.4)] == 1.0  # the 4 errors are the 4 most uncertain
    assert curve["accuracy"] == sorted(curve["accuracy"])  # monotone when uncertainty ranks errors first
    assert curve["area"] == pytest.approx(np.mean(curve["accuracy"]))
    flipped = selective_prediction(correct, -uncertainty)
    assert flipped["area"] < curve["area"]


def test_expected_calibration_error_on_a_hand_made_example():
    # Two bins: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, both right): |0.5 - 0.9| / 2 + |1 - 0.6| / 2.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert expected_calibration_error(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.4)


def test_calibration_error_floor_is_the_ece_of_labels_drawn_from_the_probabilities():
    # Labels drawn from the probabilities are perfectly calibrated: their ECE is the floor's sampling noise, which
    # shrinks with the number of images; labels of an over-confident model sit far above it.
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(4, 0.7), size=300)
    floor, spread = calibration_error_floor(probs)
    calibrated = [expected_calibration_error(probs, (rng.random((300, 1)) > np.cumsum(probs, 1)).sum(1))
                  for _ in range(100)]
    assert abs(np.mean(calibrated) - floor) < 0.01 and 0.005 < spread < 0.03
    assert 0.03 < floor < 0.12
    big = rng.dirichlet(np.full(4, 0.7), size=20000)
    assert calibration_error_floor(big, draws=20)[0] < 0.015
    sharp = posterior(np.log(probs) * 3, np.zeros(4))  # the same decisions, over-confident
    labels = (rng.random((300, 1)) > np.cumsum(probs, 1)).sum(1)
    assert expected_calibration_error(sharp, labels) > floor + 5 * spread


def test_calibration():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    # Log-likelihoods 50x overconfident: the right class wins 80% of the time.
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), labels] += 1.5
    log_lik = 50 * logits
    pi = log_prior([1, 1, 1])
    raw = posterior(log_lik, pi)
    temperature = fit_calibration(log_lik, labels, pi, biases=False).temperature
    assert 30 < temperature < 80
    assert expected_calibration_error(posterior(log_lik, pi, temperature), labels) < 0.03
    assert expected_calibration_error(raw, labels) > 0.1
    assert np.allclose(log_prior([3, 1], "uniform"), np.log([0.5, 0.5]))


def test_class_offsets_recover_a_constant_log_likelihood_offset():
    # The likelihoods rank the images well, but class 2's normaliser is 60 nats too high: it wins most argmaxes.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    scores = rng.normal(size=(3000, 3))
    scores[np.arange(3000), labels] += 2.0
    scores = 20 * scores + np.array([0.0, -5.0, 60.0])
    pi = log_prior([1, 1, 1])
    assert balanced_accuracy_score(labels, posterior(scores, pi).argmax(1)) < 0.5
    fitted = fit_calibration(scores, labels, pi)
    np.testing.assert_allclose(fitted.biases, [0.0, 5.0, -60.0], atol=2.0)
    assert balanced_accuracy_score(labels, fitted.predict(scores, pi).predicted) > 0.8


def test_offsets_set_the_decisions_and_the_probabilities_stay_the_calibrated_bayes_posterior():
    # Imbalanced classes (800 / 150 / 50), likelihoods that rank the images: the offsets move decisions to the
    # minority classes (balanced accuracy up); the probabilities are the temperature-only posterior, which is the
    # calibrated one for images with the training mix (offsets in the probabilities would over-state the minority).
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [800, 150, 50])
    scores = 5 * rng.normal(size=(1000, 3))
    scores[np.arange(1000), labels] += 6.0
    pi = log_prior([800, 150, 50])
    with_offsets, alone = fit_calibration(scores, labels, pi), fit_calibration(scores, labels, pi, biases=False)
    preds = with_offsets.predict(scores, pi)
    np.testing.assert_allclose(preds.probs, alone.predict(scores, pi).probs)
    assert with_offsets.temperature == alone.temperature
    bayes = preds.probs.argmax(1)
    assert balanced_accuracy_score(labels, preds.predicted) > balanced_accuracy_score(labels, bayes) + 0.03
    shifted = posterior(scores, pi + np.asarray(with_offsets.biases), with_offsets.temperature)
    assert expected_calibration_error(preds.probs, labels) < expected_calibration_error(shifted, labels)


def test_temperature_is_fitted_by_the_ordinary_likelihood_of_the_bayes_posterior():
    # Imbalanced classes (900 / 100) whose scores are 3x over-confident on the minority class only: the
    # class-balanced loss and the ordinary one want different temperatures. The offsets follow the balanced loss,
    # the temperature the ordinary one (the one the expected calibration error measures).
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], [900, 100])
    logits = rng.normal(size=(1000, 2))
    logits[np.arange(1000), labels] += 1.0
    scores = 10 * logits * np.where(labels == 1, 3.0, 1.0)[:, None]
    pi = log_prior([1, 1])
    fitted = fit_calibration(scores, labels, pi)

    def nll(t, weight):
        log_p = np.log(posterior(scores, pi, t)[np.arange(1000), labels])
        return -np.sum(weight * log_p) / weight.sum()

    grid = np.exp(np.linspace(np.log(1), np.log(100), 2000))
    ordinary = grid[np.argmin([nll(t, np.ones(1000)) for t in grid])]
    balanced = grid[np.argmin([nll(t, np.where(labels == 1, 9.0, 1.0)) for t in grid])]
    assert abs(np.log(balanced / ordinary)) > 0.1  # the two losses disagree on this toy
    assert fitted.temperature == pytest.approx(ordinary, rel=0.01)
    alone = fit_calibration(scores, labels, pi, biases=False)
    assert alone.biases is None and alone.temperature > 0


def test_stored_offsets_are_read_back_by_class_name_not_by_position(tmp_path):
    # JSON sorts the record's keys; class names out of alphabetical order must still get their own offsets.
    names = ["zeta", "alpha", "mid"]
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    scores = 20 * rng.normal(size=(120, 3)) + np.array([0.0, 30.0, -40.0])
    scores[np.arange(120), labels] += 40.0
    path = write_dataset(tmp_path / "val.h5", np.zeros((120, 1, 8, 8), np.float32), labels,
                         [f"s{i}" for i in range(120)], np.zeros(120), names)

    class Fixed:
        prior = "train"

        def score(self, _):
            return Scores(scores, log_prior([1, 1, 1]))

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").touch()
    record = calibrate(tmp_path / "run", Fixed(), path, names)
    fitted = fit_calibration(scores, labels, log_prior([1, 1, 1]))
    assert list(record["class_biases"].values()) == list(fitted.biases) and fitted.biases[2] > 20
    assert stored_calibration(tmp_path / "run", "train", names).biases == fitted.biases
    assert stored_calibration(tmp_path / "run", "uniform", names) is None
    with pytest.raises(DataError, match="differ from the model's"):
        stored_calibration(tmp_path / "run", "train", ["zeta", "alpha", "other"])


def test_offsets_fitted_on_other_files_and_the_temperature_on_the_calibration_file(tmp_path):
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    files, scores = [], {}
    for name, n in (("val", 30), ("train", 90), ("more", 60)):
        labels = np.arange(n) % 3
        values = 15 * rng.normal(size=(n, 3)) + np.array([0.0, 25.0, -30.0])
        values[np.arange(n), labels] += 30.0
        path = write_dataset(tmp_path / f"{name}.h5", np.zeros((n, 1, 8, 8), np.float32), labels,
                             [f"{name}{i}" for i in range(n)], np.zeros(n), names)
        files.append(path)
        scores[str(path)] = (values, labels)

    class ByFile:
        prior = "train"
        shift_radius = 1

        def score(self, path):
            return Scores(scores[str(path)][0], log_prior([1, 1, 1]))

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").touch()
    record = calibrate(tmp_path / "run", ByFile(), files[0], names, offsets_on=files[1:])
    pooled = fit_calibration(np.r_[scores[str(files[1])][0], scores[str(files[2])][0]],
                             np.r_[scores[str(files[1])][1], scores[str(files[2])][1]], log_prior([1, 1, 1]))
    alone = fit_calibration(*scores[str(files[0])], log_prior([1, 1, 1]), biases=False)
    assert list(record["class_biases"].values()) == list(pooled.biases)
    assert record["calibration_temperature"] == alone.temperature
    assert record["offsets_fitted_on"] == [str(f.resolve()) for f in files[1:]] and record["shift_radius"] == 1
    stored = stored_calibration(tmp_path / "run", "train", names)
    assert stored.shift_radius == 1 and stored.biases == pooled.biases


def _shift_by_hand(image, dy, dx):
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = image[..., i - dy, j - dx]
    return out


def test_shift_averaged_scores_are_the_mean_over_shifted_copies():
    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 8, 8), num_classes=3, full_res_steps=("application",),
                             channel_steps=1, checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4)
    model = MagicFlow(config).double().eval()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(class_log_likelihoods(model, x, 3, 0), model.class_log_probs(x))
    by_hand = np.mean([model.class_log_probs(torch.from_numpy(_shift_by_hand(x.numpy(), dy, dx))).detach().numpy()
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    np.testing.assert_allclose(class_log_likelihoods(model, x, 3, 1).numpy(), by_hand, rtol=1e-12)
    for bad in (-1, 2, True, 0.5):  # 8 px images allow radius 0 or 1
        with pytest.raises(ConfigError, match="--shift-radius must be a whole number of pixels from 0 to 1"):
            class_log_likelihoods(model, x, 3, bad)


def _noise_dataset(path, n_per_class, seed):
    """Two classes that differ only in noise level around the same smooth image."""
    rng = np.random.default_rng(seed)
    base = np.outer(np.hanning(8), np.hanning(8)) * 0.6 + 0.2
    labels = np.repeat([0, 1], n_per_class)
    sigma = np.where(labels == 0, 0.01, 0.08)[:, None, None, None]
    images = np.clip(base + sigma * rng.standard_normal((2 * n_per_class, 1, 8, 8)), 0, 1).astype(np.float32)
    subjects = [f"s{seed}-{i // 2}" for i in range(2 * n_per_class)]
    return write_dataset(path, images, labels, subjects, np.zeros(2 * n_per_class), ["quiet", "noisy"])


def test_noise_level_toy_is_classified_and_cli_reports_metrics(tmp_path):
    train_file = _noise_dataset(tmp_path / "train.h5", 48, seed=0)
    test_file = _noise_dataset(tmp_path / "test.h5", 20, seed=1)
    val_file = _noise_dataset(tmp_path / "val.h5", 10, seed=2)
    overrides = [*TINY, "train.epochs=4", "train.ema_decay=0", "train.lr=3e-3", "augment.enabled=false"]
    train(train_file, tmp_path / "run", load_recipe(None, overrides), val=val_file, progress=False)
    result = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                      "--calibrate-on", str(val_file), "--out", str(tmp_path / "p.csv"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert {"accuracy", "balanced_accuracy", "auc_macro", "precision_macro", "recall_macro", "f1_macro",
            "confusion_matrix", "selective_prediction", "per_class_recall", "ece", "temperature"} <= set(metrics)
    assert metrics["accuracy"] > 0.9 and metrics["auc_macro"] > 0.95
    assert np.sum(metrics["confusion_matrix"]) == 40
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 41 and lines[0].startswith("row,label,predicted,entropy,p_quiet,p_noisy")

    # The fitted temperature is stored beside the model and used when --calibrate-on is not given.
    again = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file), "--json"])
    stored = json.loads(again.output)
    assert stored["temperature"] == metrics["temperature"] and stored["calibration_source"] == "stored with the model"
    assert stored["class_biases"] == metrics["class_biases"] and set(metrics["class_biases"]) == {"quiet", "noisy"}
    alone = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                     "--calibrate-on", str(val_file), "--no-class-offsets", "--json"])
    assert json.loads(alone.output)["class_biases"] is None
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["class_biases"] is None
    refused = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--no-class-offsets"])
    assert refused.exit_code == 2 and "--calibrate-on" in refused.output
    refused = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--offsets-on", str(train_file)])
    assert refused.exit_code == 2 and "--calibrate-on" in refused.output

    # Shift-averaged scores, offsets on the training and validation files: the radius is stored with the
    # calibration and used by later calls; another radius without a new calibration is refused.
    shifted = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--calibrate-on", str(val_file), "--offsets-on", str(train_file),
                                       "--offsets-on", str(val_file), "--shift-radius", "1", "--json"])
    assert shifted.exit_code == 0, shifted.output
    assert json.loads(shifted.output)["shift_radius"] == 1 and json.loads(shifted.output)["accuracy"] > 0.9
    record = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert record["shift_radius"] == 1 and len(record["offsets_fitted_on"]) == 2
    later = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file), "--json"])
    assert json.loads(later.output)["shift_radius"] == 1
    refused = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--shift-radius", "0"])
    assert refused.exit_code == 1 and "fitted with --shift-radius 1" in refused.output
    refused = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--passes", "2"])
    assert refused.exit_code == 1 and "MedSymmFlow's read-out" in refused.output
    refused = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--steps", "5"])
    assert refused.exit_code == 1 and "MedSymmFlow's read-out" in refused.output

    # A file without images of a class: its recall is null in strict JSON (no NaN), and the class is named.
    noisy = write_subset(test_file, np.flatnonzero(read_info(test_file).labels == 1), tmp_path / "noisy.h5")
    one = CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(noisy), "--json"])
    strict = json.loads(one.output, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert strict["per_class_recall"]["quiet"] is None and strict["classes_without_images"] == ["quiet"]
    assert strict["recall_macro"] == strict["balanced_accuracy"] == strict["per_class_recall"]["noisy"]

    # Attribution maps: the contrast map sums to the log-likelihood ratio of the two classes.
    explanation = explain_file(tmp_path / "run", test_file, [0, 25], contrast="quiet")
    ratio = explanation.maps.sum(axis=(1, 2, 3))
    log_lik = class_log_likelihoods(load_model(tmp_path / "run" / "model.pt"),
                                    torch.from_numpy(explanation.images), 2).double().numpy()
    expected = log_lik[np.arange(2), explanation.target] - log_lik[:, 0]
    np.testing.assert_allclose(ratio, expected, rtol=1e-4, atol=1e-3)
    assert list(explanation.predicted) == [0, 1] and explanation.maps.shape == (2, 1, 8, 8)
    figure = tmp_path / "maps.png"
    shown = CliRunner().invoke(cli, ["explain", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                     "--index", "0", "--index", "25", "--contrast", "quiet", "--out", str(figure)])
    assert shown.exit_code == 0, shown.output
    assert figure.stat().st_size > 10_000 and "row 25: label noisy, predicted noisy" in shown.output
    refused = CliRunner().invoke(cli, ["explain", "--model", str(tmp_path / "run"), "--data", str(test_file),
                                       "--index", "40", "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 1 and "--index 40 is outside" in refused.output and "rows 0..39" in refused.output
    assert not (tmp_path / "x.png").exists()


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from augflow.classify.metrics import classification_metrics, predict

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    log_lik = rng.normal(size=(300, 3))
    log_lik[np.arange(300), labels] += 1.0
    preds = predict(log_lik, log_prior([1, 1, 1]))
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["auc_macro"] == pytest.approx(roc_auc_score(labels, preds.probs, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(preds.predicted == labels))
    assert np.trace(m["confusion_matrix"]) == np.sum(preds.predicted == labels)
    # Other scores and uncertainties (MedSymmFlow's distances) replace the posterior and its entropy.
    scores, uncertainty = rng.normal(size=(300, 3)), rng.random(300)
    other = classification_metrics(labels, preds, ["a", "b", "c"], scores=scores, uncertainty=uncertainty)
    assert other["auc_macro"] == pytest.approx(np.mean([roc_auc_score(labels == c, scores[:, c]) for c in range(3)]))
    assert other["auc_macro"] != pytest.approx(m["auc_macro"])
    assert other["selective_prediction"] == selective_prediction(preds.predicted == labels, uncertainty)
    assert other["accuracy"] == m["accuracy"]


def test_a_class_without_images_has_no_recall_and_leaves_the_macro_averages():
    import warnings

    from augflow.classify.metrics import classification_metrics, predict

    labels = np.array([0, 0, 1, 1, 1])  # no image of "c"; one "a" image is predicted as "c"
    log_lik = np.full((5, 3), -5.0)
    log_lik[np.arange(5), [0, 2, 1, 1, 0]] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the absent class is named in the metrics, not warned about
        m = classification_metrics(labels, predict(log_lik, log_prior([1, 1, 1])), ["a", "b", "c"])
    assert m["classes_without_images"] == ["c"] and np.isnan(m["per_class_recall"]["c"])
    assert (m["per_class_recall"]["a"], m["per_class_recall"]["b"]) == (0.5, pytest.approx(2 / 3))
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"]) == pytest.approx((0.5 + 2 / 3) / 2)


def test_offsets_are_refused_when_their_files_lack_a_class(tmp_path):
    names = ["a", "b", "c"]
    val = write_dataset(tmp_path / "val.h5", np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 0, 1]),
                        ["s0", "s1", "s2", "s3"], np.zeros(4), names)

    class Fixed:
        prior = "train"

        def score(self, path):
            return Scores(np.zeros((4, 3)), log_prior([1, 1, 1]))

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").touch()
    with pytest.raises(DataError, match=r"no images of class\(es\) \['c'\].*--offsets-on.*--no-class-offsets"):
        calibrate(tmp_path / "run", Fixed(), val, names)
    assert stored_calibration(tmp_path / "run", "train", names) is None
    record = calibrate(tmp_path / "run", Fixed(), val, names, biases=False)  # the temperature alone is fine
    assert record["class_biases"] is None
