"""Light training augmentation of the MAGIC-Flow reference: small rotation, shift and Gaussian noise.

Batched on the device with an explicit ``torch.Generator`` so a training step is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from augflow.train.recipe import AugmentConfig


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly rotate (± ``rotation_deg``), shift (± ``shift_px``) and add noise to images in [0, 1].

    Arguments:
        x: (B, C, H, W) images in [0, 1].
        config: The augmentation settings.
        generator: Source of randomness (on ``x.device``).

    Returns:
        Augmented images, clipped to [0, 1].
    """
    if not config.enabled:
        return x
    b, _, h, w = x.shape
    uniform = torch.rand(b, 3, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    angle = uniform[:, 0] * math.radians(config.rotation_deg)
    # affine_grid works in normalised coordinates [-1, 1]: a shift of s pixels is 2 s / size.
    shift_x = uniform[:, 1] * 2 * config.shift_px / w
    shift_y = uniform[:, 2] * 2 * config.shift_px / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.noise_std > 0:
        x = x + config.noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.clamp(0, 1)
