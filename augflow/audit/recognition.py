"""Class recognition: does a classifier trained on the real images recognise each synthetic class as itself?

The fraction of synthetic images of class k that the audit's domain encoder (a ResNet-18 trained on the real
training file, :mod:`augflow.audit.features`) assigns to k, beside the same fraction for the held-out real test
images (the reachable reference). It is the direct question behind a top-up: an image that a real-trained
classifier files under another class teaches a downstream classifier the wrong boundary. Classification accuracy
of generated samples by a real-trained classifier is the "GAN-train / GAN-test" idea of Shmelkov, Schmid & Alahari
(ECCV 2018, arXiv 1807.09499); here per class and against the real reference.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from augflow.audit.baseline import predict_proba


def recognition_rates(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """Per class name: the fraction of its images whose most probable class is their own (None: no images)."""
    predicted = probs.argmax(axis=1)
    return {name: (float(np.mean(predicted[labels == k] == k)) if np.any(labels == k) else None)
            for k, name in enumerate(class_names)}


def class_recognition(encoder: nn.Module, synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray,
                      real_labels: np.ndarray, class_names: list[str], device: str = "cpu") -> dict:
    """Recognition rates of the synthetic and the real test images per class, and their class-balanced means.

    Returns:
        ``{"synthetic": {class: rate}, "real": {class: rate}, "synthetic_mean", "real_mean"}``; the means are over
        the classes that have images in both sets.
    """
    rates = {role: recognition_rates(predict_proba(encoder, x, device=device), y, class_names)
             for role, x, y in (("synthetic", synthetic, synthetic_labels), ("real", real, real_labels))}
    both = [n for n in class_names if rates["synthetic"][n] is not None and rates["real"][n] is not None]
    return {**rates, **{f"{role}_mean": float(np.mean([rates[role][n] for n in both])) if both else None
                        for role in ("synthetic", "real")}}
