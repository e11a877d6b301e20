"""Tests of the MagicFlow model API: hierarchy, density, sampling, save/load, masks, config errors, and the
class-Gaussian prior with (un)conditional couplings.

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
    Ardizzone et al., "Training Normalizing Flows with the Information Bottleneck for Competitive
    Generative Classification" (IB-INN), 2020, arXiv:2001.06448.
    Izmailov et al., "Semi-Supervised Learning with Normalizing Flows" (FlowGMM), 2020, arXiv:1912.13025.
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from augflow.errors import ConfigError
from augflow.flows import (
    ActNorm,
    FlowStep,
    MagicFlow,
    MagicFlowConfig,
    Split,
    Squeeze,
    brain_mask_from_images,
    dequantize,
    ellipse_mask,
    load_mask,
)
from augflow.models import load_model
from augflow.train.loop import Objective
from augflow.train.privacy.gradients import PerSampleGradients


def tiny_config(coupling: str = "generation", **overrides) -> MagicFlowConfig:
    fields = dict(
        image_shape=(1, 8, 8),
        num_classes=3,
        coupling=coupling,
        full_res_steps=("application", "checkerboard"),
        channel_steps=1,
        checker_steps=(1, 1),
        hidden_channels=(4, 8, 8),
        embed_dim=8,
    )
    return MagicFlowConfig(**(fields | overrides))


def perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(params=["generation", "classification"])
def model(request: pytest.FixtureRequest) -> MagicFlow:
    torch.manual_seed(0)
    return perturbed(MagicFlow(tiny_config(request.param)).double().eval())


# The prior options: the paper's standard normal, a class-Gaussian prior (IB-INN, FlowGMM) with conditional and
# with unconditional couplings, and class means and scales.
PRIORS = {
    "standard": {},
    "class-gaussian": {"prior": "class_gaussian"},
    "class-gaussian-unconditional": {"prior": "class_gaussian", "conditional_couplings": False},
    "class-diagonal-unconditional": {"prior": "class_diagonal", "conditional_couplings": False},
}


def prior_model(name: str, dtype: torch.dtype = torch.float64) -> MagicFlow:
    torch.manual_seed(0)
    return perturbed(MagicFlow(tiny_config(**PRIORS[name])).to(dtype).eval())


def test_default_hierarchy_is_the_papers() -> None:
    config = MagicFlowConfig(hidden_channels=(4, 4, 4, 4))  # paper depth, narrow for speed
    flow = MagicFlow(config)
    kinds = [type(layer) for layer in flow.layers]
    step_index, squeezes_before, splits_after = 0, [], []
    for kind in kinds:
        if kind is FlowStep:
            step_index += 1
        elif kind is Squeeze:
            squeezes_before.append(step_index)
        elif kind is Split:
            splits_after.append(step_index - 1)
    assert step_index == 24
    assert squeezes_before == [5, 11, 17] and splits_after == [7, 13, 19]
    assert flow.latent_shapes == [(2, 32, 32), (4, 16, 16), (8, 8, 8), (8, 8, 8)]
    assert sum(c * h * w for c, h, w in flow.latent_shapes) == 64 * 64


def test_log_prob_is_change_of_variables(model: MagicFlow) -> None:
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1])

    def flat_latent(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in model.encode(v, y)[0]])

    jac = torch.autograd.functional.jacobian(flat_latent, x, vectorize=True).reshape(64, 64)
    z = flat_latent(x)
    expected = -0.5 * (z**2).sum() - 32 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(model.log_prob(x, y)[0], expected.detach())
    torch.testing.assert_close(model(x, y), model.log_prob(x, y))  # forward is log_prob


def test_bits_per_dim_and_attribution(model: MagicFlow) -> None:
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    log_p = model.log_prob(x, y)
    expected = -(log_p - 64 * math.log(256)) / (64 * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(x, y), expected)
    heat = model.attribution(x, y)
    assert heat.shape == x.shape
    torch.testing.assert_close(heat.sum(dim=(1, 2, 3)), log_p)


def test_a_different_label_changes_the_density(model: MagicFlow) -> None:
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    difference = model.log_prob(x, torch.tensor([0, 0])) - model.log_prob(x, torch.tensor([1, 2]))
    assert difference.abs().min() > 1e-6


def test_samples_have_the_right_shape_and_are_reproducible(model: MagicFlow) -> None:
    y = torch.tensor([0, 1, 2])
    first = model.sample(y, temperature=0.7, generator=torch.Generator().manual_seed(3))
    again = model.sample(y, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert first.shape == (3, 1, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)


@pytest.mark.parametrize("prior", ["standard", "class-gaussian-unconditional"])
def test_save_load_keeps_outputs_mask_and_init_flag(tmp_path: Path, prior: str) -> None:
    torch.manual_seed(0)
    brain = torch.zeros(8, 8)
    brain[2:7, 1:6] = 1
    flow = MagicFlow(tiny_config(**PRIORS[prior]), app_mask=brain)
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 1])
    flow.initialize(x, y)
    perturbed(flow).eval()
    flow.save(tmp_path / "sub" / "model.pt", meta={"epsilon": 3.0, "class_names": ["a", "b", "c"]})
    loaded, meta = load_model(tmp_path / "sub" / "model.pt", with_meta=True)
    assert meta == {"epsilon": 3.0, "class_names": ["a", "b", "c"]}
    assert loaded.config == flow.config and loaded.initialized and not loaded.training
    assert torch.equal(loaded.app_mask, brain)
    assert torch.equal(loaded.log_prob(x, y), flow.log_prob(x, y))
    assert list(tmp_path.joinpath("sub").iterdir()) == [tmp_path / "sub" / "model.pt"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_initialize_normalises_actnorm_inputs() -> None:
    torch.manual_seed(0)
    flow = MagicFlow(tiny_config())
    assert not flow.initialized
    x = torch.rand(16, 1, 8, 8) * 0.3 + 0.5
    flow.initialize(x, torch.zeros(16, dtype=torch.long))
    assert flow.initialized
    first: ActNorm = flow.layers[0].actnorm
    out, _ = first(2 * x - 1)
    assert out.mean().abs() < 1e-5 and (out.std(unbiased=False) - 1).abs() < 1e-3


def test_float32_round_trip_at_64px() -> None:
    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 64, 64), num_classes=2, hidden_channels=(8, 8, 8, 8))
    flow = perturbed(MagicFlow(config), 0.02).eval()
    x = torch.rand(2, 1, 64, 64)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        zs, _ = flow.encode(x, y)
        assert (flow.decode(zs, y) - x).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("coupling", "prior"),
    [("generation", "standard"), ("classification", "standard"), ("generation", "class-gaussian-unconditional")],
)
def test_per_sample_gradients_with_torch_func(coupling: str, prior: str) -> None:
    """The DP path: vmap(grad) over functional_call equals one backward per sample."""
    torch.manual_seed(0)
    flow = perturbed(MagicFlow(tiny_config(coupling, **PRIORS[prior])).double().eval())
    params = {k: v.detach() for k, v in flow.named_parameters()}
    buffers = dict(flow.named_buffers())
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        log_p = torch.func.functional_call(flow, (p, buffers), (xi[None], yi[None]))
        return -log_p.sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        flow.zero_grad()
        (-flow.log_prob(x[i : i + 1], y[i : i + 1]).sum()).backward()
        for name, p in flow.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, msg=name)


def test_per_sample_gradients_of_the_one_pass_hybrid_objective() -> None:
    """DP-SGD's per-sample gradients of bits/dim + cross-entropy through :meth:`MagicFlow.class_log_probs`."""
    flow = prior_model("class-gaussian-unconditional")
    objective = Objective(flow, ce_weight=1.0)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    grads, losses = PerSampleGradients(objective)(x, y)
    torch.testing.assert_close(losses, flow.training_loss(x, y, ce_weight=1.0).float().detach())
    for i in range(3):
        flow.zero_grad()
        flow.training_loss(x[i : i + 1], y[i : i + 1], ce_weight=1.0).sum().backward()
        for name, p in flow.named_parameters():
            torch.testing.assert_close(grads[f"model.{name}"][i], p.grad, msg=name)


@pytest.mark.parametrize("coupling", ["generation", "classification"])
def test_single_sample_training_step_on_1x1_coarsest_map(coupling: str) -> None:
    """Batch 1 in training mode (per-sample DP) must work even where the last map is 1x1."""
    flow = MagicFlow(tiny_config(coupling, checker_steps=(1, 1, 1), hidden_channels=(4, 8, 8, 8)))
    flow.train()
    (-flow.log_prob(torch.rand(1, 1, 8, 8), torch.tensor([1])).sum()).backward()


def test_checkerboard_masks_flip_on_alternate_use() -> None:
    flow = MagicFlow(tiny_config(full_res_steps=("checkerboard",) * 3))
    masks = [flow.layers[i].coupling.mask for i in range(3)]
    assert torch.equal(masks[1], 1 - masks[0]) and torch.equal(masks[2], masks[0])


def test_dequantize() -> None:
    x = torch.randint(0, 256, (4, 1, 8, 8)).float() / 255
    noisy = dequantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, MagicFlow.dequantize(x, torch.Generator().manual_seed(0)))
    assert torch.all(torch.floor(noisy * 256) == torch.round(x * 255))


def test_brain_mask_from_images_and_files(tmp_path: Path) -> None:
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disk = (((rows - 7.5) ** 2 + (cols - 7.5) ** 2) <= 25).float()
    images = disk * (0.6 + 0.2 * torch.rand(10, 16, 16))
    assert torch.equal(brain_mask_from_images(images), disk)
    assert torch.equal(brain_mask_from_images(torch.zeros(3, 1, 16, 16)), ellipse_mask(16, 16))
    np.save(tmp_path / "mask.npy", disk.numpy())
    assert torch.equal(load_mask(tmp_path / "mask.npy", 16, 16), disk)
    with pytest.raises(ConfigError, match=r"\(8, 8\)"):
        load_mask(tmp_path / "mask.npy", 8, 8)
    with pytest.raises(ConfigError, match="app_mask"):
        MagicFlow(tiny_config(), app_mask=disk)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_shape": (1, 10, 8)}, r"divisible by 4.*\(1, 10, 8\)"),
        ({"image_shape": (1, 8)}, "image_shape"),
        ({"coupling": "glow"}, "coupling must be one of"),
        ({"num_classes": 0}, "num_classes"),
        ({"hidden_channels": (4, 8)}, "hidden_channels must hold 3"),
        ({"full_res_steps": ("channel",)}, "C >= 2"),
        ({"full_res_steps": ("stripes",)}, "full_res_steps"),
        ({"dropout": 1.0}, "dropout"),
        ({"prior": "gmm"}, r"prior must be one of \('standard', 'class_gaussian', 'class_diagonal'\), got 'gmm'"),
        ({"conditional_couplings": 0}, "conditional_couplings must be true or false, got 0"),
        ({"conditional_couplings": "false"}, "conditional_couplings must be true or false, got 'false'"),
        ({"label_dropout": 1.0}, r"label_dropout must be in \[0, 1\), got 1.0"),
        ({"label_dropout": 0.1, "conditional_couplings": False}, "label_dropout > 0 .* needs conditional_couplings"),
    ],
)
def test_bad_configs_raise_config_error(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MagicFlow(tiny_config(**overrides))


def test_default_config_requires_multiple_of_8_and_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"divisible by 8.*\(1, 60, 64\)"):
        MagicFlowConfig(image_shape=(1, 60, 64)).validate()
    with pytest.raises(ConfigError, match="unknown model config keys"):
        MagicFlowConfig.from_dict({"widths": 3})
    assert MagicFlowConfig.from_dict(MagicFlowConfig().to_dict()) == MagicFlowConfig()


def test_bad_input_shapes_raise(model: MagicFlow) -> None:
    with pytest.raises(ConfigError, match="x must have shape"):
        model.log_prob(torch.rand(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="y must have shape"):
        model.log_prob(torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0]))


# ------------------------------------------------------------- class-Gaussian prior (IB-INN, FlowGMM)


def test_standard_prior_has_zero_means_and_todays_log_prob() -> None:
    flow = prior_model("standard")
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    means, log_scales = flow.prior(y)
    assert [tuple(m.shape) for m in means + log_scales] == [(3, *s) for s in flow.latent_shapes] * 2
    assert all(m.dtype == torch.float64 and not m.any() for m in means + log_scales)
    zs, logdet = flow.encode(x, y)
    by_hand = logdet + sum((-0.5 * (z * z + math.log(2 * math.pi))).sum(dim=(1, 2, 3)) for z in zs)
    assert torch.equal(flow.log_prob(x, y), by_hand)  # bit for bit: N(0, I) as before the option existed


def test_standard_prior_keeps_the_state_dict_keys_and_loads_files_from_before_the_option(tmp_path: Path) -> None:
    standard, gaussian = prior_model("standard"), prior_model("class-gaussian")
    added = [k for k in gaussian.state_dict() if k not in standard.state_dict()]
    assert added == ["class_means.0", "class_means.1", "class_means.2"]
    assert all(k in gaussian.state_dict() for k in standard.state_dict())
    # A file written before the prior options existed: its config has neither key.
    config = {k: v for k, v in standard.config.to_dict().items() if k not in ("prior", "conditional_couplings")}
    torch.save(
        {"family": "magic", "config": config, "state_dict": standard.state_dict(), "meta": {}}, tmp_path / "old.pt"
    )
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config == standard.config and loaded.config.prior == "standard"
    x, y = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    assert torch.equal(loaded.log_prob(x, y), standard.log_prob(x, y))


def test_class_gaussian_log_prob_difference_is_the_gaussian_formula() -> None:
    flow = prior_model("class-gaussian-unconditional")
    torch.manual_seed(1)
    with torch.no_grad():  # hand-set means: mu_0 = 0, mu_1 = a (and mu_2) random
        for means in flow.class_means:
            means.copy_(torch.randn_like(means))
            means[0] = 0
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    zs, _ = flow.encode(x, torch.zeros(2, dtype=torch.long))  # the same latents for every class
    a = [means[1] for means in flow.class_means]
    # log N(z; a, I) - log N(z; 0, I) = a . z - |a|^2 / 2, summed over the latent parts
    expected = sum((ai * z).sum(dim=(1, 2, 3)) - 0.5 * (ai**2).sum() for ai, z in zip(a, zs, strict=True))
    difference = flow.log_prob(x, torch.ones(2, dtype=torch.long)) - flow.log_prob(x, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(difference, expected, rtol=1e-10, atol=1e-10)
    # Unconditional couplings: the label changes only the base, never the latent or the log-det.
    zs_2, logdet_2 = flow.encode(x, torch.full((2,), 2))
    assert all(torch.equal(z, z2) for z, z2 in zip(zs, zs_2, strict=True))
    assert torch.equal(flow.encode(x, torch.zeros(2, dtype=torch.long))[1], logdet_2)


def test_class_diagonal_log_prob_difference_is_the_gaussian_formula() -> None:
    flow = prior_model("class-diagonal-unconditional")
    torch.manual_seed(1)
    with torch.no_grad():  # hand-set: class 0 N(0, I), class 1 N(a, diag(exp(2 s)))
        for means, log_scales in zip(flow.class_means, flow.class_log_scales, strict=True):
            means.copy_(torch.randn_like(means))
            log_scales.copy_(0.3 * torch.randn_like(log_scales))
            means[0], log_scales[0] = 0, 0
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    zs, _ = flow.encode(x, torch.zeros(2, dtype=torch.long))
    a, s = [m[1] for m in flow.class_means], [ls[1] for ls in flow.class_log_scales]
    # log N(z; a, e^{2s}) - log N(z; 0, 1) = -(z - a)^2 / (2 e^{2s}) - s + z^2 / 2, summed over every element
    expected = sum((-0.5 * (z - ai) ** 2 * torch.exp(-2 * si) - si + 0.5 * z**2).sum(dim=(1, 2, 3))
                   for ai, si, z in zip(a, s, zs, strict=True))
    difference = flow.log_prob(x, torch.ones(2, dtype=torch.long)) - flow.log_prob(x, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(difference, expected, rtol=1e-10, atol=1e-10)


def test_class_diagonal_samples_spread_by_the_class_scale() -> None:
    flow = prior_model("class-diagonal-unconditional")
    with torch.no_grad():
        for log_scales in flow.class_log_scales:
            log_scales.fill_(0.0)
            log_scales[1] = math.log(3.0)
    y = torch.tensor([0] * 200 + [1] * 200)
    zs, _ = flow.encode(flow.sample(y, temperature=0.5, generator=torch.Generator().manual_seed(0)), y)
    means = flow.prior(y)[0]
    spread = [torch.cat([(z - m)[y == k].flatten() for z, m in zip(zs, means, strict=True)]).std() for k in (0, 1)]
    torch.testing.assert_close(torch.stack(spread), torch.tensor([0.5, 1.5], dtype=torch.float64), rtol=0.03, atol=0)


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_attribution_sums_to_log_prob(prior: str, dtype: torch.dtype, tolerance: float) -> None:
    flow = prior_model(prior, dtype)
    x = torch.rand(3, 1, 8, 8, dtype=dtype)
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        heat, log_p = flow.attribution(x, y), flow.log_prob(x, y)
    assert heat.shape == x.shape
    torch.testing.assert_close(heat.sum(dim=(1, 2, 3)), log_p, rtol=0, atol=tolerance)


@pytest.mark.parametrize("prior", list(PRIORS))
def test_class_log_probs_equal_per_class_log_probs_in_one_pass_when_unconditional(prior: str) -> None:
    flow = prior_model(prior)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    batches = []  # batch size of every call of the first flow step
    flow.layers[0].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    scores = flow.class_log_probs(x)
    passes = 1 if PRIORS[prior].get("conditional_couplings") is False else 3
    assert batches == [passes * 5]
    per_class = torch.stack([flow.log_prob(x, torch.full((5,), k)) for k in range(3)], dim=1)
    torch.testing.assert_close(scores, per_class, rtol=0, atol=1e-5)
    assert scores.std(dim=1).min() > 1e-6  # the class matters, also when only the base sees it


@pytest.mark.parametrize("prior", ["class-gaussian", "class-gaussian-unconditional", "class-diagonal-unconditional"])
def test_samples_at_a_tiny_temperature_encode_to_the_class_means(prior: str) -> None:
    flow = prior_model(prior)
    y = torch.tensor([0, 1, 2, 2])
    x = flow.sample(y, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    zs, _ = flow.encode(x, y)
    for z, means in zip(zs, flow.prior(y)[0], strict=True):
        torch.testing.assert_close(z, means.detach(), rtol=0, atol=1e-5)
    first = flow.prior(y)[0][0]
    assert (first[0] - first[1]).abs().mean() > 0.05  # the classes' means start apart


@pytest.mark.usefixtures("one_thread")
def test_hybrid_training_with_unconditional_couplings_separates_two_toy_classes() -> None:
    """Two dozen steps of bits/dim + cross-entropy on bright vs dark images: only the class means can tell the
    classes apart, and they learn to."""
    torch.manual_seed(0)
    y = torch.arange(16) % 2
    x = (0.25 + 0.5 * y[:, None, None, None] + 0.1 * (torch.rand(16, 1, 8, 8) - 0.5)).clamp(0, 1)
    x = torch.round(x * 255) / 255  # 8-bit data, as training dequantises
    flow = MagicFlow(tiny_config(num_classes=2, prior="class_gaussian", conditional_couplings=False))
    flow.initialize(x, y)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(24):
        loss = flow.training_loss(dequantize(x, generator), y, ce_weight=1.0).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    flow.eval()
    with torch.no_grad():
        accuracy = (flow.class_log_probs(x).argmax(1) == y).float().mean()
    assert accuracy >= 0.9 and losses[-1] < losses[0]


def test_class_means_are_class_conditioning_and_class_shaped() -> None:
    conditional, unconditional = prior_model("class-gaussian"), prior_model("class-gaussian-unconditional")
    means = ["class_means.0", "class_means.1", "class_means.2"]
    # --init-from re-initialises class-shaped entries when the class set differs: the means are among them.
    assert set(means) < set(conditional.class_entries())
    assert unconditional.class_entries() == means  # unconditional couplings have nothing else class-shaped
    assert "class_means.*" in conditional.parameter_groups()["conditioning"]
    assert "*.embed.*" in conditional.parameter_groups()["conditioning"]
    assert unconditional.parameter_groups()["conditioning"] == ["class_means.*"]
    assert "class_means.*" not in prior_model("standard").parameter_groups()["conditioning"]
    diagonal = prior_model("class-diagonal-unconditional")
    assert diagonal.class_entries() == means + ["class_log_scales.0", "class_log_scales.1", "class_log_scales.2"]
    assert diagonal.parameter_groups()["conditioning"] == ["class_means.*", "class_log_scales.*"]


@pytest.mark.parametrize("prior", ["standard", "class-diagonal-unconditional"])
def test_per_level_temperatures_scale_each_latent_part_alone(prior: str) -> None:
    """One temperature per latent part (finest first): a part at 0 decodes its prior mean, the others keep their
    spread, and a number is the same as that number at every level."""
    flow = prior_model(prior)
    y = torch.tensor([0, 1, 2, 2])
    levels = len(flow.latent_shapes)
    same = [flow.sample(y, t, torch.Generator().manual_seed(4)) for t in (0.7, [0.7] * levels)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    zs, _ = flow.encode(flow.sample(y, [1.0] + [0.0] * (levels - 1), torch.Generator().manual_seed(4)), y)
    means, log_scales = flow.prior(y)
    for z, mu in zip(zs[1:], means[1:], strict=True):
        torch.testing.assert_close(z, mu.detach(), rtol=0, atol=1e-6)
    spread = ((zs[0] - means[0]) / log_scales[0].exp()).std().item()
    assert 0.7 < spread < 1.3, spread  # the finest part: unit-temperature draws


def test_per_level_temperatures_need_one_value_per_latent_part() -> None:
    flow = prior_model("standard")
    with pytest.raises(ConfigError, match=rf"{len(flow.latent_shapes)} for shapes .*got 2"):
        flow.sample(torch.tensor([0]), [1.0, 0.5])


# ------------------------------------------------------------- classifier-free guidance (Ho & Salimans 2022)


def guided_model(prior: str = "standard", coupling: str = "generation") -> MagicFlow:
    torch.manual_seed(0)
    return perturbed(MagicFlow(tiny_config(coupling, prior=prior, label_dropout=0.2)).double().eval())


@pytest.mark.parametrize("coupling", ["generation", "classification"])
@pytest.mark.parametrize("prior", ["standard", "class_diagonal"])
def test_the_guided_model_is_a_flow_with_an_exact_inverse_and_log_det(coupling: str, prior: str) -> None:
    flow = guided_model(prior, coupling)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    labels = flow.guided(torch.tensor([1]), 2.5)

    def flat_latent(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in flow.encode(v, labels)[0]])

    zs, _ = flow.encode(x, labels)
    torch.testing.assert_close(flow.decode(zs, labels), x)
    jac = torch.autograd.functional.jacobian(flat_latent, x, vectorize=True).reshape(64, 64)
    means, log_scales = flow.prior(labels)
    mean, log_scale = (torch.cat([p.flatten() for p in part]) for part in (means, log_scales))
    u = (flat_latent(x) - mean) * torch.exp(-log_scale)
    expected = (-0.5 * (u**2).sum() - 32 * math.log(2 * math.pi) - log_scale.sum()
                + torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.log_prob(x, labels)[0], expected.detach())


def test_guidance_one_is_the_conditional_model_and_zero_the_null_label() -> None:
    flow = guided_model("class_gaussian")
    x, y = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    null = torch.full_like(y, 3)
    from augflow.flows.coupling import Guided

    torch.testing.assert_close(flow.log_prob(x, Guided(y, 3, 1.0)), flow.log_prob(x, y))
    torch.testing.assert_close(flow.log_prob(x, Guided(y, 3, 0.0)), flow.log_prob(x, null))
    assert (flow.log_prob(x, Guided(y, 3, 2.0)) - flow.log_prob(x, y)).abs().min() > 1e-6
    draw = lambda g: flow.sample(y, 0.7, torch.Generator().manual_seed(1), guidance=g)  # noqa: E731
    assert torch.equal(draw(1.0), flow.sample(y, 0.7, torch.Generator().manual_seed(1)))
    assert (draw(3.0) - draw(1.0)).abs().max() > 1e-6
    assert flow.class_log_probs(x).shape == (3, 3)  # the null label is never a class


def test_label_dropout_replaces_that_share_of_the_labels_by_the_null_label() -> None:
    flow = guided_model()
    y = torch.arange(3).repeat(2000)
    dropped = flow.training_labels(y, torch.Generator().manual_seed(0))
    is_null = dropped == 3
    assert abs(is_null.float().mean().item() - 0.2) < 0.02  # 6,000 draws: std 0.005
    assert torch.equal(dropped[~is_null], y[~is_null])
    plain = prior_model("standard")
    assert plain.training_labels(y) is y


def test_guidance_needs_a_model_trained_with_label_dropout() -> None:
    with pytest.raises(ConfigError, match=r"guidance 2 needs a model trained with label dropout \(model.label_dropout"):
        prior_model("standard").sample(torch.tensor([0]), guidance=2.0)


def test_per_sample_gradients_of_dropped_labels_equal_one_backward_per_sample() -> None:
    """DP-SGD with label dropout: a sample trained under the null label gets its own exact gradient."""
    flow = guided_model("class_gaussian")
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])  # the second under the null label
    grads, _ = PerSampleGradients(Objective(flow, ce_weight=0.0))(x, y)
    for i in range(3):
        flow.zero_grad()
        flow.training_loss(x[i : i + 1], y[i : i + 1]).sum().backward()
        for name, p in flow.named_parameters():
            torch.testing.assert_close(grads[f"model.{name}"][i], p.grad, msg=name)
    assert grads["model.class_means.0"][1][3].abs().sum() > 0  # the null label's own prior mean is trained
