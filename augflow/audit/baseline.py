"""The downstream CNN: a ResNet-18 trained from scratch on single-channel slices.

One fixed recipe, used wherever augflow needs "a standard classifier": the downstream utility protocol of the
audit (train on real, real + synthetic, synthetic; test on held-out real) and the domain feature space of the
fidelity metrics. torchvision's ``resnet18(weights=None)`` (He et al. 2016, arXiv 1512.03385) with one input
channel, class-weighted cross-entropy (inverse class frequency), AdamW (Loshchilov & Hutter 2019, arXiv
1711.05101) with a cosine learning-rate decay (Loshchilov & Hutter 2017, arXiv 1608.03983) and a light random
shift. The same seed gives the same model. Budgets are epochs, never wall-clock seconds, so that a figure
reproduces on a slower machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from tqdm.auto import tqdm

from augflow.errors import ConfigError, DataError
from augflow.precision import autocast

SMALL_IMAGE = 32  # up to this side the CIFAR-style stem (stride 1) is used
MEDIUM_IMAGE = 64  # up to this side a 3x3 stride-2 stem without max-pool
CHANNELS_LAST = torch.channels_last
_RECALIBRATE = 512  # images over which BatchNorm statistics are recomputed after training


def build_resnet18(num_classes: int, image_size: int, in_channels: int = 1) -> nn.Module:
    """ResNet-18 for ``in_channels``-channel images of side ``image_size``, randomly initialised.

    For small images (side <= 32) the 7x7 stride-2 stem and its max-pool are replaced by a 3x3 stride-1
    convolution, as in ResNet's CIFAR variant: the standard stem downsamples 4x before the first residual
    block, so a 32 px slice would reach layer4 as 1x1 and fine texture (noise, ringing, contrast) would be lost
    before it is seen. Up to 64 px the stem is a 3x3 stride-2 convolution without max-pool: it still sees every
    pixel, and costs a quarter of the stride-1 stem (measured at 64 px on 1 CPU thread: 0.125 s per training
    image with stride 1, which left a ResNet-18 two epochs in a 5-minute budget). From 128 px on the ImageNet
    stem is kept; it is what makes large images affordable.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, but is: {num_classes}")
    model = resnet18(weights=None, num_classes=num_classes)
    if image_size <= MEDIUM_IMAGE:
        stride = 1 if image_size <= SMALL_IMAGE else 2
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return model


def class_weights(labels: np.ndarray, num_classes: int, sample_weight: np.ndarray | None = None) -> torch.Tensor:
    """Inverse class frequency, normalised so that the weighted mean over the training images is 1.

    ``w_k = N / (K' * n_k)`` over the K' classes present; absent classes get 0 (they never occur in the loss).
    With ``sample_weight``, ``n_k`` and ``N`` are sums of the images' weights.
    """
    counts = np.bincount(labels, weights=sample_weight, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` px per image, zero-filled (the background is 0).

    No flips: left/right and up/down carry anatomy and orientation in medical images.
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _check(images: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None) -> None:
    if images.ndim != 4:
        raise DataError(f"images must be (N, C, H, W), but have shape {images.shape}")
    if labels is not None:
        if len(labels) != len(images):
            raise DataError(f"labels ({len(labels)}) and images ({len(images)}) differ in length")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"labels must be in [0, {num_classes}), but range over [{labels.min()}, {labels.max()}]")


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimiser steps of one pass over ``n_images`` (the last batch may be smaller)."""
    return math.ceil(n_images / batch_size)


def train_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 30,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    weighted: bool = True,
    weight_decay: float = 0.05,
    amp: bool = False,
    sample_weight: np.ndarray | None = None,
    init: nn.Module | None = None,
    bn_images: np.ndarray | None = None,
    soft_targets: np.ndarray | None = None,
) -> nn.Module:
    """Train the baseline ResNet-18 (from scratch, or from ``init``) with a cosine learning-rate decay.

    Arguments:
        images: float32 (N, C, H, W) in [0, 1].
        labels: int (N,) in [0, num_classes).
        num_classes: K.
        epochs: Passes over the data.
        steps: Train for exactly this many optimiser steps instead (the last pass is cut short): training sets of
            different sizes then get the same number of updates.
        batch_size: Images per step (an epoch's batches are split evenly, never of size 1, for BatchNorm).
        lr: Peak AdamW learning rate.
        seed: Seeds the initialisation, the shuffling and the augmentation.
        device: "cpu", "cuda" or "cuda:N".
        progress: Show a progress bar over epochs.
        weighted: Class-weighted cross-entropy (inverse class frequency); False for the plain loss.
        weight_decay: AdamW's decoupled weight decay.
        amp: bf16 autocast (:mod:`augflow.precision`; the caller checks that the device supports it).
        sample_weight: A loss weight per image (N,), e.g. below 1 for synthetic images; the class weights are
            then computed from the weighted counts. Default: every image 1.
        init: A trained ResNet-18 of the same shape to start from (fine-tuning, e.g. after pretraining on
            synthetic images); default: a fresh initialisation.
        bn_images: The images whose statistics BatchNorm keeps for evaluation (e.g. the real images of a set
            mixed with synthetic ones: the test images are real); default: the training images.
        soft_targets: A target distribution per image (N, K), e.g. a real-trained classifier's posterior for
            synthetic images (soft labels); the class weights still follow ``labels``. Default: one-hot ``labels``.

    Returns:
        The model in eval mode.

    Raises:
        ConfigError: on an invalid argument. DataError: on inconsistent images/labels.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    _check(images, labels, num_classes)
    if len(images) < 2:
        raise DataError(f"train_cnn needs at least 2 images, but got {len(images)}")
    if epochs < 1 or batch_size < 2 or lr <= 0 or (steps is not None and steps < 1):
        raise ConfigError(f"epochs >= 1, steps >= 1, batch_size >= 2 and lr > 0 are required, but got {epochs}, "
                          f"{steps}, {batch_size}, {lr}")
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        # channels-last: oneDNN's fast (AMX / AVX-512) convolution kernels work in NHWC; measured 11 vs 15 ms per
        # training image under bf16 on this CPU, and no slower in float32.
        model = build_resnet18(num_classes, images.shape[-1], images.shape[1])
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(dev, memory_format=CHANNELS_LAST)
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != labels.shape or not (sample_weight >= 0).all() or sample_weight.sum() <= 0:
            raise ConfigError(f"sample_weight must be {labels.shape[0]} non-negative numbers, not all 0, but has "
                              f"shape {sample_weight.shape} and minimum {sample_weight.min(initial=0):g}")
    if soft_targets is not None:
        soft_targets = torch.as_tensor(np.asarray(soft_targets, dtype=np.float32))
        if soft_targets.shape != (len(labels), num_classes) or not torch.allclose(soft_targets.sum(1), torch.ones(1)) \
                or (soft_targets < 0).any():
            raise ConfigError(f"soft_targets must be {len(labels)} probability rows over {num_classes} classes "
                              f"(non-negative, each summing to 1), but has shape {tuple(soft_targets.shape)}")
    weight = class_weights(labels, num_classes, sample_weight).to(dev) if weighted else None
    plain = sample_weight is None and soft_targets is None
    per_image = torch.ones(len(labels)) if sample_weight is None else torch.from_numpy(sample_weight).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = steps_per_epoch(len(images), batch_size)
    total_steps = epochs * n_batches if steps is None else steps
    epochs = math.ceil(total_steps / n_batches)
    max_shift = max(1, round(images.shape[-1] / 16))  # 2 px at 32 px

    # BatchNorm statistics are recomputed after training on up to _RECALIBRATE images.
    bn_x = x_all if bn_images is None else torch.from_numpy(np.asarray(bn_images, dtype=np.float32))
    if bn_x.shape[1:] != x_all.shape[1:] or len(bn_x) < 2:
        raise ConfigError(f"bn_images must be at least 2 images of shape {tuple(x_all.shape[1:])}, but got "
                          f"{tuple(bn_x.shape)}")
    recalibrate = bn_x[torch.randperm(len(bn_x), generator=generator)[:_RECALIBRATE]]
    model.train()
    step = 0
    for _ in tqdm(range(epochs), desc="cnn", unit="epoch", disable=not progress, dynamic_ncols=True, leave=False):
        for rows in torch.randperm(len(images), generator=generator).tensor_split(n_batches):
            if step == total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            x = _shift(x_all[rows], max_shift, generator).to(dev, memory_format=CHANNELS_LAST)
            with autocast(dev, amp):
                logits = model(x)
            y = y_all[rows].to(dev)
            if plain:
                loss = F.cross_entropy(logits.float(), y, weight=weight)
            else:  # the weighted mean F.cross_entropy takes, with each image's own weight on top of its class's
                target = y if soft_targets is None else soft_targets[rows].to(dev)
                w = per_image[rows].to(dev) * (weight[y] if weight is not None else 1)
                loss = (w * F.cross_entropy(logits.float(), target, reduction="none")).sum() / w.sum().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    _recalibrate_batchnorm(model, recalibrate, batch_size, dev)
    return model.eval()


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Replace BatchNorm's running statistics by their exact averages over the training images.

    The exponential running average (momentum 0.1) is still far from the data's statistics after the few
    hundred steps of a short run, and eval-mode predictions are then near chance; one forward pass with a
    cumulative average fixes that ("precise BN", Wu & Johnson 2021, arXiv 2105.07576).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, len(x), batch_size):
        if len(x) - i >= 2:  # a batch of one has no variance
            model(x[i:i + batch_size].to(device, memory_format=CHANNELS_LAST))
    for m in norms:
        m.momentum = 0.1


@torch.inference_mode()
def _batched(fn, model: nn.Module, images: np.ndarray, batch_size: int, device: str, amp: bool = False) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    _check(images)
    model = model.eval()
    dev = torch.device(device)
    model.to(dev, memory_format=CHANNELS_LAST)
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(dev, amp):
            x = torch.from_numpy(images[i:i + batch_size]).to(dev, memory_format=CHANNELS_LAST)
            out.append(fn(model, x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 256, device: str = "cpu",
                  amp: bool = False) -> np.ndarray:
    """Softmax class probabilities (N, K) of the trained CNN (``amp``: bf16 autocast)."""
    return _batched(lambda m, x: m(x).float().softmax(dim=1), model, images, batch_size, device, amp)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ResNet.forward`` up to, not including, ``fc``: (B, 512) pooled layer4 features."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)  # (B, 512)


def features(model: nn.Module, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Penultimate-layer features (N, 512): the global-average-pooled output of layer4."""
    return _batched(penultimate, model, images, batch_size, device)
