"""``augflow explain``: likelihood attribution maps of a class-conditional flow, drawn over the images.

The map ``H(x, y)`` splits the exact ``log p(x | y)`` over pixels (MAGIC-Flow, arXiv 2510.22070, section 5;
:meth:`augflow.flows.MagicFlow.attribution` of a model with ``has_likelihood``, whose elements sum to
``log p(x | y)``). Shown centred on the
image's mean contribution, a pixel in red is more typical of class ``y`` than the image's average pixel, one in
blue less. The contrast ``H(x, a) - H(x, b)`` sums to ``log p(x | a) - log p(x | b)``: red where the image looks
more like class ``a`` than like class ``b`` (centred on 0). Maps are masked to the brain (Otsu on each image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from augflow.atomic import atomic_path
from augflow.classify.calibration import stored_calibration
from augflow.classify.likelihood import class_log_likelihoods, log_prior
from augflow.classify.metrics import Calibration
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError
from augflow.flows import brain_mask_from_images
from augflow.models import ModelFamily, load_model
from augflow.runs import check_classes, resolve_class, resolve_device


@dataclass
class Explanation:
    """Maps of some images of a dataset file, and what the classifier said about them."""

    rows: list[int]
    images: np.ndarray  # (N, C, H, W)
    maps: np.ndarray  # (N, C, H, W): H(x, target), or H(x, target) - H(x, contrast)
    masks: np.ndarray  # (N, H, W) brain masks
    labels: np.ndarray  # (N,) labels of the file
    predicted: np.ndarray  # (N,)
    probs: np.ndarray  # (N, K) posterior
    target: np.ndarray  # (N,) class whose map is shown
    contrast: int | None  # class subtracted, or None
    class_names: list[str]


@torch.no_grad()
def attribution_maps(model: ModelFamily, x: torch.Tensor, target: torch.Tensor,
                     contrast: torch.Tensor | None = None) -> torch.Tensor:
    """``H(x, target)``, or ``H(x, target) - H(x, contrast)`` when ``contrast`` is given: ``(B, C, H, W)``."""
    maps = model.attribution(x, target)
    if contrast is not None:
        maps = maps - model.attribution(x, contrast)
    return maps


def explain_file(model_path, data, rows: list[int], class_name: str | None = None, contrast: str | None = None,
                 prior: str = "train", device: str = "auto") -> Explanation:
    """Attribution maps of the given rows of a dataset file (real or synthetic).

    Arguments:
        model_path: Run folder or model file of a MAGIC-Flow.
        data: Dataset file.
        rows: Row indices of the images to explain.
        class_name: Class whose map is shown (default: each image's predicted class).
        contrast: A class name B: show ``H(x, y) - H(x, B)`` instead.
        prior: Prior of the prediction ("train" or "uniform").
        device: "auto", "cpu" or "cuda[:N]".

    Raises:
        ConfigError: For a model without likelihood, unknown classes, or rows outside the file.
    """
    model, meta = load_model(model_path, with_meta=True)
    if not model.has_likelihood:
        raise ConfigError(f"--model {model_path}: likelihood attribution needs a model with an exact likelihood "
                          f"(MAGIC-Flow), but the model is of family {model.family!r}")
    names = meta["class_names"]
    info = read_info(data, check_values=False).require_images("--data")
    check_classes(info.class_names, names, f"--data {data}")
    if not rows:
        raise ConfigError("give at least one --index")
    bad = [r for r in rows if not 0 <= r < len(info)]
    if bad:
        raise ConfigError(f"--index {bad[0]} is outside {data}, which has rows 0..{len(info) - 1}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    images = read_images(data, np.asarray(rows))
    x = torch.from_numpy(images).to(dev)
    calibration = stored_calibration(model_path, prior, names) or Calibration()
    log_lik = class_log_likelihoods(model, x, len(names), calibration.shift_radius).double().cpu().numpy()
    preds = calibration.predict(log_lik, log_prior(meta["class_counts"], prior))
    probs, predicted = preds.probs, preds.predicted
    target = np.full(len(rows), resolve_class(class_name, names)) if class_name else predicted
    other = resolve_class(contrast, names) if contrast else None
    maps = attribution_maps(model, x, torch.from_numpy(target).to(dev),
                            None if other is None else torch.full((len(rows),), other, device=dev))
    masks = np.stack([brain_mask_from_images(image[None]).numpy() for image in images]).astype(bool)
    return Explanation(list(rows), images, maps.double().cpu().numpy(), masks, info.labels[rows], predicted, probs,
                       target, other, names)


def _centred(heat: np.ndarray, mask: np.ndarray, contrast: bool) -> np.ndarray:
    """The map summed over channels, centred (0 for a contrast, else the brain's mean), NaN outside the brain."""
    heat = heat.sum(axis=0)
    heat = heat - (0.0 if contrast else heat[mask].mean())
    return np.where(mask, heat, np.nan)


def plot_explanation(explanation: Explanation, out: str | Path) -> Path:
    """A figure with one row per image: the image, and the map over it (diverging colours, colour bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e, names = explanation, explanation.class_names
    contrast = e.contrast is not None
    n = len(e.rows)
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 3.0 * n), squeeze=False)
    for i in range(n):
        image = e.images[i].mean(axis=0)
        heat = _centred(e.maps[i], e.masks[i], contrast)
        limit = float(np.nanpercentile(np.abs(heat), 99)) or 1.0
        axes[i, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"row {e.rows[i]}: label {names[e.labels[i]]}\npredicted {names[e.predicted[i]]} "
                             f"(p = {e.probs[i, e.predicted[i]]:.2f})", fontsize=8)
        axes[i, 1].imshow(image, cmap="gray", vmin=0, vmax=1)
        shown = axes[i, 1].imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.75)
        what = (f"H(x, {names[e.target[i]]}) - H(x, {names[e.contrast]})" if contrast
                else f"H(x, {names[e.target[i]]}) - its brain mean")
        axes[i, 1].set_title(f"{what}\nsum {np.nansum(e.maps[i]):.1f} nats", fontsize=8)
        fig.colorbar(shown, ax=axes[i, 1], fraction=0.046, pad=0.04, label="nats per pixel")
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
