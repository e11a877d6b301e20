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
    # A kill after step 5's checkpoint: steps 6 and 7 logged, the last line cut mid-write.
    log = tmp_path / "part" / "metrics.jsonl"
    elapsed = json.loads(log.read_text().splitlines()[-1])["elapsed_s"]
    log.write_text(log.read_text() + '{"step": 6, "loss": 1.0}\n{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
    # The data may move: a byte-identical copy elsewhere is the same data.
    copy = tmp_path / "moved" / "d.h5"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    resumed = train(copy, tmp_path / "part", load_recipe(None, TINY), resume=True, progress=False)
    assert resumed.steps == 8
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # no step twice
    assert records[5]["elapsed_s"] >= elapsed  # the clock continues
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
    with pytest.raises(ConfigError, match="already holds a run; pass --resume to continue it, --overwrite"):
        train(data, tmp_path / "run", load_recipe(None, TINY), progress=False)
    with pytest.raises(ConfigError, match=r"recipe or seed differ from the run's: train.lr 0.0004 \(run\) vs 0.1"):
        train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.lr=0.1"]), resume=True, progress=False)
    other = make_dataset(tmp_path / "other.h5", seed=1)
    with pytest.raises(ConfigError, match=r"data differ from the run's: data_sha256 \w{12}\.\.\. \(run\) vs"):
        train(other, tmp_path / "run", load_recipe(None, TINY), resume=True, progress=False)
    with pytest.raises(ConfigError, match="no run in"):
        train(data, tmp_path / "none", load_recipe(None, TINY), resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no augflow run"):
        train(data, tmp_path / "other", load_recipe(None, TINY), progress=False)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="is a file"):
        train(data, data, load_recipe(None, TINY), progress=False)


def test_a_run_killed_before_its_first_checkpoint_resumes_cleanly_and_overwrite_starts_over(tmp_path):
    data = make_dataset(tmp_path / "d.h5")
    fresh = train(data, tmp_path / "fresh", load_recipe(None, TINY), progress=False)
    run = tmp_path / "run"
    train(data, run, load_recipe(None, [*TINY, "train.max_steps=2"]), progress=False)
    for name in ("checkpoint.pt", "model.pt"):  # as if killed at step 2, before checkpoint_every = 3
        (run / name).unlink()
    assert json.loads((run / "run.json").read_text())["seed"] == 0
    with pytest.raises(ConfigError, match="already holds a run"):
        train(data, run, load_recipe(None, TINY), progress=False)
    with pytest.raises(ConfigError, match=r"train.lr 0.0004 \(run\) vs 0.001 \(now\)"):
        train(data, run, load_recipe(None, [*TINY, "train.lr=1e-3"]), resume=True, progress=False)
    resumed = train(data, run, load_recipe(None, TINY), resume=True, progress=False)
    assert resumed.steps == 8 and _losses(run) == pytest.approx(_losses(tmp_path / "fresh"), rel=1e-6, abs=1e-7)
    # --overwrite replaces the run: its log starts again, nothing of the old model is kept.
    again = train(data, run, load_recipe(None, [*TINY, "train.lr=1e-3", "train.max_steps=1"]), overwrite=True,
                  progress=False)
    assert again.steps == 1 and len(_losses(run)) == 1 and fresh.steps == 8
    assert json.loads((run / "run.json").read_text())["recipe"]["train"]["lr"] == 1e-3


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
