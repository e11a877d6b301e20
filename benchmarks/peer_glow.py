"""A plain Glow, the peer that MAGIC-Flow's throughput is compared with in ``bench_flow.py``.

Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039: ``levels`` blocks of (squeeze, ``steps`` x (ActNorm, invertible
1x1 convolution, affine coupling), split); the coupling network is Glow's conv3x3 -> ReLU -> conv1x1 -> ReLU ->
zero-initialised conv3x3 of width ``width`` on half the channels, with scale ``sigmoid(h + 2)``. Built from augflow's
own ActNorm and LU 1x1 convolution, so the two flows differ only in their coupling networks and hierarchy.
Unconditional (a label argument is accepted and ignored, so both models take the same calls).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from augflow.flows.layers import ActNorm, InvertibleConv1x1, squeeze2d, unsqueeze2d


class GlowCoupling(nn.Module):
    def __init__(self, channels: int, width: int):
        super().__init__()
        half = channels // 2
        self.net = nn.Sequential(nn.Conv2d(half, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1),
                                 nn.ReLU(), nn.Conv2d(width, 2 * (channels - half), 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, a: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(a).to(a.dtype)  # float32 also under amp, like MAGIC-Flow's couplings
        raw, shift = h[:, 0::2], h[:, 1::2]
        return torch.sigmoid(raw + 2), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        scale, shift = self._scale_shift(a)
        return torch.cat([a, (b + shift) * scale], dim=1), torch.log(scale).sum(dim=(1, 2, 3))

    def inverse(self, z: Tensor) -> Tensor:
        a, b = z.chunk(2, dim=1)
        scale, shift = self._scale_shift(a)
        return torch.cat([a, b / scale - shift], dim=1)


class PeerGlow(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int] = (1, 64, 64), steps: int = 8, levels: int = 3,
                 width: int = 128):
        super().__init__()
        c, h, w = image_shape
        self.image_shape, self.num_dims = image_shape, c * h * w
        self.blocks = nn.ModuleList()
        self.latent_shapes = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.blocks.append(nn.ModuleList(
                nn.ModuleList([ActNorm(c), InvertibleConv1x1(c), GlowCoupling(c, width)]) for _ in range(steps)))
            if level < levels - 1:
                c //= 2
                self.latent_shapes.append((c, h, w))
        self.latent_shapes.append((c, h, w))

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h, logdet, log_pz = 2 * x - 1, x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        for level, block in enumerate(self.blocks):
            h = squeeze2d(h)
            for norm, conv, coupling in block:
                h, ld1 = norm(h)
                h, ld2 = conv(h)
                h, ld3 = coupling(h)
                logdet = logdet + ld1 + ld2 + ld3
            if level < len(self.blocks) - 1:
                h, z = h.chunk(2, dim=1)
                log_pz = log_pz - 0.5 * (z * z + math.log(2 * math.pi)).sum(dim=(1, 2, 3))
        log_pz = log_pz - 0.5 * (h * h + math.log(2 * math.pi)).sum(dim=(1, 2, 3))
        return log_pz + logdet + self.num_dims * math.log(2)

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return -(self.log_prob(x, y) - self.num_dims * math.log(256)) / (self.num_dims * math.log(2))

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor | None = None) -> None:
        h = 2 * x - 1
        for level, block in enumerate(self.blocks):
            h = squeeze2d(h)
            for norm, conv, coupling in block:
                norm.initialize(h)
                h = coupling(conv(norm(h)[0])[0])[0]
            if level < len(self.blocks) - 1:
                h = h.chunk(2, dim=1)[0]

    @torch.no_grad()
    def sample(self, y: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        zs = [temperature * torch.randn((y.shape[0], *s), generator=generator, dtype=dtype) for s in self.latent_shapes]
        h = zs[-1]
        for level in reversed(range(len(self.blocks))):
            if level < len(self.blocks) - 1:
                h = torch.cat([h, zs[level]], dim=1)
            for norm, conv, coupling in reversed(self.blocks[level]):
                h = norm.inverse(conv.inverse(coupling.inverse(h)))
            h = unsqueeze2d(h)
        return (h + 1) / 2

