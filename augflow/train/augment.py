"""Light training augmentation: whole-pixel shifts, Gaussian noise and (off by default) a small rotation.

The MAGIC-Flow reference rotates (± 3 degrees) and shifts (± 2 px) with bilinear resampling. Resampling is a
low-pass filter: it erases the acquisition signature that tells scanners apart (noise level and texture, k-space
ringing), and a generator trained on resampled images learns images of no scanner. Measured on the built-in scanner
data at 32 px: a ResNet-18 trained on the real training images recognises them at 0.92 balanced accuracy, the same
images after the reference's rotation and shift at 0.28 (noise alone: 0.91), and the 32 px scanner-recipe MAGIC-Flow
trained with them drew samples of TrioTim PPMI, Prisma and Prisma Fit that it recognised 0% of the time. Shifts are
therefore by whole pixels (a copy, no resampling), and rotation is off unless asked for.

Batched on the device with an explicit ``torch.Generator`` so a training step is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from augflow.train.recipe import AugmentConfig


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly shift (by whole pixels, up to ± ``shift_px``), rotate (± ``rotation_deg``, resampled) and add
    noise to images in [0, 1].

    Arguments:
        x: (B, C, H, W) images in [0, 1].
        config: The augmentation settings.
        generator: Source of randomness (on ``x.device``).

    Returns:
        Augmented images, clipped to [0, 1].
    """
    if not config.enabled:
        return x
    if config.rotation_deg > 0:
        x = _rotate(x, config.rotation_deg, generator)
    s = int(config.shift_px)
    if s > 0:
        x = _shift(x, s, generator)
    if config.noise_std > 0:
        x = x + config.noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.clamp(0, 1)


def _shift(x: torch.Tensor, s: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by whole pixels in [-s, s] along both axes, filling with zeros (no resampling)."""
    b, _, h, w = x.shape
    offsets = torch.randint(-s, s + 1, (b, 2), generator=generator, device=x.device).tolist()
    padded = F.pad(x, (s, s, s, s))
    return torch.stack([padded[i, :, s - dy:s - dy + h, s - dx:s - dx + w] for i, (dy, dx) in enumerate(offsets)])


def _rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by an angle in [-degrees, degrees] about its centre (bilinear resampling)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
