"""Differentially private training: exact per-sample gradients, accounting, public-only inputs, the ledger."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_dataset
from opacus.accountants import PRVAccountant, RDPAccountant

from augflow.cli import cli
from augflow.data.store import read_info
from augflow.errors import PrivacyError, PrivacyWarning
from augflow.flows import MagicFlow
from augflow.models import load_model
from augflow.train.loop import Objective, initial_model, open_session, train
from augflow.train.privacy import session as private_session
from augflow.train.privacy.accounting import PrivacyPlan, default_delta, plan_privacy, release_class_counts
from augflow.train.privacy.checks import check_model, check_modules
from augflow.train.privacy.gradients import PerSampleGradients, PrivateStep
from augflow.train.privacy.public import template_mask
from augflow.train.privacy.sampling import make_units, poisson_sample
from augflow.train.recipe import PrivacyConfig, load_recipe
from augflow.train.rows import TrainingRows

pytestmark = pytest.mark.filterwarnings("ignore::augflow.errors.PrivacyWarning")
# Whole epochs of 3 Poisson steps (24 slices / batch 8): the smallest run that exercises every path.
DP = [*TINY, "train.epochs=2", "train.ema_decay=0.0", "privacy.enabled=true", "privacy.epsilon=8",
      "privacy.microbatch=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("ce_weight", "ce_prior", "smoothing"),
                         [(0.0, None, 0.0), (0.5, None, 0.0), (0.5, (0.6, 0.3, 0.1), 0.0), (0.5, None, 0.1)])
def test_per_sample_gradients_equal_an_autograd_loop(ce_weight, ce_prior, smoothing):
    # 16 px and two levels: float64 convolutions on 1x1 maps hit a torch CPU limitation under vmap
    # ("slow_conv2d: grad_weight must be contiguous"); training runs in float32, where they work.
    torch.manual_seed(0)
    recipe = load_recipe(None, [*TINY, "model.checker_steps=[1, 1]", "model.hidden_channels=[8, 8, 8]"])
    model = MagicFlow(recipe.model_config((2, 16, 16), 3)).double()
    x, y = torch.rand(4, 2, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    model.initialize(x, y)
    with torch.no_grad():  # leave the identity start (zero heads) so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    log_prior = None if ce_prior is None else torch.log(torch.tensor(ce_prior, dtype=torch.float64))
    objective = Objective(model, ce_weight, log_prior=log_prior, label_smoothing=smoothing)
    grads, losses = PerSampleGradients(objective)(x, y)
    torch.testing.assert_close(losses, objective(x, y).detach(), rtol=1e-10, atol=0)
    names = [n for n, p in objective.named_parameters() if p.numel()]
    assert {"model.layers.0.actnorm.log_scale", "model.layers.0.conv.log_s"} <= set(names)  # log-det terms
    for i in range(len(x)):
        objective.zero_grad()
        objective(x[i:i + 1], y[i:i + 1]).sum().backward()
        for name, p in objective.named_parameters():
            if p.numel():
                error = (grads[name][i] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
                assert error < 1e-5, (name, float(error))


def test_dp_step_without_noise_or_clipping_is_the_plain_step():
    # The DPOptimizer plumbing (uneven microbatches as virtual steps, mean over the expected batch) adds nothing:
    # with sigma = 0 and a huge clipping norm one DP step is exactly the non-private step (SGD: Adam's first step
    # is about lr * sign(g), which would amplify rounding noise in gradients that are zero in exact arithmetic).
    torch.manual_seed(0)
    model = MagicFlow(load_recipe(None, TINY).model_config((1, 8, 8), 3))
    x, y = torch.rand(7, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    model.initialize(x, y)
    twin = MagicFlow(model.config)
    twin.load_state_dict(model.state_dict())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = PrivacyPlan(1.0, 0.0, 1e-5, "", "rdp", 0.0, 0.1, 10, 1e9, "slice", 70, 7)
    params = [p for p in model.parameters() if p.numel()]
    stats = PrivateStep(Objective(model, 0.0), torch.optim.SGD(params, lr=1.0), plan, 3).step(x, y, 0)
    reference = torch.optim.SGD([p for p in twin.parameters() if p.numel()], lr=1.0)
    Objective(twin, 0.0)(x, y).mean().backward()
    reference.step()
    assert stats["batch"] == 7 and stats["clipped"] == 0.0
    moved = 0.0
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        a, b, start = a.detach(), b.detach(), before[name]
        torch.testing.assert_close(a - start, b - start, rtol=1e-4, atol=1e-7, msg=name)
        moved = max(moved, float((a - start).abs().amax())) if a.numel() else moved
    assert moved > 1e-3


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_incompatible_modules_are_refused_by_name():
    from torch import nn

    check_model(MagicFlow(load_recipe(None, TINY).model_config((1, 8, 8), 3)))  # GroupNorm only: accepted
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.raises(PrivacyError, match=r"module '1.0' \(BatchNorm2d\).*GroupNorm"):
        check_modules(net)
    net = nn.Sequential(nn.Linear(2, 2), nn.utils.weight_norm(nn.Linear(2, 2)))
    with pytest.raises(PrivacyError, match=r"module '1' \(Linear\): weight_norm"):
        check_modules(net)
    net = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
    with pytest.raises(PrivacyError, match=r"module '0' \(ParametrizedLinear\)"):
        check_modules(net)
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2).requires_grad_(False)))
    with pytest.raises(PrivacyError, match=r"module '1.0' \(Linear\): it has frozen \(pretrained\) parameters"):
        check_modules(net)


def test_initialisation_and_mask_under_dp_do_not_depend_on_the_data(tmp_path):
    a = make_dataset(tmp_path / "a.h5", seed=0)
    b = make_dataset(tmp_path / "b.h5", seed=1)

    def initial(path, overrides):
        recipe = load_recipe(None, [*TINY, "privacy.epsilon=8", *overrides])
        rows = TrainingRows.open(path, None, recipe.train.val_fraction, seed=0)
        session = open_session(recipe, rows, 0, torch.device("cpu"))
        return initial_model(recipe, rows, session, 0, torch.device("cpu")).state_dict()

    for overrides in (["privacy.enabled=true"], ["privacy.enabled=true", "privacy.actnorm_init='identity'"]):
        first, second = initial(a, overrides), initial(b, overrides)
        for name in first:
            assert torch.equal(first[name], second[name]), name
    identity = initial(a, ["privacy.enabled=true", "privacy.actnorm_init='identity'"])
    assert not identity["layers.0.actnorm.loc"].any() and not identity["layers.0.actnorm.initialized"]
    assert initial(a, ["privacy.enabled=true"])["layers.0.actnorm.initialized"]
    assert torch.equal(initial(a, ["privacy.enabled=true"])["app_mask"], template_mask(8, 8))
    # Without DP the data do enter: ActNorm statistics of a training batch and the Otsu mask of the mean image.
    assert not torch.equal(initial(a, [])["layers.0.actnorm.loc"], initial(b, [])["layers.0.actnorm.loc"])


def test_delta_balanced_sampling_and_torchrun_are_refused(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d.h5", n_subjects=8)  # 24 slices, 18 for training after the validation split
    with pytest.raises(PrivacyError, match=r"privacy.delta must be in \(0, 1/N\).*N = 18.*fails outright"):
        train(data, tmp_path / "r", load_recipe(None, [*DP, "privacy.delta=0.1"]), progress=False)
    with pytest.raises(PrivacyError, match="balanced_sampling cannot be combined with DP"):
        train(data, tmp_path / "r", load_recipe(None, [*DP, "train.balanced_sampling=true"]), progress=False)
    with pytest.raises(PrivacyError, match="privacy.epsilon must be a finite number > 0"):
        train(data, tmp_path / "r", load_recipe(None, [*DP, "privacy.epsilon=0"]), progress=False)
    monkeypatch.setattr("augflow.train.loop._distributed", lambda device: (0, 2))
    with pytest.raises(PrivacyError, match="without torchrun"):
        train(data, tmp_path / "r", load_recipe(None, DP), progress=False)
    assert not (tmp_path / "r").exists()
    assert default_delta(950) == 1e-4 and default_delta(1000) == 1e-4 and default_delta(1001) == 1e-5


def test_calibration_hits_the_budget_and_training_stops_before_exceeding_it():
    cfg = PrivacyConfig(enabled=True, epsilon=4.0, accountant="prv")
    plan = plan_privacy(cfg, population=500, expected_batch_size=25, planned_steps=60)
    independent = PRVAccountant()
    independent.history = [(plan.noise_multiplier, 0.05, 60)]
    eps = independent.get_epsilon(delta=plan.delta)
    assert plan.delta == 1e-4 and plan.epsilon_counts == pytest.approx(0.2)
    assert plan.epsilon_sgd(60) == pytest.approx(eps, rel=1e-9) and 3.78 <= eps <= 3.8  # budget 4 - 0.2
    rdp = plan_privacy(PrivacyConfig(enabled=True, epsilon=4.0, public_class_counts=True), 500, 25, 60)
    assert rdp.epsilon_counts == 0 and 3.98 <= rdp.epsilon_sgd(60) <= 4.0
    allowed = rdp.budget_steps(200)  # a resumed run asking for more epochs than were planned
    assert 60 <= allowed < 200 and rdp.epsilon_sgd(allowed) <= 4.0 < rdp.epsilon_sgd(allowed + 1)


def test_subject_unit_samples_at_most_one_slice_per_subject():
    subjects = np.repeat([f"s{i}" for i in range(50)], 4)[np.random.default_rng(0).permutation(200)]
    units = make_units("subject", subjects)
    assert units.count == 50
    drawn = [poisson_sample(units, 0.2, seed) for seed in range(400)]
    for positions in drawn:
        assert len(set(subjects[positions])) == len(positions)
    assert np.mean([len(p) for p in drawn]) == pytest.approx(10, rel=0.05)  # q over subjects: 0.2 * 50
    slices = np.bincount(np.concatenate(drawn), minlength=200)
    assert slices.min() > 0  # every slice of a subject can be drawn
    assert len(poisson_sample(make_units("slice", subjects), 0.2, 0)) != 0
    # Noisy counts: subject unit caps each subject's weight; the sensitivity is the cap.
    labels = np.repeat([0, 1], 100)
    cfg = PrivacyConfig(enabled=True, epsilon=1.0, max_slices_per_subject=2)
    counts, info = release_class_counts(labels, make_units("subject", np.repeat(np.arange(50), 4)), 2, cfg,
                                           0.5, seed=0)
    assert info["l1_sensitivity"] == 2.0 and info["noise_scale"] == 4.0 and abs(counts[0] - 50) < 40


def test_resume_continues_the_accountant_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(private_session, "new_secret", lambda: "0123456789abcdef0123456789abcdef")
    data = make_dataset(tmp_path / "d.h5", n_subjects=8)
    with pytest.warns(PrivacyWarning, match="protects one slice, but subjects .* have up to 3 slices"):
        full = train(data, tmp_path / "full", load_recipe(None, DP), progress=False)
    assert full.steps == 6  # 18 training slices, expected batch 8: 3 Poisson steps per epoch
    killed = train(data, tmp_path / "part", load_recipe(None, [*DP, "train.max_steps=4"]), progress=False)
    assert killed.steps == 4 and killed.ledger.steps == 4 and killed.ledger.epsilon < full.ledger.epsilon
    resumed = train(data, tmp_path / "part", load_recipe(None, DP), resume=True, progress=False)
    assert resumed.ledger.epsilon == full.ledger.epsilon and resumed.ledger.steps == 6
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-6, atol=1e-7)
    assert b["privacy"]["ledger"] == a["privacy"]["ledger"] == full.ledger.to_dict()
    # The checkpoint holds the secret seed: owner-only whatever the umask (the released model is not secret).
    assert (tmp_path / "part" / "checkpoint.pt").stat().st_mode & 0o777 == 0o600
    # Asking a finished run for more epochs than were planned stops before the budget would be exceeded.
    with pytest.warns(PrivacyWarning, match="one more step would exceed privacy.epsilon = 8"):
        more = train(data, tmp_path / "part", load_recipe(None, [*DP, "train.epochs=4"]), resume=True, progress=False)
    assert 6 <= more.steps < 12 and more.ledger.epsilon <= 8
    # The ledger's epsilon is what Opacus' accountant gives for (sigma, q, steps), plus the label-count share.
    ledger = full.ledger.to_dict()
    independent = RDPAccountant()
    independent.history = [(ledger["noise_multiplier"], ledger["sample_rate"], ledger["steps"])]
    assert ledger["sample_rate"] == 8 / 18 and ledger["delta"] == 1e-3 and ledger["planned_steps"] == 6
    assert ledger["epsilon"] == pytest.approx(independent.get_epsilon(delta=1e-3) + 0.05 * 8, rel=1e-12)
    assert 7.96 <= ledger["epsilon"] <= 8.0
    # The secret randomness stays in the private checkpoint, never in the released model.
    _, meta = load_model(full.model_path, with_meta=True)
    assert "0123456789abcdef" not in json.dumps(meta) and meta["privacy"] == ledger and meta["val_loss"] is None


def test_cli_dp_run_ledger_travels_to_synthetic_data(tmp_path):
    data = make_dataset(tmp_path / "d.h5", n_subjects=8)
    runner = CliRunner()
    sets = [arg for text in DP if not text.startswith("privacy.") for arg in ("--set", text)]
    result = runner.invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--dp", "--epsilon",
                                 "5", "--dp-unit", "subject", "--accountant", "prv", "--device", "cpu", *sets,
                                 "--set", "privacy.microbatch=8"])
    assert result.exit_code == 0, result.output
    assert "-DP per subject (prv" in result.output
    _, meta = load_model(tmp_path / "run" / "model.pt", with_meta=True)
    ledger = meta["privacy"]
    assert ledger["dp"] and ledger["unit"] == "subject" and ledger["population"] == 6  # 6 training subjects
    assert ledger["sample_rate"] == 1.0 and ledger["delta"] == 1e-2 and ledger["epsilon"] <= 5
    result = runner.invoke(cli, ["synthesize", "--model", str(tmp_path / "run"), "--class", "class1", "--n", "3",
                                 "--out", str(tmp_path / "syn.h5"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_info(tmp_path / "syn.h5").provenance["privacy"] == ledger
    shown = json.loads(runner.invoke(cli, ["info", str(tmp_path / "syn.h5"), "--json"]).output)["privacy"]
    keys = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "max_grad_norm")
    assert {k: shown[k] for k in keys} == {k: ledger[k] for k in keys}
    for path in (tmp_path / "run", tmp_path / "run" / "model.pt"):
        assert json.loads(runner.invoke(cli, ["info", str(path), "--json"]).output)["privacy"] == ledger
    assert "privacy: (" in runner.invoke(cli, ["info", str(tmp_path / "run")]).output
    # DP options without --dp are a usage error; a model trained without DP says so and states no epsilon.
    result = runner.invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--epsilon", "1"])
    assert result.exit_code == 2 and "need --dp" in result.output
    plain = train(data, tmp_path / "plain", load_recipe(None, [*TINY, "train.max_steps=1"]), progress=False)
    _, meta = load_model(plain.model_path, with_meta=True)
    assert meta["privacy"]["dp"] is False and not any("epsilon" in k for k in meta["privacy"])
    assert "without differential privacy" in runner.invoke(cli, ["info", str(tmp_path / "plain")]).output
    assert math.isfinite(json.loads(runner.invoke(cli, ["info", str(data), "--json"]).output)["num_images"])
