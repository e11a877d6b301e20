"""Public data under DP: the images of the application mask and of ActNorm's initialisation.

Nothing of the private training data may shape the released model outside the accounted DP-SGD steps, so the
data-dependent parts of a model come from the MNI152 template shipped with nilearn instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from augflow.data.phantom import template_slices
from augflow.errors import ConfigError, PrivacyError
from augflow.flows import brain_mask_from_images
from augflow.models import ModelFamily


def template_images(shape: tuple[int, int, int]) -> Tensor:
    """Public images: the 11 central coronal slices of the MNI152 T1 template shipped with nilearn.

    Oriented and framed as the built-in data and ``augflow prepare`` show slices (superior up, neurological,
    197 mm square field of view), resized with anti-aliasing and scaled so the 99.5th percentile of brain pixels
    is 1. Nothing of the training data enters them.

    Arguments:
        shape: ``(C, H, W)``; the gray image is repeated over the ``C`` channels.

    Returns:
        ``(11, C, H, W)`` float32 in ``[0, 1]``.

    Raises:
        PrivacyError: If the template is missing.
    """
    channels, height, width = shape
    try:
        images = template_slices("t1", max(height, width))  # (11, S, S)
    except ConfigError as e:
        raise PrivacyError(f"{e}, or give a public mask with train.app_mask") from None
    brain = images > 0.02
    images = np.clip(images / np.percentile(images[brain], 99.5), 0, 1)
    x = torch.from_numpy(images).float()[:, None]  # (11, 1, S, S)
    if (height, width) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(height, width), mode="area").clamp(0, 1)
    return x.expand(-1, channels, -1, -1).contiguous()


def template_mask(height: int, width: int) -> Tensor:
    """The application mask from public data: Otsu on the mean of :func:`template_images` (as the non-private
    path does on the training mean image)."""
    return brain_mask_from_images(template_images((1, height, width)))


@torch.no_grad()
def public_initialize(model: ModelFamily, how: str) -> None:
    """Initialise a model without private data: ``"identity"`` leaves ActNorm at the identity; ``"template"``
    runs the family's data-dependent ``initialize`` on :func:`template_images` (labels cycling over the classes;
    the couplings start as the identity, so the labels do not change ActNorm's statistics)."""
    if how == "identity":
        return
    ref = next(model.parameters())
    x = template_images(model.config.image_shape).to(ref.device, ref.dtype)
    y = torch.arange(len(x), device=ref.device) % model.config.num_classes
    model.initialize(x, y)
