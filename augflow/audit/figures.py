"""The audit's figures, as PNG bytes: samples beside real images, the closest pairs, distances, the ROC curve,
per-class downstream recall and per-class precision / recall / density / coverage beside the real reference.

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


ARM_COLOURS = {"real": "#4c72b0", "real+oversampled": "#8c8c8c", "real+synthetic": "#dd8452", "synthetic": "#55a868"}


def figure_recall(downstream: dict, class_names: list[str]) -> bytes:
    """Per-class recall of the downstream CNN on the held-out real images: grouped bars, one per training arm
    (± std over seeds), minority classes starred and shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(downstream["protocols"])
    minority = set(downstream.get("minority_classes", []))
    x = np.arange(len(class_names))
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(class_names) + 1.5), 3.2))
    for k, name in enumerate(class_names):
        if name in minority:
            ax.axvspan(k - 0.45, k + 0.45, color="#f3e6c4", zorder=0)
    for i, arm in enumerate(arms):
        recall = downstream["protocols"][arm]["summary"]["per_class_recall"]
        mean = [recall[n]["mean"] for n in class_names]
        std = [recall[n]["std"] for n in class_names] if downstream.get("seeds", 1) > 1 else None
        ax.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=std, capsize=2, label=arm.replace("+", " + "),
               color=ARM_COLOURS.get(arm), zorder=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(x, [f"{n} *" if n in minority else n for n in class_names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall (held-out real)")
    ax.legend(fontsize=7, ncol=len(arms), loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    return _png(fig)


PRDC = ("precision", "recall", "density", "coverage")


def figure_prdc(fidelity: dict, class_names: list[str]) -> bytes:
    """Precision, recall, density and coverage overall and per class: synthetic beside the real-vs-real reference
    (real training images against the same held-out images). A value missing for too few images is marked n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("overall", fidelity["overall"])] + [(n, fidelity["per_class"][n]) for n in class_names]
    x = np.arange(len(groups))
    fig, axes = plt.subplots(2, 2, figsize=(max(7.0, 0.75 * len(groups) + 3), 5.6), sharex=True, squeeze=False)
    for ax, metric in zip(axes.flat, PRDC, strict=True):
        for i, (cand, label, colour) in enumerate((("synthetic", "synthetic", "#dd8452"),
                                                   ("real", "real vs real (reference)", "#4c72b0"))):
            values = [d[cand].get(metric) for _, d in groups]
            pos = x - 0.2 + 0.4 * i
            ax.bar(pos, [np.nan if v is None else v for v in values], 0.4, label=label, color=colour)
            for p, v in zip(pos, values, strict=True):
                if v is None:
                    ax.text(p, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="#666")
        ax.set_title(metric, fontsize=9)
        if metric != "density":  # density is unbounded above (about 1 for real-like images)
            ax.set_ylim(0, 1.05)
    for ax in axes[1]:
        ax.set_xticks(x, [g for g, _ in groups], rotation=35, ha="right", fontsize=7)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.03))
    fig.tight_layout()
    return _png(fig)
