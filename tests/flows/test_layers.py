"""Property tests of every MAGIC-Flow bijection: one parametrised suite (float64, tiny, seeded).

Each case is checked for: inverse round trip, log-det against ``slogdet`` of the autograd Jacobian
(after perturbing the zero-initialised layers, so the check is not trivially the identity), batch
independence of the Jacobian, inverse log-det = minus forward log-det, elementwise log-det maps that
sum to the log-det, gradients reaching every parameter, and state-dict round trips.

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
    Ardizzone et al., "Training Normalizing Flows with the Information Bottleneck for Competitive
    Generative Classification" (IB-INN), 2020, arXiv:2001.06448 (the class-Gaussian prior).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from augflow.flows import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvertibleConv1x1,
    MagicFlow,
    MagicFlowConfig,
    Squeeze,
    make_coupling_net,
    make_mask,
)

NUM_CLASSES = 3
LABELS = torch.tensor([0, 2])


def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers are not the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@dataclass
class Case:
    """A bijection seen as ``x (B, *shape) -> z (B, D)`` with its log-det and inverse."""

    module: nn.Module
    shape: tuple[int, int, int]
    forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    inverse: Callable[[Tensor, Tensor], Tensor]
    logdet_map: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (map, expected sum)
    inverse_logdet: Callable[[Tensor, Tensor], Tensor] | None
    data: Callable[[int], Tensor]


def layer_case(layer: nn.Module, shape: tuple[int, int, int]) -> Case:
    layer = perturb(layer.double().eval())
    probe = torch.zeros(1, *shape, dtype=torch.float64)
    out_shape = layer(probe, LABELS[:1])[0].shape[1:]

    def forward(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = layer(x, y)
        return z.flatten(1), logdet

    def inverse(z: Tensor, y: Tensor) -> Tensor:
        return layer.inverse(z.reshape(z.shape[0], *out_shape), y)

    def logdet_map(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return layer(x, y, elementwise=True)[1], layer(x, y)[1]

    def inverse_logdet(z: Tensor, y: Tensor) -> Tensor:
        return layer.inverse(z.reshape(z.shape[0], *out_shape), y, return_logdet=True)[1]

    return Case(
        layer, shape, forward, inverse, logdet_map, inverse_logdet,
        lambda b: torch.randn(b, *shape, dtype=torch.float64),
    )  # fmt: skip


def model_case(coupling: str, **overrides) -> Case:
    """The whole flow as ``x -> f(x, y) - mu_y``: the latent about its prior mean (the mean is a shift, so the
    log-det is the flow's, and a class-Gaussian prior's means receive gradients)."""
    config = MagicFlowConfig(
        image_shape=(2, 8, 8),
        num_classes=NUM_CLASSES,
        coupling=coupling,
        full_res_steps=("application", "channel", "checkerboard"),
        channel_steps=1,
        checker_steps=(1, 1),
        hidden_channels=(8, 8, 8),
        embed_dim=8,
        **overrides,
    )
    model = perturb(MagicFlow(config).double().eval())
    sizes = [c * h * w for c, h, w in model.latent_shapes]

    def forward(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # x -> the standardised latent (z - mu) / sigma
        zs, logdet = model.encode(x, y)
        means, log_scales = model.prior(y)
        eps = [((z - m) * torch.exp(-s)).flatten(1) for z, m, s in zip(zs, means, log_scales, strict=True)]
        return torch.cat(eps, dim=1), logdet - sum(s.flatten(1).sum(1) for s in log_scales)

    def inverse(z: Tensor, y: Tensor) -> Tensor:
        parts = z.split(sizes, dim=1)
        means, log_scales = model.prior(y)
        zs = [p.reshape(m.shape) * torch.exp(s) + m for p, m, s in zip(parts, means, log_scales, strict=True)]
        return model.decode(zs, y)

    def logdet_map(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return model.log_prob_map(x, y), model.log_prob(x, y)

    return Case(
        model, config.image_shape, forward, inverse, logdet_map, None,
        lambda b: torch.rand(b, *config.image_shape, dtype=torch.float64),
    )  # fmt: skip


def coupling_case(net: str, mask: str) -> Case:
    shape = (2, 8, 8)
    nets = [make_coupling_net(net, 2, NUM_CLASSES, 8, (8, 8), embed_dim=8) for _ in range(2)]
    return layer_case(AffineCoupling(make_mask(mask, shape), *nets), shape)


BUILDERS: dict[str, Callable[[], Case]] = {
    "actnorm": lambda: layer_case(ActNorm(3), (3, 4, 4)),
    "conv1x1": lambda: layer_case(InvertibleConv1x1(4), (4, 4, 4)),
    "conv1x1-c1": lambda: layer_case(InvertibleConv1x1(1), (1, 4, 4)),
    "squeeze": lambda: layer_case(Squeeze(), (2, 4, 4)),
    **{
        f"coupling-{net}-{mask}": (lambda net=net, mask=mask: coupling_case(net, mask))
        for net in ("generation", "classification")
        for mask in ("checkerboard", "channel", "application")
    },
    "flowstep": lambda: layer_case(
        FlowStep(
            2,
            AffineCoupling(
                make_mask("checkerboard", (2, 4, 4)),
                *[make_coupling_net("generation", 2, NUM_CLASSES, 4, (4, 4), 8) for _ in range(2)],
            ),
        ),
        (2, 4, 4),
    ),
    "model-generation": lambda: model_case("generation"),
    "model-classification": lambda: model_case("classification"),
    # IB-INN / FlowGMM: a learned mean per class, with conditional and with unconditional couplings.
    "model-class-gaussian": lambda: model_case("classification", prior="class_gaussian"),
    "model-class-gaussian-unconditional": lambda: model_case(
        "generation", prior="class_gaussian", conditional_couplings=False
    ),
    # ... and a learned scale per class too.
    "model-class-diagonal-unconditional": lambda: model_case(
        "generation", prior="class_diagonal", conditional_couplings=False
    ),
}


@pytest.fixture(params=list(BUILDERS), scope="module")
def case_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def case(case_name: str) -> Case:
    torch.manual_seed(0)
    return BUILDERS[case_name]()


def per_sample_blocks(jac: Tensor) -> tuple[Tensor, Tensor]:
    """Split a batch Jacobian ``(B, D_out, B, D_in)`` into its per-sample blocks
    ``(B, D_out, D_in)`` and the cross-sample blocks."""
    batch = jac.shape[0]
    diagonal = torch.stack([jac[b, :, b] for b in range(batch)])
    cross = jac.permute(0, 2, 1, 3)[~torch.eye(batch, dtype=torch.bool)]
    return diagonal, cross


def test_inverse_round_trip(case: Case) -> None:
    x = case.data(2)
    z, _ = case.forward(x, LABELS)
    assert (case.inverse(z, LABELS) - x).abs().max() < 1e-8


def test_logdet_matches_autograd_jacobian(case: Case) -> None:
    x = case.data(2)
    _, logdet = case.forward(x, LABELS)
    jac = torch.autograd.functional.jacobian(
        lambda v: case.forward(v, LABELS)[0], x, vectorize=True
    )  # (B, D, B, C, H, W)
    blocks, cross = per_sample_blocks(jac.reshape(2, jac.shape[1], 2, -1))
    sign, logabsdet = torch.linalg.slogdet(blocks)
    assert torch.all(sign != 0)
    torch.testing.assert_close(logabsdet, logdet.detach(), atol=1e-7, rtol=1e-7)
    assert cross.abs().max() == 0  # samples do not interact (needed for per-sample DP gradients)
    assert logdet.abs().max() > 1e-3 or isinstance(case.module, Squeeze)  # not trivially zero


def test_inverse_logdet_is_minus_forward(case: Case) -> None:
    x = case.data(2)
    z, logdet = case.forward(x, LABELS)
    z = z.detach()
    jac = torch.autograd.functional.jacobian(lambda v: case.inverse(v, LABELS), z, vectorize=True)
    blocks, _ = per_sample_blocks(jac.reshape(2, -1, 2, z.shape[1]))
    torch.testing.assert_close(
        torch.linalg.slogdet(blocks)[1], -logdet.detach(), atol=1e-7, rtol=1e-7
    )
    if case.inverse_logdet is not None:
        torch.testing.assert_close(case.inverse_logdet(z, LABELS), -logdet, atol=1e-9, rtol=1e-9)


def test_elementwise_map_sums_to_logdet(case: Case) -> None:
    x = case.data(2)
    logdet_map, total = case.logdet_map(x, LABELS)
    assert logdet_map.shape == x.shape
    torch.testing.assert_close(logdet_map.sum(dim=(1, 2, 3)), total, atol=1e-9, rtol=1e-9)


def test_gradients_reach_every_parameter(case: Case) -> None:
    x = case.data(2).requires_grad_(True)
    z, logdet = case.forward(x, LABELS)
    (0.5 * (z**2).sum() - logdet.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in case.module.named_parameters():
        if p.numel():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip(case: Case, case_name: str) -> None:
    torch.manual_seed(1)
    other = BUILDERS[case_name]()
    x = case.data(2)
    other.module.load_state_dict(case.module.state_dict())
    z, logdet = case.forward(x, LABELS)
    z_other, logdet_other = other.forward(x, LABELS)
    assert torch.equal(z, z_other) and torch.equal(logdet, logdet_other)
