"""Binary coupling masks of MAGIC-Flow: checkerboard, channel-wise and application-specific.

A mask ``M`` splits a tensor into ``x_A = M * x`` and ``x_B = (1 - M) * x``. Masks are returned as
float tensors that broadcast against ``(B, C, H, W)``. The model flips a mask (``1 - M``) on every
other use of the same kind so that each element is transformed first as often as second.

The application-specific mask is a spatial ``H x W`` brain mask; MAGIC-Flow found it reduces
artifacts outside the anatomy. By default it is derived from the mean training image (Otsu
threshold), with a centred ellipse as the fallback when no images are given.

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, arXiv:1605.08803
    (checkerboard and channel-wise masks).
    Otsu, "A threshold selection method from gray-level histograms", IEEE TSMC, 1979.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from augflow.errors import ConfigError

MASK_KINDS = ("application", "checkerboard", "channel")


def checkerboard_mask(height: int, width: int) -> Tensor:
    """Spatial parity mask ``(1, 1, H, W)``: 1 where ``(row + column)`` is even."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == 0).float().view(1, 1, height, width)


def channel_mask(channels: int) -> Tensor:
    """Channel-wise mask ``(1, C, 1, 1)``: 1 on the first ``C // 2`` channels."""
    mask = torch.zeros(1, channels, 1, 1)
    mask[:, : channels // 2] = 1.0
    return mask


def ellipse_mask(height: int, width: int) -> Tensor:
    """A centred ellipse ``(H, W)`` covering most of the field of view: the fallback brain mask."""
    rows = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / (0.42 * height)
    cols = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / (0.36 * width)
    return (rows.view(-1, 1) ** 2 + cols.view(1, -1) ** 2 <= 1.0).float()


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram.

    Arguments:
        values: Any tensor of intensities.
        bins: Number of histogram bins.

    Returns:
        The threshold (a value between the minimum and maximum of ``values``).
    """
    values = values.detach().double().flatten()
    lo, hi = values.min().item(), values.max().item()
    if hi <= lo:
        return lo
    hist = torch.histc(values, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    weight0 = torch.cumsum(hist, 0)  # pixels at or below each cut
    weight1 = hist.sum() - weight0
    mass0 = torch.cumsum(hist * centres, 0)
    mean0 = mass0 / weight0.clamp_min(1)
    mean1 = (mass0[-1] - mass0) / weight1.clamp_min(1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    cut = int(torch.argmax(between[:-1]))
    return float(lo + (cut + 1) * (hi - lo) / bins)


def brain_mask_from_images(images: Tensor | np.ndarray, min_fraction: float = 0.02) -> Tensor:
    """Derive the application-specific mask from training images.

    The mean image (over samples and channels) is thresholded with Otsu's method. If that gives a
    degenerate mask (less than ``min_fraction`` or more than ``1 - min_fraction`` of the pixels),
    the centred ellipse of :func:`ellipse_mask` is returned instead.

    Arguments:
        images: ``(N, H, W)`` or ``(N, C, H, W)`` images, values in any range.
        min_fraction: Smallest accepted fraction of foreground (and of background) pixels.

    Returns:
        A float ``{0, 1}`` tensor of shape ``(H, W)``.

    Raises:
        ConfigError: If ``images`` is not 3-D or 4-D or is empty.
    """
    images = torch.as_tensor(images)
    if images.dim() not in (3, 4) or images.shape[0] == 0:
        raise ConfigError(
            "images must be a non-empty (N, H, W) or (N, C, H, W) array, "
            f"got shape {tuple(images.shape)}"
        )
    mean = images.double().mean(dim=0)
    if mean.dim() == 3:
        mean = mean.mean(dim=0)  # (H, W)
    mask = (mean > otsu_threshold(mean)).float()
    fraction = mask.mean().item()
    if not min_fraction <= fraction <= 1.0 - min_fraction:
        return ellipse_mask(*mask.shape)
    return mask


def load_mask(path: str | Path, height: int, width: int) -> Tensor:
    """Load a user-supplied brain mask from a ``.npy`` file of shape ``(H, W)``.

    Arguments:
        path: The ``.npy`` file; values > 0.5 count as foreground.
        height: Expected ``H``.
        width: Expected ``W``.

    Returns:
        A float ``{0, 1}`` tensor of shape ``(H, W)``.

    Raises:
        ConfigError: If the file is missing, not a ``.npy`` array, or has the wrong shape.
    """
    path = Path(path)
    if path.suffix != ".npy" or not path.is_file():
        raise ConfigError(f"mask file must be an existing .npy file, got {str(path)!r}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ConfigError(f"mask file {str(path)!r} is not a numeric .npy array: {err}") from err
    return as_app_mask(array, height, width, name=f"mask file {str(path)!r}")


def as_app_mask(
    mask: Tensor | np.ndarray, height: int, width: int, name: str = "app_mask"
) -> Tensor:
    """Validate and binarise an application mask to a float ``{0, 1}`` tensor ``(H, W)``.

    Raises:
        ConfigError: If the shape is not ``(H, W)`` (a leading singleton channel is accepted).
    """
    if isinstance(mask, np.ndarray):
        mask = torch.as_tensor(np.asarray(mask, dtype=np.float64))
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != (height, width):
        raise ConfigError(
            f"{name} must have shape (H, W) = ({height}, {width}), got {tuple(mask.shape)}"
        )
    return (mask.detach().float().cpu() > 0.5).float()


def make_mask(kind: str, shape: tuple[int, int, int], app_mask: Tensor | None = None) -> Tensor:
    """Build a coupling mask of the given kind for tensors of shape ``(C, H, W)``.

    Arguments:
        kind: ``"checkerboard"``, ``"channel"`` or ``"application"``.
        shape: ``(C, H, W)`` of the tensor the coupling acts on.
        app_mask: ``(H, W)`` brain mask, required for ``"application"``.

    Returns:
        A float mask broadcastable to ``(B, C, H, W)``.

    Raises:
        ConfigError: For an unknown kind, a channel mask with fewer than 2 channels, or an
            application mask of the wrong shape.
    """
    channels, height, width = shape
    if kind == "checkerboard":
        return checkerboard_mask(height, width)
    if kind == "channel":
        if channels < 2:
            raise ConfigError(f"a channel-wise mask needs at least 2 channels, got {channels}")
        return channel_mask(channels)
    if kind == "application":
        if app_mask is None:
            app_mask = ellipse_mask(height, width)
        return as_app_mask(app_mask, height, width).view(1, 1, height, width)
    raise ConfigError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
