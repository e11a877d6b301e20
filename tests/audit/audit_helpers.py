"""Helpers of the audit tests: tiny class-structured images, dataset files with distinct subjects, a tiny flow."""

import numpy as np
import torch

from augflow.data.store import write_dataset

CLASSES = ["a", "b", "c"]


def blobs(counts, size=16, seed=0, noise=0.1):
    """Class k: grey noise plus a bright square in quadrant k; (images (N, 1, size, size), labels)."""
    rng = np.random.default_rng(seed)
    xs, ys, q = [], [], size // 2
    for k, n in enumerate(counts):
        x = rng.normal(0.3, noise, (n, 1, size, size))
        r, c = divmod(k, 2)
        x[:, :, r * q + 2:r * q + q - 2, c * q + 2:c * q + q - 2] += 0.4
        xs.append(x)
        ys.append(np.full(n, k))
    return np.clip(np.concatenate(xs), 0, 1).astype(np.float32), np.concatenate(ys)


def write_blobs(path, counts, seed, prefix, source="real", images=None, labels=None, provenance=None):
    """A dataset file of :func:`blobs` (or the given images), two slices per subject named ``prefix-NNN``;
    ``provenance`` is added to the default ``{"generator": "test", "seed": seed}``."""
    if images is None:
        images, labels = blobs(counts, seed=seed)
    subjects = [f"{prefix}-{i // 2:03d}" for i in range(len(labels))]
    return write_dataset(path, images, labels, subjects, np.zeros(len(labels)), CLASSES, source=source,
                         provenance={"generator": "test", "seed": seed, **(provenance or {})})


def tiny_flow(path, class_counts, privacy=None):
    """An untrained tiny MAGIC-Flow saved like a trained one (its likelihood ignores membership)."""
    from augflow.flows import MagicFlow, MagicFlowConfig

    torch.manual_seed(0)
    config = MagicFlowConfig(image_shape=(1, 16, 16), num_classes=3, full_res_steps=("application",),
                             channel_steps=1, checker_steps=(1,), hidden_channels=(4, 4), embed_dim=4)
    meta = {"class_names": CLASSES, "class_counts": list(class_counts)}
    if privacy is not None:
        meta["privacy"] = privacy
    MagicFlow(config).save(path, meta=meta)
    return path
