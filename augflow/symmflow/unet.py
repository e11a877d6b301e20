"""A small, configurable U-Net velocity field in the style of guided diffusion, conditioned only on time.

Structure (Ho et al. 2020; Dhariwal & Nichol 2021): a 3x3 input convolution; per resolution level
``num_res_blocks`` residual blocks (GroupNorm -> SiLU -> conv, with a scale-shift from the time embedding),
self-attention at the chosen downsample factors, a strided-conv downsample; a middle block (residual,
attention, residual); a mirrored decoder with skip connections and nearest-neighbour upsampling; GroupNorm ->
SiLU -> a zero-initialised 3x3 output convolution. Every residual branch ends in a zero-initialised layer, so the
untrained network outputs zero velocity.

Time enters as a sinusoidal embedding of ``t`` in ``[0, 1]`` itself (flow-matching time, not diffusion's
``t x 1000``), as in the MedSymmFlow reference. There is no class embedding: MedSymmFlow conditions through the
mask channels of the input. Only GroupNorm and out-of-place ops are used, so ``torch.func.vmap`` per-sample
gradients (DP-SGD) work.

References:
    Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239.
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, arXiv:2105.05233.
    Caetano et al., "MedSymmFlow", 2025, arXiv:2507.19098.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of times ``t`` ``(B,)`` (frequencies ``max_period ** (-i / half)``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (guided diffusion's), fewer for narrow layers; never BatchNorm (DP-SGD)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with a time-dependent scale and shift after the second normalisation."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the positions of a feature map (used at low resolution only)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * c // self.num_heads, h * w)
        q, k, v = qkv.chunk(3, dim=1)  # each (B*heads, C/heads, HW)
        # Plain matmul + softmax rather than a fused kernel: batching rules for torch.func exist for every op.
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # (B*heads, HW, HW)
        out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of layers where the residual blocks also receive the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Guided-diffusion-style U-Net ``v = f(state, t)`` with ``state`` ``(B, in_channels, H, W)``.

    Arguments:
        in_channels: Input channels (image + mask channels for MedSymmFlow).
        out_channels: Output channels (the velocity of every input channel).
        base_channels: Width of the first level.
        channel_mult: Width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: Residual blocks per level (the decoder has one more per level).
        attention_resolutions: Downsample factors at which self-attention is used (4: at 1/4 resolution).
        num_heads: Attention heads (each level's width must be divisible by it).
        dropout: Dropout inside the residual blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (4,),
        num_heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch, ds = [base_channels], base_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * base_channels, emb_dim, dropout)]
                ch = mult * base_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.down.append(TimestepSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(TimestepSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2

        self.middle = TimestepSequential(ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, num_heads),
                                         ResBlock(ch, ch, emb_dim, dropout))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * base_channels, emb_dim, dropout)]
                ch = mult * base_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.up.append(TimestepSequential(*layers))
        assert not skips  # every encoder output is consumed once by the decoder

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity ``(B, out_channels, H, W)`` at times ``t`` ``(B,)`` in ``[0, 1]``."""
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
