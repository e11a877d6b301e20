"""Diversity: mean MS-SSIM over random image pairs, within each class and across classes.

MS-SSIM (Wang, Simoncelli & Bovik 2003, "Multiscale structural similarity for image quality assessment") of
two samples of the same class is high when a generator produces near-identical images (mode collapse: 1 for a
generator that repeats one image), so a synthetic set's intra-class MS-SSIM should be close to the real one's,
not above it (the AC-GAN diversity test, Odena et al. 2017, arXiv 1610.09585). Pairs are drawn at random
(seeded); the real reference is the real training file, which the generator was fitted to.

pytorch-msssim's size check assumes 4 downsamplings whatever the scale weights, so the method depends on
the image side (recorded with the result): > 160 px the standard MS-SSIM (window 11, 5 scales); 33-160 px
window 3 and 5 scales; 16-32 px window 3 and 2-3 scales (the standard weights of the finest scales,
renormalised to sum 1), computed with the library's per-scale SSIM; < 16 px single-scale SSIM, window 3.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

PAIRS = 500
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first


def ssim_settings(side: int) -> dict:
    """The similarity measure that fits images of this side (see the module docstring)."""
    if side > 160:
        return {"method": "ms-ssim", "win_size": 11, "scales": 5, "weights": list(MS_SSIM_WEIGHTS)}
    if side > 32:
        return {"method": "ms-ssim", "win_size": 3, "scales": 5, "weights": list(MS_SSIM_WEIGHTS)}
    if side >= 16:
        scales = int(math.log2(side / 8)) + 1  # the coarsest scale keeps at least 8 px
        w = np.array(MS_SSIM_WEIGHTS[:scales])
        return {"method": "ms-ssim", "win_size": 3, "scales": scales, "weights": (w / w.sum()).tolist()}
    return {"method": "ssim", "win_size": 3, "scales": 1, "weights": None}


def _few_scale_ms_ssim(x: torch.Tensor, y: torch.Tensor, win_size: int, weights: list[float]) -> torch.Tensor:
    # pytorch_msssim.ms_ssim's loop with fewer scales (its size check would reject these images)
    win = _fspecial_gauss_1d(win_size, 1.5).repeat([x.shape[1], 1, 1, 1])
    mcs = []
    for i in range(len(weights)):
        s, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if i < len(weights) - 1:
            mcs.append(torch.relu(cs))
            padding = [d % 2 for d in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    values = torch.stack([*mcs, torch.relu(s)])  # (scales, B, C)
    return torch.prod(values ** torch.tensor(weights, dtype=x.dtype).view(-1, 1, 1), dim=0).mean(dim=1)


@torch.inference_mode()
def similarity(x: np.ndarray, y: np.ndarray, settings: dict, batch_size: int = 256) -> np.ndarray:
    """Per-pair (MS-)SSIM of images x[i], y[i] (N, C, H, W) in [0, 1]: (N,)."""
    out = []
    for i in range(0, len(x), batch_size):
        a, b = torch.from_numpy(x[i:i + batch_size]).double(), torch.from_numpy(y[i:i + batch_size]).double()
        if settings["method"] == "ssim":
            v = ssim(a, b, data_range=1.0, win_size=settings["win_size"], size_average=False)
        elif settings["scales"] == 5:
            v = ms_ssim(a, b, data_range=1.0, win_size=settings["win_size"], size_average=False)
        else:
            v = _few_scale_ms_ssim(a, b, settings["win_size"], settings["weights"])
        out.append(v.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def random_pairs(labels: np.ndarray, n: int, rng: np.random.Generator, same_class: bool) -> np.ndarray:
    """``n`` random pairs (n, 2) of distinct rows, of the same class or of different classes (empty if none)."""
    labels = np.asarray(labels)
    if same_class:
        if len(labels) < 2:
            return np.zeros((0, 2), dtype=np.int64)
        i = rng.integers(0, len(labels), n)
        j = (i + rng.integers(1, len(labels), n)) % len(labels)  # uniform over the other rows
        return np.stack([i, j], axis=1)
    if len(np.unique(labels)) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = rng.integers(0, len(labels), n), rng.integers(0, len(labels), n)
    while (same := labels[i] == labels[j]).any():  # redraw the second image of same-class pairs
        j[same] = rng.integers(0, len(labels), int(same.sum()))
    return np.stack([i, j], axis=1)


def diversity_of(images: np.ndarray, labels: np.ndarray, class_names: list[str], pairs: int = PAIRS,
                 seed: int = 0) -> dict:
    """Mean (MS-)SSIM of ``pairs`` random pairs within each class and ``pairs`` pairs across classes.

    Returns:
        ``{"intra": mean of the per-class means (None if no class has 2 images), "inter": ..., "per_class":
        {name: mean or None}}``.
    """
    rng = np.random.default_rng(seed)
    settings = ssim_settings(images.shape[-1])
    per_class = {}
    for k, name in enumerate(class_names):
        rows = np.flatnonzero(labels == k)
        p = rows[random_pairs(labels[rows], pairs, rng, same_class=True)]
        per_class[name] = float(similarity(images[p[:, 0]], images[p[:, 1]], settings).mean()) if len(p) else None
    p = random_pairs(labels, pairs, rng, same_class=False)
    inter = float(similarity(images[p[:, 0]], images[p[:, 1]], settings).mean()) if len(p) else None
    present = [v for v in per_class.values() if v is not None]
    return {"intra": float(np.mean(present)) if present else None, "inter": inter, "per_class": per_class}


def diversity(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
              class_names: list[str], pairs: int = PAIRS, seed: int = 0) -> dict:
    """Intra- and inter-class (MS-)SSIM of the synthetic images and of the real reference images.

    Returns:
        ``{"settings": {"method", "win_size", "scales", "weights"}, "pairs", "synthetic": {...}, "real": {...}}``
        with the dicts of :func:`diversity_of`.
    """
    return {"settings": ssim_settings(synthetic.shape[-1]), "pairs": pairs,
            "synthetic": diversity_of(synthetic, synthetic_labels, class_names, pairs, seed),
            "real": diversity_of(real, real_labels, class_names, pairs, seed)}
