"""augflow train: exact resume, run-folder contents, and refusals."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import ONE_STEP, TINY, make_dataset
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.train.loop import Objective, train
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


def test_select_on_balanced_accuracy_releases_the_most_accurate_epoch(tmp_path, monkeypatch):
    import augflow.train.loop as loop

    accuracies = iter([0.2, 0.9, 0.5, 0.9, 0.1])  # scripted: epoch 2 is best (a later tie does not replace it)
    monkeypatch.setattr(loop, "evaluate_balanced_accuracy", lambda *args, **kwargs: next(accuracies))
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    val = make_dataset(tmp_path / "v.h5", n_subjects=9, slices=2, num_classes=3, seed=1)
    recipe = load_recipe(None, [*TINY, "train.epochs=5", "train.select_on=balanced_accuracy"])
    result = train(data, tmp_path / "run", recipe, val=val, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_loss" in r]
    assert [r["val_balanced_accuracy"] for r in validations] == [0.2, 0.9, 0.5, 0.9, 0.1]
    _, meta = load_model(result.model_path, with_meta=True)
    assert meta["step"] == validations[1]["step"] == 10 and result.best_val_loss == validations[1]["val_loss"]


def test_validation_balanced_accuracy_is_the_likelihood_classifiers(tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    from augflow.classify.likelihood import dataset_log_likelihoods, log_prior
    from augflow.data.store import RowReader, read_info
    from augflow.flows import MagicFlow, MagicFlowConfig
    from augflow.train.loop import evaluate_balanced_accuracy

    torch.manual_seed(0)
    flow = MagicFlow(MagicFlowConfig(image_shape=(1, 8, 8), num_classes=3, full_res_steps=("application",),
                                     channel_steps=1, checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4,
                                     prior="class_gaussian"))
    with torch.no_grad():
        for means in flow.class_means:
            means.mul_(30)  # classes far apart, so that predictions differ between images
    val = make_dataset(tmp_path / "v.h5", n_subjects=30, slices=2, num_classes=3, seed=1)
    info, counts = read_info(val), [5, 20, 10]
    predicted = (dataset_log_likelihoods(flow, val, device="cpu") + log_prior(counts)).argmax(1)
    expected = balanced_accuracy_score(info.labels, predicted)
    assert len(set(predicted.tolist())) > 1
    rows = RowReader(val, np.arange(len(info)), info.labels)
    assert evaluate_balanced_accuracy(flow, rows, counts, 7, torch.device("cpu")) == pytest.approx(expected)


def test_ce_prior_train_gives_the_objective_the_stored_class_frequencies(tmp_path, monkeypatch):
    import augflow.train.loop as loop
    from augflow.classify.likelihood import log_prior

    seen = []
    monkeypatch.setattr(loop, "Objective", lambda *args, **kwargs: seen.append(args[3]) or Objective(*args, **kwargs))
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    for ce_prior in ("uniform", "train"):
        recipe = load_recipe(None, [*TINY, "train.ce_weight=0.5", f"train.ce_prior={ce_prior}"])
        result = train(data, tmp_path / ce_prior, recipe, progress=False)
    _, meta = load_model(result.model_path, with_meta=True)
    assert seen[0] is None
    np.testing.assert_allclose(seen[1].numpy(), log_prior(meta["class_counts"]), rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    (["train.ce_prior=balanced"], "train.ce_prior must be one of uniform, train, but is: 'balanced'"),
    (["model.family=symmflow", "train.select_on=balanced_accuracy"], "needs a likelihood classifier"),
    (["train.select_on=balanced_accuracy", "privacy.enabled=true", "privacy.epsilon=8.0"], "cannot apply under --dp"),
    (["train.select_on=accuracy"], "train.select_on must be one of loss, balanced_accuracy, but is: 'accuracy'"),
    (["train.label_smoothing=0.1"], "train.label_smoothing .* needs train.ce_weight > 0, but train.ce_weight is 0"),
    (["train.ce_weight=1", "train.label_smoothing=1.0"], r"train.label_smoothing must be a number in \[0, 1\)"),
    (["train.ce_weight=1", "model.label_dropout=0.1"], "model.label_dropout trains a null label that the hybrid"),
])
def test_select_on_refusals_write_nothing(tmp_path, settings, message):
    data = make_dataset(tmp_path / "d.h5")
    with pytest.raises(ConfigError, match=message):
        train(data, tmp_path / "run", load_recipe(None, settings), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_classifier_released_from_its_first_epoch_is_warned_about(tmp_path, monkeypatch):
    # With a large train.ce_weight, validation bits/dim can be lowest at the first epoch (measured at 50), and
    # train.select_on = 'loss' would release that model silently. Here bits/dim rises after the first epoch.
    import augflow.train.loop as loop

    rising = iter(range(100))
    monkeypatch.setattr(loop, "evaluate_loss", lambda *args, **kwargs: float(next(rising)))
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    with pytest.warns(UserWarning, match=r"step 4 of 12: train.select_on = 'loss' .* train.ce_weight = 0.5"):
        result = train(data, tmp_path / "hybrid", load_recipe(None, [*TINY, "train.epochs=3", "train.ce_weight=0.5"]),
                       progress=False)
    _, meta = load_model(result.model_path, with_meta=True)
    assert result.released_step == meta["step"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bits/dim is what a generator is chosen on: no warning without the hybrid term
        assert train(data, tmp_path / "plain", load_recipe(None, [*TINY, "train.epochs=3"]),
                     progress=False).released_step == 4


@pytest.mark.slow
def test_compiled_training_takes_the_same_steps(tmp_path, one_thread):
    """``train.compile``: the compiled objective gives the eager losses (the short last batch of each epoch, 3 of 8
    images, runs eagerly), and refuses DP before writing anything."""
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    eager = train(data, tmp_path / "eager", load_recipe(None, ONE_STEP), progress=False)
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="train.compile")  # no fallback to eager
        compiled = train(data, tmp_path / "compiled", load_recipe(None, [*ONE_STEP, "train.compile=true"]),
                         progress=False)
    assert counters["stats"]["unique_graphs"] > graphs
    assert compiled.steps == eager.steps == 8
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    assert compiled.best_val_loss == pytest.approx(eager.best_val_loss, rel=1e-4)
    with pytest.raises(ConfigError, match="train.compile applies to runs without --dp"):
        train(data, tmp_path / "dp", load_recipe(None, [*ONE_STEP, "train.compile=true", "privacy.enabled=true"]),
              progress=False)
    assert not (tmp_path / "dp").exists()


def test_a_failed_compilation_falls_back_to_eager_training(tmp_path, monkeypatch):
    """Without a working compiler (inductor's CPU kernels need one) the run warns and trains eagerly, unchanged."""
    def no_compiler(net, **options):
        def fail(*args):
            raise BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler found"), None)
        return fail

    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3, num_classes=3)
    train(data, tmp_path / "eager", load_recipe(None, TINY), progress=False)
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(UserWarning, match=r"train.compile: torch.compile failed \(RuntimeError: no C\+\+ compiler"):
        train(data, tmp_path / "fallback", load_recipe(None, [*TINY, "train.compile=true"]), progress=False)
    assert _losses(tmp_path / "fallback") == _losses(tmp_path / "eager")
