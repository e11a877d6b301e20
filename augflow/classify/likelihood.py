"""Likelihood (Bayes) classification with a class-conditional flow.

``log p(y | x) = log p(x | y) + log pi(y) - logsumexp_k (log p(x | k) + log pi(k))`` with the exact flow
likelihood (MAGIC-Flow, arXiv 2510.22070, section "Classification"). The K class likelihoods of a batch come from
the model's ``class_log_probs``: one flow pass over the K-fold repeated batch, or, with unconditional couplings and a
class-Gaussian prior, one pass over the batch itself (IB-INN, Ardizzone et al. 2020, arXiv 2001.06448). The posterior
is calibrated by one temperature fitted on validation data (:mod:`augflow.classify.calibration`) instead of the
reference's fixed 600.

Test-time shift averaging (``shift_radius = r``): ``log p(x | k)`` is averaged over the ``(2r + 1)^2`` whole-pixel
shifts of ``x`` within ``r`` pixels, zero-filled as the training augmentation shifts (:mod:`augflow.train.augment`),
so a class score is less the chance of one placement (test-time augmentation; Shanmugam et al. 2021, arXiv
2011.11156). Every term is still an exact log-likelihood, so each image's attribution maps keep their meaning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from augflow.classify.metrics import Scores
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError
from augflow.models import ModelFamily
from augflow.precision import autocast, resolve_amp
from augflow.runs import resolve_device

PRIORS = ("train", "uniform")


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (B, C, H, W) moved ``dy`` pixels down and ``dx`` right, zero-filled (no resampling)."""
    h, w = x.shape[-2:]
    r = max(abs(dy), abs(dx))
    return F.pad(x, (r, r, r, r))[..., r - dy:r - dy + h, r - dx:r - dx + w]


def check_shift_radius(shift_radius: int, image_size: int) -> None:
    """Raises ConfigError unless ``0 <= shift_radius < image_size / 4`` (a shift must leave the anatomy in view)."""
    if isinstance(shift_radius, bool) or not isinstance(shift_radius, int) or not 0 <= shift_radius < image_size / 4:
        raise ConfigError(f"--shift-radius must be a whole number of pixels from 0 to {(image_size - 1) // 4} for "
                          f"{image_size} px images, but is: {shift_radius!r}")


@torch.inference_mode()
def class_log_likelihoods(model: ModelFamily, x: torch.Tensor, num_classes: int, shift_radius: int = 0) -> torch.Tensor:
    """``log p(x | k)`` for every class k: (B, K), from the model's ``class_log_probs``; with ``shift_radius``,
    averaged over the whole-pixel shifts of ``x`` within that many pixels (module docstring).

    Raises:
        ConfigError: If the model has another number of classes than ``num_classes``, or for a shift radius out of
            range.
    """
    check_shift_radius(shift_radius, x.shape[-1])
    offsets = range(-shift_radius, shift_radius + 1)
    log_p = sum(model.class_log_probs(shifted(x, dy, dx)) for dy in offsets for dx in offsets) / len(offsets) ** 2
    if log_p.shape[1] != num_classes:
        raise ConfigError(f"the model scores {log_p.shape[1]} classes, but {num_classes} are expected")
    return log_p


def log_prior(class_counts, prior: str = "train") -> np.ndarray:
    """``log pi``: training-class frequencies, or uniform.

    Raises:
        ConfigError: For an unknown prior.
    """
    if prior not in PRIORS:
        raise ConfigError(f"--prior must be one of {PRIORS}, but is: {prior!r}")
    counts = np.asarray(class_counts, dtype=np.float64)
    if prior == "uniform":
        counts = np.ones_like(counts)
    return np.log(np.maximum(counts, 1e-12) / counts.sum())


def dataset_log_likelihoods(model: ModelFamily, path: str | Path, batch_size: int = 32, device: str = "auto",
                            amp: bool = False, shift_radius: int = 0) -> np.ndarray:
    """``log p(x | k)`` (N, K) for every image of a dataset file, streamed in batches; ``amp``: the coupling
    networks in bf16 (:mod:`augflow.precision`); ``shift_radius``: averaged over the whole-pixel shifts within that
    many pixels (module docstring)."""
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    model = model.to(dev).eval()
    n, k = len(read_info(path, check_values=False)), model.config.num_classes
    out = []
    for start in range(0, n, batch_size):
        x = torch.from_numpy(read_images(path, np.arange(start, min(start + batch_size, n)))).to(dev)
        with autocast(dev, amp):
            out.append(class_log_likelihoods(model, x, k, shift_radius).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k))


class LikelihoodScorer:
    """Scores of the Bayes classifier: ``log p(x | k)`` of each class, and the log prior.

    Arguments:
        model: A model with an exact likelihood (``has_likelihood``).
        class_counts: The training class counts stored with the model.
        prior: "train" (their frequencies) or "uniform".
        batch_size: Images per batch (each is evaluated K times).
        device: "auto", "cpu" or "cuda[:N]".
        amp: The coupling networks in bf16 (:mod:`augflow.precision`).
        shift_radius: Average each class score over the whole-pixel shifts within this many pixels (0: none).
    """

    score_column = "logp_x_given"

    def __init__(self, model: ModelFamily, class_counts, prior: str = "train", batch_size: int = 32,
                 device: str = "auto", amp: bool = False, shift_radius: int = 0):
        self.model, self.prior, self.batch_size, self.device, self.amp = model, prior, batch_size, device, amp
        self.shift_radius = shift_radius
        self.log_prior = log_prior(class_counts, prior)

    def score(self, path: str | Path) -> Scores:
        log_likelihoods = dataset_log_likelihoods(self.model, path, self.batch_size, self.device, self.amp,
                                                  self.shift_radius)
        return Scores(log_likelihoods, self.log_prior)
