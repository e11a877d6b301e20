"""augflow train: exact resume, run-folder contents, and refusals."""

import json

import pytest
import torch
from conftest import TINY, make_dataset

from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.train.loop import train
from augflow.train.recipe import load_recipe


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    full = train(data, tmp_path / "full", load_recipe(None, TINY), progress=False)
    assert full.steps == 8  # 27 training images / batch 8 = 4 steps per epoch, 2 epochs
    killed = train(data, tmp_path / "part", load_recipe(None, [*TINY, "train.max_steps=5"]), progress=False)
    assert killed.steps == 5
    resumed = train(data, tmp_path / "part", load_recipe(None, TINY), resume=True, progress=False)
    assert resumed.steps == 8
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_run_folder_and_model_metadata(tmp_path):
    data = make_dataset(tmp_path / "d.h5")
    result = train(data, tmp_path / "run", load_recipe(None, TINY), seed=3, command="augflow train ...",
                   progress=False)
    run = tmp_path / "run"
    assert (run / "command.txt").read_text().strip() == "augflow train ..."
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in records) == 2  # one validation per epoch
    assert result.best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r)
    model, meta = load_model(result.model_path, with_meta=True)
    assert meta["class_names"] == ["class0", "class1", "class2"] and sum(meta["class_counts"]) == 27
    assert meta["seed"] == 3 and meta["fingerprint"]["train_rows"] == 27
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "ema", "rng", "step", "recipe", "fingerprint"} <= set(ckpt)
    # Training lowers the loss from its start on this data.
    assert records[-1]["loss"] < records[0]["loss"]


def test_refusals(tmp_path):
    data = make_dataset(tmp_path / "d.h5")
    train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.max_steps=1"]), progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(data, tmp_path / "run", load_recipe(None, TINY), progress=False)
    with pytest.raises(ConfigError, match="recipe or seed differ"):
        train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.lr=0.1"]), resume=True, progress=False)
    other = make_dataset(tmp_path / "other.h5", seed=1)
    with pytest.raises(ConfigError, match="data differ"):
        train(other, tmp_path / "run", load_recipe(None, TINY), resume=True, progress=False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(data, tmp_path / "none", load_recipe(None, TINY), resume=True, progress=False)


def test_user_brain_mask_is_used(tmp_path):
    import numpy as np

    data = make_dataset(tmp_path / "d.h5")
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:6, 1:7] = 1
    np.save(tmp_path / "mask.npy", mask)
    result = train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.max_steps=1",
                                                               f"train.app_mask='{tmp_path / 'mask.npy'}'"]),
                   progress=False)
    model = load_model(result.model_path)
    assert torch.equal(model.app_mask, torch.from_numpy(mask))


def test_balanced_sampling_and_schedule():
    import numpy as np

    from augflow.train.optim import lr_factor as _lr_factor
    from augflow.train.session import epoch_order as _epoch_order

    labels = np.array([0] * 90 + [1] * 10)
    plain = _epoch_order(100, labels, 2, balanced=False, seed=0, epoch=0)
    assert sorted(plain) == list(range(100))
    drawn = np.concatenate([_epoch_order(100, labels, 2, balanced=True, seed=0, epoch=e) for e in range(20)])
    assert abs(np.mean(labels[drawn]) - 0.5) < 0.05  # minority class drawn as often as the majority
    assert not np.array_equal(_epoch_order(100, labels, 2, True, 0, 0), _epoch_order(100, labels, 2, True, 0, 1))
    # Warm-up from 1% to 100% over 10 steps, then cosine down to the floor.
    assert _lr_factor(0, 100, 10, 0.01, 0.01) == 0.01 and _lr_factor(10, 100, 10, 0.01, 0.01) == 1.0
    assert _lr_factor(100, 100, 10, 0.01, 0.01) == 0.01 and 0.01 < _lr_factor(55, 100, 10, 0.01, 0.01) < 1


def test_ema_warmup_forgets_the_initial_weights():
    from augflow.train.optim import ema_with_warmup

    update = ema_with_warmup(0.999)
    average, n = torch.zeros(3), 0
    for _ in range(2000):
        average = update(average, torch.ones(3), torch.tensor(n))
        n += 1
    # A plain 0.999 average would still be 0.999**2000 = 13% zeros; the warmed-up one keeps under 1%.
    assert torch.all(average > 0.99)
    assert torch.equal(update(torch.tensor([2, 5]), torch.tensor([2, 5]), torch.tensor(7)), torch.tensor([2, 5]))


def test_balanced_sampling_trains(tmp_path):
    # Balanced epochs draw rows with replacement, so a batch can hold one row twice.
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    result = train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.balanced_sampling=true"]), progress=False)
    assert result.steps == 8 and result.best_val_loss is not None
