"""Conditional affine coupling of MAGIC-Flow with its two complementary transforms.

With a binary mask ``M`` (``x_A = M * x``, ``x_B = (1 - M) * x``):

    u_B  = x_B * exp(s1(x_A, y)) + t1(x_A, y)
    x'_A = x_A * exp(s2(u_B, y)) + t2(u_B, y)
    z    = M * x'_A + (1 - M) * u_B,    log|det| = sum (1 - M) * s1 + sum M * s2

so every element is transformed in every coupling (RealNVP transforms only one half). The log-scale
is bounded, ``s = 0.5 * tanh(h)`` as in the MAGIC-Flow reference code: a per-step factor within
``[e^-0.5, e^0.5]`` keeps training stable without Glow's ``sigmoid(h + 2)`` asymmetry, and ``h = 0``
gives ``s = 0``, so the zero-initialised networks make the coupling start as the identity.

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, arXiv:1605.08803.
    Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598 (:class:`Guided`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from augflow.errors import ConfigError
from augflow.flows.layers import InvertibleLayer
from augflow.flows.nets import ClassificationNet, GenerationNet

COUPLING_KINDS = ("generation", "classification")


@dataclass(frozen=True)
class Guided:
    """Labels with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598; for flows, TarFlow, Zhai et al.
    2024, arXiv:2412.06329): each coupling network runs under the label and under the null label, and its raw
    log-scale and shift become ``null + weight * (label - null)``. The guided couplings stay affine in the half they
    transform and computed from the other half, so the guided model is a normalizing flow too (exact inverse and
    log-det); ``weight = 1`` is the conditional model, ``0`` the unconditional one.

    Arguments:
        labels: Class labels ``(B,)``.
        null: The null label the model was trained with (label dropout).
        weight: Guidance weight ``w``.
    """

    labels: Tensor
    null: int
    weight: float

    @property
    def shape(self) -> torch.Size:
        return self.labels.shape

    def mix(self, conditional: Tensor, unconditional: Tensor) -> Tensor:
        """``unconditional + weight * (conditional - unconditional)``."""
        return unconditional + self.weight * (conditional - unconditional)


class AffineCoupling(InvertibleLayer):
    """Conditional affine coupling with two conditioning networks (see the module docstring).

    Each network takes a full-shape masked tensor ``(B, C, H, W)`` and labels ``(B,)`` and returns
    a raw log-scale ``h`` and shift ``t`` of the full shape; only the half it transforms is used.

    Arguments:
        mask: Binary float mask broadcastable to ``(B, C, H, W)`` (1 marks part A).
        net_b: Network of the first transform, ``(s1, t1) = net_b(x_A, y)``, acting on part B.
        net_a: Network of the second transform, ``(s2, t2) = net_a(u_B, y)``, acting on part A.
        log_scale_bound: ``s = log_scale_bound * tanh(h)``.
    """

    def __init__(
        self, mask: Tensor, net_b: nn.Module, net_a: nn.Module, log_scale_bound: float = 0.5
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.net_b = net_b
        self.net_a = net_a
        self.log_scale_bound = log_scale_bound

    def _scale_shift(
        self, net: nn.Module, inputs: Tensor, y: Tensor | Guided, part: Tensor
    ) -> tuple[Tensor, Tensor]:
        if isinstance(y, Guided):  # one network call on the batch twice: under the labels, then the null label
            both = net(torch.cat([inputs, inputs]), torch.cat([y.labels, torch.full_like(y.labels, y.null)]))
            raw_scale, shift = (y.mix(*out.to(inputs.dtype).chunk(2)) for out in both)
        else:
            raw_scale, shift = net(inputs, y)  # bf16 under amp (torch.autocast): the transform itself stays exact
            raw_scale, shift = raw_scale.to(inputs.dtype), shift.to(inputs.dtype)
        return part * self.log_scale_bound * torch.tanh(raw_scale), part * shift

    def forward(
        self, x: Tensor, y: Tensor | Guided | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        mask = self.mask
        rest = 1 - mask
        x_a = mask * x
        s1, t1 = self._scale_shift(self.net_b, x_a, y, rest)
        u_b = rest * x * torch.exp(s1) + t1  # zero on part A
        s2, t2 = self._scale_shift(self.net_a, u_b, y, mask)
        z = x_a * torch.exp(s2) + t2 + u_b
        logdet_map = s1 + s2  # (B, C, H, W)
        return z, logdet_map if elementwise else logdet_map.sum(dim=(1, 2, 3))

    def _inverse(self, z: Tensor, y: Tensor | Guided | None) -> tuple[Tensor, Tensor]:
        mask = self.mask
        rest = 1 - mask
        u_b = rest * z
        s2, t2 = self._scale_shift(self.net_a, u_b, y, mask)
        x_a = (mask * z - t2) * torch.exp(-s2)  # zero on part B
        s1, t1 = self._scale_shift(self.net_b, x_a, y, rest)
        x_b = (u_b - t1) * torch.exp(-s1)  # zero on part A
        return x_a + x_b, -(s1 + s2).sum(dim=(1, 2, 3))


def make_coupling_net(
    kind: str,
    in_channels: int,
    num_classes: int,
    hidden: int,
    size: tuple[int, int],
    embed_dim: int = 128,
    num_blocks: int = 1,
    dropout: float = 0.3,
) -> nn.Module:
    """Build one conditioning network of the given kind.

    Arguments:
        kind: ``"generation"`` or ``"classification"``.
        in_channels: Channels ``C`` of the coupling input.
        num_classes: Number of labels ``K``.
        hidden: Feature width.
        size: ``(H, W)`` of the coupling input.
        embed_dim: Label-embedding width.
        num_blocks: Generation blocks (generation network only).
        dropout: Dropout probability (classification network only).

    Raises:
        ConfigError: For an unknown ``kind``.
    """
    if kind == "generation":
        return GenerationNet(in_channels, num_classes, hidden, size, embed_dim, num_blocks)
    if kind == "classification":
        return ClassificationNet(in_channels, num_classes, hidden, size, embed_dim, dropout)
    raise ConfigError(f"coupling must be one of {COUPLING_KINDS}, got {kind!r}")
