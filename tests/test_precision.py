"""Mixed precision (amp): bf16 networks, float32 likelihoods, exact enough, and a clear fallback without bf16."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_dataset

from augflow import precision
from augflow.cli import cli
from augflow.data.store import read_images, read_info
from augflow.flows import MagicFlow
from augflow.flows.layers import FlowStep
from augflow.precision import PrecisionWarning, autocast, resolve_amp
from augflow.symmflow import SymmFlow, SymmFlowConfig
from augflow.train.loop import Objective, train
from augflow.train.privacy.gradients import PerSampleGradients
from augflow.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture
def with_bf16(monkeypatch):
    """Pretend the CPU has AMX-BF16: torch's CPU autocast runs (emulated if need be) on any x86 or Arm CPU, so the
    numerics are tested everywhere; only the speed needs the real instructions."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Leave the identity start (zero heads), so the coupling networks matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    recipe = load_recipe(None, [*TINY, "model.hidden_channels=[16, 16, 32, 32]", "model.embed_dim=16"])
    model = MagicFlow(recipe.model_config((1, 32, 32), 3))
    x, y = torch.rand(16, 1, 32, 32), torch.arange(16) % 3
    model.initialize(x, y)
    return _trained_like(model), x, y


def test_amp_falls_back_to_float32_with_a_warning_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with pytest.warns(PrecisionWarning, match="no native bf16.*float32 instead"):
        assert resolve_amp(True, CPU) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp(False, CPU) is False  # nothing requested: no warning


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16", "bf16"])
def test_bf16_cpus_are_detected(monkeypatch, flag):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", flag}))
    assert precision.bf16_support(CPU) == flag
    assert resolve_amp(True, CPU) is True


def test_bits_per_dim_under_amp_are_within_1e3_of_float32(flow):
    model, x, y = flow
    with torch.no_grad():
        exact = model.log_prob(x, y)
        with autocast(CPU, True):
            mixed = model.log_prob(x, y)
    assert mixed.dtype == torch.float32
    bits = (mixed - exact) / (model.num_dims * math.log(2))
    # The figure a user reads, the mean bits/dim of a set, within 1e-3 bits; every image within 5e-3.
    assert bits.mean().abs() < 1e-3 and bits.abs().max() < 5e-3, (float(bits.mean()), float(bits.abs().max()))
    assert bits.abs().max() > 0  # the networks really ran in bf16


def test_round_trip_under_amp_is_within_a_grey_level(flow):
    model, x, y = flow
    with torch.no_grad(), autocast(CPU, True):
        zs, _ = model.encode(x, y)
        back = model.decode(zs, y)
    error = (back - x).abs()
    # The coupling inputs are rounded to bf16 afresh on the way back, so the round trip is exact only to bf16:
    # on average far below a grey level (1/255 = 0.0039), at worst a few grey levels.
    assert error.mean() < 1e-3 and error.max() < 2e-2, (float(error.mean()), float(error.max()))


def test_log_determinants_and_latents_are_float32_under_amp(flow):
    model, x, y = flow
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append((type(m).__name__, out[0].dtype, out[1].dtype)))
             for m in model.modules() if isinstance(m, FlowStep) or type(m).__name__ in ("ActNorm",
                                                                                        "InvertibleConv1x1",
                                                                                        "AffineCoupling")]
    nets = []
    hooks += [m.register_forward_hook(lambda m, i, out: nets.append(out[0].dtype))
              for m in model.modules() if type(m).__name__ == "GenerationNet"]
    with torch.no_grad(), autocast(CPU, True):
        zs, logdet = model.encode(x, y)
        heat = model.attribution(x, y)
    for hook in hooks:
        hook.remove()
    assert seen and all(z == torch.float32 and ld == torch.float32 for _, z, ld in seen), seen
    assert nets and all(dtype == torch.bfloat16 for dtype in nets)  # the networks did run in bf16
    assert logdet.dtype == torch.float32 and all(z.dtype == torch.float32 for z in zs)
    # The attribution map stays an exact split of the (amp) log-likelihood.
    with torch.no_grad(), autocast(CPU, True):
        log_p = model.log_prob(x, y)
    torch.testing.assert_close(heat.sum(dim=(1, 2, 3)), log_p, rtol=1e-5, atol=1e-2)


def test_dp_per_sample_gradients_under_amp_equal_an_autograd_loop(with_bf16):
    torch.manual_seed(0)
    recipe = load_recipe(None, [*TINY, "model.checker_steps=[1, 1]", "model.hidden_channels=[8, 8, 8]"])
    model = MagicFlow(recipe.model_config((2, 16, 16), 3))
    x, y = torch.rand(4, 2, 16, 16), torch.tensor([0, 1, 2, 1])
    model.initialize(x, y)
    _trained_like(model).train()
    objective, exact = Objective(model, 0.0, amp=True), Objective(model, 0.0, amp=False)
    grads, losses = PerSampleGradients(objective)(x, y)
    assert losses.dtype == torch.float32
    names = [n for n, p in objective.named_parameters() if p.numel()]

    def autograd(obj, i):
        obj.zero_grad()
        obj(x[i:i + 1], y[i:i + 1]).sum().backward()
        return {n: p.grad.clone() for n, p in obj.named_parameters() if p.numel()}

    for i in range(len(x)):
        reference, full = autograd(objective, i), autograd(exact, i)
        mine = torch.cat([grads[n][i].flatten() for n in names])

        def error(ref, mine=mine):
            ref = torch.cat([ref[n].flatten() for n in names])
            return float((mine - ref).norm() / ref.norm())

        # What DP-SGD clips is the whole per-sample vector: it matches the per-example autograd reference under
        # amp up to bf16 summation order, and float32 up to bf16 rounding (a tiny gradient may differ more).
        assert error(reference) < 0.03 and error(full) < 0.03, (error(reference), error(full))
        # The log-det terms Opacus' own hooks drop (relative error ~1.2) are there, as in float32.
        for name in names:
            if name.endswith(("actnorm.log_scale", "conv.log_s")):
                assert (grads[name][i] - full[name]).norm() / full[name].norm() < 0.02, name


def test_symmflow_velocity_is_float32_under_amp():
    torch.manual_seed(0)
    model = _trained_like(SymmFlow(SymmFlowConfig(image_shape=(1, 16, 16), num_classes=2, base_channels=8,
                                                  channel_mult=(1, 2), attention_resolutions=())))
    state, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        exact = model.velocity(state, t)
        with autocast(CPU, True):
            mixed = model.velocity(state, t)
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.05 * exact.abs().max()


def test_a_run_trained_with_amp_samples_with_amp_unless_told_not_to(with_bf16, tmp_path):
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=2, num_classes=3)
    run = train(data, tmp_path / "run", load_recipe(None, [*TINY, "train.max_steps=3", "train.amp=true"]),
                progress=False).run_dir
    assert json.loads((run / "config.json").read_text())["train"]["amp"] is True
    runner = CliRunner()
    for flag, name in (([], "amp.h5"), (["--no-amp"], "fp32.h5")):
        result = runner.invoke(cli, ["synthesize", "--model", str(run), "--per-class", "4", "--seed", "3",
                                     "--device", "cpu", "--out", str(tmp_path / name), *flag])
        assert result.exit_code == 0, result.output
    assert read_info(tmp_path / "amp.h5").provenance["amp"] is True
    assert read_info(tmp_path / "fp32.h5").provenance["amp"] is False
    # Same latents, same model: the two precisions give nearly the same images.
    difference = np.abs(read_images(tmp_path / "amp.h5") - read_images(tmp_path / "fp32.h5"))
    assert 0 < difference.mean() < 0.01, float(difference.mean())
