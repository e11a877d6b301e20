"""MedSymmFlow model: paths and velocity targets, palette, shapes, config errors, save/load, torch.func."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from augflow.errors import ConfigError
from augflow.models import load_model, model_config
from augflow.symmflow import SymmFlow, SymmFlowConfig, class_colours, interpolate, palette, velocity_targets
from augflow.symmflow.model import shift_time, unshift_time
from augflow.symmflow.palette import class_masks, colour_distances, dequantize_mask, palette_indices

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
            steps=3)


def tiny(shape=(1, 8, 8), k=3, **kw) -> SymmFlow:
    torch.manual_seed(0)
    return SymmFlow(SymmFlowConfig(image_shape=shape, num_classes=k, **{**TINY, **kw}))


def _noise(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]


def test_interpolation_endpoints():
    z, m, eps_z, eps_m = _noise((2, 3, 4, 4))
    s = 1e-4
    z0, m0 = interpolate(z, m, eps_z, eps_m, torch.zeros(2, dtype=torch.float64), s)
    torch.testing.assert_close(z0, eps_z)  # t=0: image part is noise
    torch.testing.assert_close(m0, m)  # t=0: mask part is the clean mask
    z1, m1 = interpolate(z, m, eps_z, eps_m, torch.ones(2, dtype=torch.float64), s)
    torch.testing.assert_close(z1, z + s * eps_z)  # t=1: the data (up to sigma_min)
    torch.testing.assert_close(z1, z, atol=1e-3, rtol=0)
    torch.testing.assert_close(m1, eps_m + s * m)  # t=1: the mask is noise
    torch.testing.assert_close(m1, eps_m, atol=1e-3, rtol=0)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.97])
def test_velocity_targets_are_time_derivatives(t):
    z, m, eps_z, eps_m = _noise((2, 3, 4, 4), seed=1)
    s, h = 1e-4, 1e-6
    lo = interpolate(z, m, eps_z, eps_m, torch.full((2,), t - h, dtype=torch.float64), s)
    hi = interpolate(z, m, eps_z, eps_m, torch.full((2,), t + h, dtype=torch.float64), s)
    v_z, v_m = velocity_targets(z, m, eps_z, eps_m, s)
    torch.testing.assert_close((hi[0] - lo[0]) / (2 * h), v_z, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close((hi[1] - lo[1]) / (2 * h), v_m, atol=1e-8, rtol=1e-7)


def test_palette():
    colours = palette()
    assert colours.shape == (64, 3) and len({tuple(c) for c in colours}) == 64
    assert set(np.unique(colours)) == {0, 75, 150, 225}
    assert palette_indices(2).tolist() == [0, 63] and palette_indices(7).tolist() == [0, 10, 21, 32, 42, 52, 63]
    two = class_colours(2)
    torch.testing.assert_close(two[0], torch.full((3,), -1.0))  # black
    torch.testing.assert_close(two[1], torch.full((3,), 225 / 255 * 2 - 1))  # (225, 225, 225)
    assert len({tuple(c.tolist()) for c in class_colours(64)}) == 64


def test_masks_and_distances():
    colours, y = class_colours(3), torch.tensor([0, 2])
    region = torch.zeros(1, 1, 4, 4)
    region[..., 1:3, 1:3] = 1
    semantic = class_masks(colours, region, y)
    assert semantic.shape == (2, 3, 4, 4)
    torch.testing.assert_close(semantic[1, :, 1, 1], colours[2])  # inside the brain: the class colour
    assert torch.all(semantic[:, :, 0, 0] == -1)  # background
    constant = class_masks(colours, torch.ones(1, 1, 4, 4), y)
    d = colour_distances(constant, colours, torch.ones(1, 1, 4, 4))
    assert d.shape == (2, 3) and d.argmin(1).tolist() == [0, 2] and torch.all(d.min(1).values < 1e-6)


def test_shapes_and_interface():
    model = tiny()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    assert model.family == "symmflow" and model.loss_name == "flow-matching loss"
    loss = model.training_loss(x, y)
    assert loss.shape == (4,) and torch.all(torch.isfinite(loss))
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # gradients reach every parameter
    model.initialize(x, y)  # a no-op
    model.eval()
    g = torch.Generator().manual_seed(0)
    samples = model.sample(y, temperature=0.8, generator=g)
    assert samples.shape == (4, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    assert model.class_scores(x, generator=g).shape == (4, 3)
    u = model.uncertainty(x, passes=3, generator=g)
    assert u.distance.shape == (4,) and u.spread.shape == (4,) and torch.all(u.spread >= 0)
    assert torch.all(model.uncertainty(x, passes=1).spread == 0)
    with pytest.raises(ConfigError, match="ce_weight must be 0"):
        model.training_loss(x, y, ce_weight=0.5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.dp_blocker is None  # pixel space: DP-SGD covers every trained weight


def test_sampling_is_seeded_and_heun_runs():
    model = tiny(solver="heun").eval()
    y = torch.tensor([1, 2])
    a = model.sample(y, generator=torch.Generator().manual_seed(3))
    b = model.sample(y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    # Euler with one step from t=0: exactly the initial state plus the velocity there.
    euler = tiny(steps=1).eval()
    state = torch.randn(2, 4, 8, 8)
    v = euler.velocity(state, torch.zeros(2))
    torch.testing.assert_close(euler.integrate(state, 0.0, 1.0), state + v)


def test_semantic_mask_model():
    model = tiny(mask="semantic")
    assert model.region.sum() < 64  # an ellipse inside the field of view
    m = model.class_mask(torch.tensor([2]))
    assert torch.all(m[0, :, 0, 0] == -1)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        SymmFlowConfig.from_dict({"image_shape": (1, 8, 8), "num_classes": 2, "hidden": 3})
    with pytest.raises(ConfigError, match="train-autoencoder"):
        SymmFlowConfig.from_dict({"image_shape": (1, 128, 128), "num_classes": 2})
    assert not SymmFlowConfig.from_dict({"image_shape": (1, 128, 128), "num_classes": 2, "space": "pixel"}).latent
    with pytest.raises(ConfigError, match="model.mask"):
        SymmFlowConfig.from_dict({"image_shape": (1, 8, 8), "num_classes": 2, "mask": "blob"})
    with pytest.raises(ConfigError, match="divisible by 4"):
        SymmFlowConfig.from_dict({"image_shape": (1, 10, 10), "num_classes": 2})
    with pytest.raises(ConfigError, match="model.solver"):
        model_config({"family": "symmflow", "solver": "rk45"}, (1, 8, 8), 2)
    with pytest.raises(ConfigError, match="model.time_shift must be a number > 0"):
        model_config({"family": "symmflow", "time_shift": 0}, (1, 8, 8), 2)


def test_time_shift():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 1.0), u)
    shifted = shift_time(u, 8.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted.diff() > 0)
    assert shifted[50].item() == pytest.approx(8 / 9)  # the median time moves from 1/2 to 8/9
    # the training loss draws its times through the shift: the same draws, recomputed by hand
    model = tiny(k=3, time_shift=8.0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(5)
    loss = model.training_loss(x, y)
    torch.manual_seed(5)
    m = dequantize_mask(model.class_mask(y), model.config.beta)
    t = shift_time(torch.rand(4), 8.0)
    z = model.to_flow(x)
    expected = model.flow_matching_loss(z, m, t, torch.randn_like(z), torch.randn_like(m))
    torch.testing.assert_close(loss, expected)


def test_integration_follows_the_training_times():
    """A shifted model integrates on its training times' grid: steps uniform in u, t = shift_time(u); a part of the
    path gets the model's step size in u (what sample_near integrates)."""
    assert unshift_time(shift_time(torch.tensor(0.3, dtype=torch.float64), 8.0).item(), 8.0) == pytest.approx(0.3)
    model = tiny(time_shift=8.0, steps=4).eval()
    seen = []
    model.velocity = lambda state, t: (seen.append(t[0].item()), torch.ones_like(state))[1]
    state = torch.zeros(2, 4, 8, 8)
    out = model.integrate(state, 1.0, 0.0)
    expected = shift_time(torch.linspace(1, 0, 5, dtype=torch.float64), 8.0)
    assert seen == pytest.approx(expected[:-1].tolist(), abs=1e-7)
    torch.testing.assert_close(out, state - 1)  # a constant velocity moves the state by the span, whatever the grid
    seen.clear()
    model.integrate(state, 0.5, 1.0)  # u from 1/9 to 1: round(4 * 8/9) = 4 steps
    assert seen[0] == pytest.approx(0.5) and len(seen) == 4
    seen.clear()
    model.integrate(state, 1.0, 0.0, shift=1.0)  # another grid on request (benchmarks/symmflow_probe.py): uniform
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_save_load_round_trip(tmp_path):
    model = tiny(k=2, solver="heun").eval()
    with torch.no_grad():  # non-trivial weights (the output layer starts at zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "m.pt", meta={"class_names": ["a", "b"]})
    loaded, meta = load_model(tmp_path / "m.pt", with_meta=True)
    assert isinstance(loaded, SymmFlow) and meta == {"class_names": ["a", "b"]}
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    y = torch.tensor([0, 1])
    torch.testing.assert_close(loaded.sample(y, generator=torch.Generator().manual_seed(1)),
                               model.sample(y, generator=torch.Generator().manual_seed(1)))


class _Call(torch.nn.Module):
    """A module whose forward is one of the model's methods (as the loop's objective wraps training_loss)."""

    def __init__(self, model: SymmFlow, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*args)


def test_per_sample_gradients_with_torch_func():
    """DP-SGD's path: vmap(grad(functional_call)) equals a per-sample loop, and draws noise per sample."""
    model = tiny()
    state = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"model.{k}": v for k, v in model.named_buffers()}
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(0)
    z, m = 2 * x - 1, model.class_mask(y)
    t, eps_z, eps_m = torch.rand(3, generator=g), torch.randn(z.shape, generator=g), torch.randn(m.shape, generator=g)
    fixed = _Call(model, "flow_matching_loss")

    def loss(params, *args):
        return functional_call(fixed, {**params, **buffers}, tuple(a[None] for a in args)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0, 0))(state, z, m, t, eps_z, eps_m)
    for i in range(3):
        model.zero_grad()
        model.flow_matching_loss(z[i:i + 1], m[i:i + 1], t[i:i + 1], eps_z[i:i + 1], eps_m[i:i + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[f"model.{name}"][i], p.grad, rtol=1e-4, atol=1e-6)

    # The real objective draws t and the noise inside; vmap's "different" randomness gives each sample its own.
    objective = _Call(model, "training_loss")

    def random_loss(params, xi, yi):
        return functional_call(objective, {**params, **buffers}, (xi[None], yi[None])).sum()

    twins = vmap(grad(random_loss), in_dims=(None, 0, 0), randomness="different")(state, x[[0, 0]], y[[0, 0]])
    grads = twins["model.unet.out.2.weight"]
    assert torch.all(torch.isfinite(grads)) and not torch.allclose(grads[0], grads[1])
