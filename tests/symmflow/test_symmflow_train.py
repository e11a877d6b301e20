"""MedSymmFlow behind the same commands: train through the loop, resume exactly, synthesize, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from augflow.cli import cli
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.symmflow import SymmFlow
from augflow.synthesize import Anchors, synthesize
from augflow.train.loop import train
from augflow.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.base_channels=8", "model.channel_mult=[1, 2]", "model.attention_resolutions=[2]",
        "model.num_heads=2", "model.steps=2", "train.epochs=2", "train.batch_size=8", "train.log_every=1",
        "train.checkpoint_every=3", "train.val_fraction=0.25"]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_recipe_trains_through_the_loop_and_synthesizes(tmp_path):
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    recipe = load_recipe("quick-symmflow", TINY)
    assert recipe.family == "symmflow" and recipe.train.ema_decay > 0
    result = train(data, tmp_path / "run", recipe, seed=1, progress=False)
    assert result.steps == 8 and result.loss_name == "flow-matching loss" and result.best_val_loss is not None
    model, meta = load_model(result.model_path, with_meta=True)
    assert isinstance(model, SymmFlow) and meta["class_names"] == ["class0", "class1", "class2"]
    assert meta["temperature"] == 1.0
    out = synthesize(tmp_path / "run", tmp_path / "s.h5", {"class1": 3, "class2": 2}, seed=0, device="cpu",
                     progress=False)
    info = read_info(out.out)
    assert info.source == "synthetic" and info.labels.tolist() == [1, 1, 1, 2, 2]
    assert info.image_shape == (1, 8, 8)
    # Anchored to the real images (SDEdit): a small strength stays near its anchors of the same class.
    near = synthesize(tmp_path / "run", tmp_path / "near.h5", {"class1": 3}, near=Anchors(data, 0.05),
                      progress=False).out
    real, labels = read_images(data), read_info(data).labels
    distance = np.abs(read_images(near)[:, None] - real[None]).reshape(3, len(real), -1).mean(-1)
    assert (labels[distance.argmin(1)] == 1).all() and (distance.min(1) < 0.05).all()
    assert read_info(near).provenance["near"]["strength"] == 0.05


def test_resume_continues_exactly(tmp_path):
    # t and the noise of the loss come from torch's global RNG, which the loop seeds per step.
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    full = train(data, tmp_path / "full", load_recipe("quick-symmflow", TINY), progress=False)
    train(data, tmp_path / "part", load_recipe("quick-symmflow", [*TINY, "train.max_steps=5"]), progress=False)
    resumed = train(data, tmp_path / "part", load_recipe("quick-symmflow", TINY), resume=True, progress=False)
    assert resumed.steps == full.steps == 8
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_compiled_training_draws_the_same_noise(tmp_path):
    """``train.compile`` keeps eager's random numbers (the flow-matching times and noise): the same losses."""
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    train(data, tmp_path / "eager", load_recipe("quick-symmflow", TINY), progress=False)
    train(data, tmp_path / "compiled", load_recipe("quick-symmflow", [*TINY, "train.compile=true"]), progress=False)
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)


def test_hybrid_objective_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d.h5")
    with pytest.raises(ConfigError, match="ce_weight must be 0"):
        train(data, tmp_path / "run", load_recipe("quick-symmflow", [*TINY, "train.ce_weight=0.1"]), progress=False)


def test_cli_train_and_synthesize(tmp_path):
    data = make_dataset(tmp_path / "d.h5", num_classes=2)
    runner = CliRunner()
    sets = [arg for s in [*TINY, "train.max_steps=2"] for arg in ("--set", s)]
    result = runner.invoke(cli, ["train", "--data", str(data), "--recipe", "quick-symmflow", "--out",
                                 str(tmp_path / "run"), "--threads", "1", *sets])
    assert result.exit_code == 0, result.output
    assert "flow-matching loss" in result.output
    result = runner.invoke(cli, ["synthesize", "--model", str(tmp_path / "run"), "--balance", "--target-count", "20",
                                 "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert {"accuracy", "balanced_accuracy", "auc_macro", "selective_prediction", "confusion_matrix"} <= set(metrics)
    assert np.sum(metrics["confusion_matrix"]) == 36
    result = runner.invoke(cli, ["classify", "--model", str(tmp_path / "run"), "--data", str(data), "--out",
                                 str(tmp_path / "pred.csv")])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "pred.csv").read_text().splitlines()[0].split(",")
    assert "minus_distance_to_class0" in header and not any(h.startswith("logp_x_given") for h in header)
