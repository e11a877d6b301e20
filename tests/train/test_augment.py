"""Training augmentation: whole-pixel shifts copy pixels (no resampling), so the noise texture survives."""

import torch

from augflow.train.augment import augment
from augflow.train.recipe import AugmentConfig


def test_shift_copies_pixels_and_keeps_the_noise_texture():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 3:13, 3:13] = 0.5 + 0.1 * torch.randn(64, 1, 10, 10)  # a noisy square well inside the frame
    x = x.clamp(0, 1)
    shifted = augment(x, AugmentConfig(shift_px=2, noise_std=0.0), torch.Generator().manual_seed(0))
    for image, original in zip(shifted, x, strict=True):
        # Every shifted image is the original moved by whole pixels: the same multiset of values, same texture.
        assert torch.equal(image.flatten().sort().values, original.flatten().sort().values)
    moved = sum(not torch.equal(a, b) for a, b in zip(shifted, x, strict=True))
    assert moved > 48  # 24 of 25 offsets move the image


def test_rotation_resamples_and_is_off_by_default():
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert AugmentConfig().rotation_deg == 0
    rotated = augment(x, AugmentConfig(rotation_deg=10, shift_px=0, noise_std=0.0), torch.Generator().manual_seed(0))
    # Bilinear resampling averages neighbours: it lowers the pixel noise (the scanner signature augment.py names).
    assert rotated[:, :, 4:12, 4:12].std() < 0.9 * x[:, :, 4:12, 4:12].std()
    assert torch.equal(augment(x, AugmentConfig(enabled=False), torch.Generator()), x)
