"""MedSymmFlow classification: a separable toy is learned, uncertainty flags errors, metrics keep their keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from augflow.classify import classify_file
from augflow.classify.calibration import fit_calibration
from augflow.classify.metrics import Predictions, classification_metrics, error_auroc, expected_calibration_error
from augflow.classify.readout import ReadoutScorer, classify_images
from augflow.cli import cli
from augflow.data.store import write_dataset
from augflow.errors import ConfigError
from augflow.symmflow import SymmFlow, SymmFlowConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness_toy(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0: dark images (mean brightness in [0.10, 0.55]); class 1: bright ([0.45, 0.90]); 16 px.

    Images with brightness in the overlap [0.45, 0.55] are ambiguous, so a good classifier errs on some of them.
    """
    y = torch.arange(n) % 2
    u = torch.rand(n, generator=generator)
    b = torch.where(y == 0, 0.10 + 0.45 * u, 0.45 + 0.45 * u)
    x = (b[:, None, None, None] + 0.05 * torch.randn(n, 1, 16, 16, generator=generator)).clamp(0, 1)
    return x, y, b


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny model trained for 150 steps (about 5 s on a quiet core)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SymmFlow(SymmFlowConfig(image_shape=(1, 16, 16), num_classes=2, base_channels=8, channel_mult=(1, 2),
                                    attention_resolutions=(), num_heads=1, steps=10))
    x, y, _ = brightness_toy(512, g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = model.training_loss(x[idx], y[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), g


def test_separable_classes_are_learned_and_uncertainty_flags_errors(trained):
    model, g = trained
    x, y, b = brightness_toy(200, g)
    result = classify_images(model, x, passes=1, batch_size=100)
    correct = result.predicted == y.numpy()
    clear = ((b < 0.4) | (b > 0.6)).numpy()  # trivially separable images
    assert correct[clear].mean() >= 0.9
    assert not correct.all()  # the ambiguous band makes errors
    # The paper's uncertainty (distance to the predicted colour) ranks wrong predictions above right ones.
    assert error_auroc(~correct, result.uncertainty) > 0.7
    assert result.scores.shape == (200, 2) and np.array_equal(result.scores.argmax(1), result.predicted)


def test_multi_pass_spread_and_file_metrics(trained, tmp_path):
    model, g = trained
    x, y, _ = brightness_toy(64, g)
    result = classify_images(model, x, passes=3, batch_size=64, rank_by="spread")
    assert result.spread.shape == (64,) and np.all(result.spread >= 0) and np.array_equal(result.uncertainty,
                                                                                           result.spread)
    with pytest.raises(ConfigError, match="passes >= 2"):
        classify_images(model, x, passes=1, rank_by="spread")

    names = ["dark", "bright"]
    data = write_dataset(tmp_path / "test.h5", x.numpy(), y.numpy(), [f"s{i}" for i in range(64)],
                         np.zeros(64, dtype=np.int64), names, provenance={"test": True})
    model.save(tmp_path / "model.pt", meta={"class_names": names, "class_counts": [256, 256]})
    out = classify_file(tmp_path / "model.pt", data, calibrate_on=data, batch_size=64, device="cpu")
    reference = classification_metrics(y.numpy(), Predictions(np.zeros((64, 2)), np.full((64, 2), 0.5),
                                                              np.zeros(64, dtype=np.int64), np.zeros(64)), names)
    assert set(reference) <= set(out["metrics"])  # the MAGIC-Flow classifier's keys, plus a few
    metrics = out["metrics"]
    assert metrics["accuracy"] > 0.75 and metrics["auc_macro"] > 0.8 and metrics["temperature"] > 0
    curve = metrics["selective_prediction"]
    assert len(curve["accuracy"]) == 20 and curve["accuracy"][-1] >= curve["accuracy"][0]
    assert out["predictions"].probs.shape == (64, 2)


def test_the_calibration_chooses_the_posterior_shape_of_distances():
    """Labels drawn from p_k ∝ d_k^-2 (the shape of power 0 at T = 0.5): the validation NLL picks power 0 over the
    distances as they are (power 1), and the posterior it gives is better calibrated on fresh draws; the nearest
    colour stays the argmax."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        d = rng.uniform(0.02, 1.0, size=(n, 4))
        p = d ** -2.0 / (d ** -2.0).sum(1, keepdims=True)
        return -d, (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1)

    (val_scores, val_labels), (test_scores, test_labels) = draw(3000), draw(3000)
    prior = np.zeros(4)
    fitted = fit_calibration(val_scores, val_labels, prior, biases=False, distance_powers=ReadoutScorer.distance_powers)
    plain = fit_calibration(val_scores, val_labels, prior, biases=False, distance_powers=(1.0,))
    assert fitted.distance_power == 0.0 and fitted.temperature == pytest.approx(0.5, rel=0.1)
    assert plain.temperature == pytest.approx(fit_calibration(val_scores, val_labels, prior, biases=False).temperature)
    shaped, linear = fitted.predict(test_scores, prior), plain.predict(test_scores, prior)
    assert expected_calibration_error(shaped.probs, test_labels) < 0.03 < expected_calibration_error(linear.probs,
                                                                                                       test_labels)
    assert np.array_equal(shaped.predicted, test_scores.argmax(1)) and np.array_equal(shaped.log_likelihoods,
                                                                                       test_scores)


def test_cli_passes_are_stored_with_the_calibration(trained, tmp_path):
    """``augflow classify --passes N`` averages N read-outs; the temperature holds for its passes only."""
    model, g = trained
    x, y, _ = brightness_toy(64, g)
    data = write_dataset(tmp_path / "test.h5", x.numpy(), y.numpy(), [f"s{i}" for i in range(64)],
                         np.zeros(64, dtype=np.int64), ["dark", "bright"], provenance={"test": True})
    model.save(tmp_path / "model.pt", meta={"class_names": ["dark", "bright"], "class_counts": [256, 256]})

    def run(*options: str):
        return CliRunner().invoke(cli, ["classify", "--model", str(tmp_path / "model.pt"), "--data", str(data),
                                        "--json", *options])

    fitted = run("--calibrate-on", str(data), "--passes", "3", "--rank-by", "spread")
    assert fitted.exit_code == 0, fitted.output
    metrics = json.loads(fitted.output)
    assert metrics["passes"] == 3 and metrics["selective_prediction_by"] == "spread" and metrics["accuracy"] > 0.75
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["passes"] == 3 and record["distance_power"] in ReadoutScorer.distance_powers
    assert metrics["distance_power"] == record["distance_power"]
    later = json.loads(run().output)  # the stored calibration's passes, and its temperature
    assert later["passes"] == 3 and later["temperature"] == metrics["temperature"]
    assert later["calibration_source"] == "stored with the model"
    refused = run("--passes", "1")
    assert refused.exit_code == 1 and "fitted with --passes 3" in refused.output
    refused = run("--rank-by", "spread", "--calibrate-on", str(data))  # one pass has no spread
    assert refused.exit_code == 1 and "passes >= 2" in refused.output
    # the read-out's integration steps: the model's by default (10 here), another number needs its own calibration
    assert metrics["steps"] == record["steps"] == later["steps"] == 10
    refused = run("--steps", "4")
    assert refused.exit_code == 1 and "fitted with --steps 10" in refused.output
    fewer = run("--calibrate-on", str(data), "--steps", "4")
    assert fewer.exit_code == 0, fewer.output
    assert json.loads(fewer.output)["steps"] == 4 and json.loads(run().output)["steps"] == 4
    assert json.loads(fewer.output)["accuracy"] > 0.75  # the class is read out in the first steps
