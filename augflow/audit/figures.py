"""The audit's figures, as PNG bytes: samples beside real images, the closest pairs, distances, the ROC curve.

Embedded as base64 in ``report.html`` and written to ``figures/`` for ``report.md`` (:mod:`augflow.audit.report`).
"""

from __future__ import annotations

import io
import math

import numpy as np


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _show(ax, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def figure_samples(synthetic, synthetic_labels, real, real_labels, class_names, per_class: int = 6) -> bytes:
    """A row per class: ``per_class`` synthetic images, then as many real training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(class_names), 2 * per_class, figsize=(2 * per_class * 0.8, len(class_names) * 0.9),
                             squeeze=False)
    for k, name in enumerate(class_names):
        for offset, (images, labels) in enumerate(((synthetic, synthetic_labels), (real, real_labels))):
            rows = np.flatnonzero(labels == k)
            rows = rng.choice(rows, min(per_class, len(rows)), replace=False) if len(rows) else rows
            for j in range(per_class):
                ax = axes[k, offset * per_class + j]
                if j < len(rows):
                    _show(ax, images[rows[j]])
                else:  # an empty cell, but keep the axes: the first one carries the class name
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_visible(False)
        axes[k, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("left: synthetic, right: real training images", fontsize=9)
    return _png(fig)


def figure_closest_pairs(pairs: list[dict], synthetic, train) -> bytes:
    """The closest synthetic-training pairs: synthetic image above its nearest training image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows = max(1, math.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(2 * rows, cols, figsize=(cols * 1.0, 2 * rows * 1.05), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, p in enumerate(pairs):
        r, c = divmod(i, cols)
        _show(axes[2 * r, c], synthetic[p["synthetic"]], f"d={p['distance']:.3f}")
        _show(axes[2 * r + 1, c], train[p["train"]], "train")
        axes[2 * r, c].axis("on")
        axes[2 * r + 1, c].axis("on")
    fig.suptitle("closest synthetic (top) / training (bottom) pairs, pixel RMS distance", fontsize=9)
    return _png(fig)


def figure_dcr(arrays: dict, thresholds: dict) -> bytes:
    """Histograms of the distance to the closest training image: synthetic vs held-out real, per space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arrays), figsize=(4.2 * len(arrays), 3))
    for ax, (space, a) in zip(np.atleast_1d(axes), arrays.items(), strict=True):
        bins = np.histogram_bin_edges(np.r_[a["distances"], a["heldout_distances"]], bins=40)
        ax.hist(a["heldout_distances"], bins=bins, density=True, alpha=0.6, label="held-out real")
        ax.hist(a["distances"], bins=bins, density=True, alpha=0.6, label="synthetic")
        ax.axvline(thresholds[space], color="k", linestyle="--", linewidth=1, label="1st pct. held-out")
        ax.set_xlabel(f"distance to closest training image ({space})")
        ax.legend(fontsize=7)
    return _png(fig)


def figure_roc(roc: dict, auc: float) -> bytes:
    """ROC curve of the membership-inference attack, log-scaled FPR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    fpr = np.clip(roc["fpr"], 1e-4, 1)
    ax.plot(fpr, roc["tpr"], label=f"attack (AUC {auc:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k--", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------------------------------------ the document
