"""Class masks of MedSymmFlow: the 64-colour palette, per-class colours and constant or semantic masks.

MedSymmFlow conditions generation and reads out classification through a class *mask*: extra channels of the
joint state that hold a class-specific RGB colour. The palette has 64 colours with components in
``{0, 75, 150, 225}`` (index ``16 r + 4 g + b`` over the levels, so index 0 is black and 63 is
``(225, 225, 225)``); class ``k`` of ``K`` takes palette index ``round(linspace(0, 63, K)[k])`` so the classes'
colours are spread over the palette. Colours are scaled to ``[-1, 1]`` as ``c / 255 * 2 - 1``; during training
the mask is dequantised with ``beta * (U - 0.5) / 127.5``, ``U ~ U(0, 1)``, ``beta = 4``.

A *constant* mask is the class colour everywhere; a *semantic* mask is the class colour inside a fixed brain
region and ``-1`` (black) outside.

References:
    Caetano, Abdi, Viviers, Valiuddin & van der Sommen, "MedSymmFlow: Bridging Generative Modeling and
    Classification in Medical Imaging through Symmetrical Flow Matching", 2025, arXiv:2507.19098.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

PALETTE_LEVELS = (0, 75, 150, 225)
MASK_CHANNELS = 3  # RGB
MASK_KINDS = ("constant", "semantic")


def palette() -> np.ndarray:
    """The 64 palette colours ``(64, 3)`` (uint8 components in ``{0, 75, 150, 225}``), black first."""
    return np.array(list(itertools.product(PALETTE_LEVELS, repeat=3)), dtype=np.uint8)


def palette_indices(num_classes: int) -> np.ndarray:
    """Palette index of each of ``num_classes`` classes: ``round(linspace(0, 63, K))`` (spread colours apart)."""
    return np.rint(np.linspace(0, len(PALETTE_LEVELS) ** 3 - 1, num_classes)).astype(np.int64)


def class_colours(num_classes: int) -> Tensor:
    """Colour of each class ``(K, 3)`` scaled to ``[-1, 1]`` (``c / 255 * 2 - 1``), float32."""
    rgb = palette()[palette_indices(num_classes)].astype(np.float32)
    return torch.from_numpy(rgb / 255.0 * 2.0 - 1.0)


def class_masks(colours: Tensor, region: Tensor, y: Tensor) -> Tensor:
    """Clean class masks ``(B, 3, H, W)``: the class colour inside ``region``, ``-1`` outside.

    Arguments:
        colours: ``(K, 3)`` class colours in ``[-1, 1]``.
        region: ``(1, 1, H, W)`` float {0, 1}; all ones gives the paper's constant mask.
        y: ``(B,)`` labels.
    """
    colour = colours[y][:, :, None, None]  # (B, 3, 1, 1); gathering, not in-place, so torch.func can batch it
    return region * colour - (1 - region)


def dequantize_mask(mask: Tensor, beta: float) -> Tensor:
    """Add ``beta * (U - 0.5) / 127.5`` (the paper's mask dequantisation; ``U`` from torch's global RNG)."""
    return mask + beta * (torch.rand_like(mask) - 0.5) / 127.5


def colour_distances(mask: Tensor, colours: Tensor, region: Tensor) -> Tensor:
    """Mean per-pixel L2 (over RGB) distance of ``mask`` to each class colour, over ``region``: ``(B, K)``.

    Arguments:
        mask: ``(B, 3, H, W)`` integrated masks.
        colours: ``(K, 3)``.
        region: ``(1, 1, H, W)`` {0, 1}: the pixels that carry the class colour.
    """
    diff = mask[:, None] - colours[None, :, :, None, None]  # (B, K, 3, H, W)
    per_pixel = diff.square().sum(dim=2).sqrt()  # (B, K, H, W)
    weight = region[:, 0]  # (1, H, W)
    return (per_pixel * weight).sum(dim=(2, 3)) / weight.sum()
