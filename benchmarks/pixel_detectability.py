"""Where in the pixels can a linear classifier tell synthetic images from real ones?

A diagnostic beside the usefulness instrument (reports/usefulness.md, Round 15). For each synthetic file it prints
the cross-validated two-sample ROC AUC of :mod:`augflow.audit.detectability` (class-matched, folds grouped by
subject) against the real images of ``--reference`` (the val split while choosing levers), on views of the pixels:
all of them, the tissue region (pixels whose mean over the real training images exceeds ``--tissue``) and the
background, a 16-bin intensity histogram of the tissue region, and two post-processings: values below 0.08 set to
zero, and each class's intensities mapped onto the real training images' quantiles (a monotone map). It also gives
the fraction of exact zeros, the background's tell-tale.

    python benchmarks/pixel_detectability.py --train /work/exp/use32/split/train.h5 \\
        --reference /work/exp/use32/split/val.h5 /work/exp/use32/synthetic/topup_magic_T0.8.h5
"""

from __future__ import annotations

import argparse

import numpy as np

from augflow.audit.detectability import matched_rows, two_sample_auc
from augflow.data.store import read_images, read_info


def quantile_matched(images: np.ndarray, labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray) -> np.ndarray:
    """Each class's pixel values mapped onto the quantiles of the real images of that class."""
    q = np.linspace(0, 1, 1001)
    out = images.copy()
    for k in np.unique(labels):
        own = labels == k
        out[own] = np.interp(images[own], np.quantile(images[own], q), np.quantile(real[real_labels == k], q))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("synthetic", nargs="+", help="Synthetic .h5 files.")
    parser.add_argument("--train", required=True, help="The real training file (tissue mask, quantiles).")
    parser.add_argument("--reference", required=True, help="Held-out real images (the val split while choosing).")
    parser.add_argument("--tissue", type=float, default=0.05, help="Mean training intensity that marks tissue.")
    args = parser.parse_args()
    train, train_info = read_images(args.train), read_info(args.train)
    reference, ref_info = read_images(args.reference), read_info(args.reference)
    tissue = train.mean(0)[0] > args.tissue
    views = {
        "all": lambda x: x,
        "tissue": lambda x: x[:, 0, tissue],
        "background": lambda x: x[:, 0, ~tissue],
        "tissue histogram": lambda x: np.stack([np.histogram(a[0, tissue], 16, (0, 1))[0] for a in x]),
        "below 0.08 -> 0": lambda x: np.where(x < 0.08, 0, x),
    }
    print(f"tissue: {tissue.mean():.0%} of the pixels; exact zeros in the reference: {np.mean(reference == 0):.2f}")
    for path in args.synthetic:
        images, info = read_images(path), read_info(path)
        rows = matched_rows({"s": info.labels, "r": ref_info.labels})
        groups = np.asarray(info.subjects)[rows["s"]], np.asarray(ref_info.subjects)[rows["r"]]
        real = reference[rows["r"]]
        matched = quantile_matched(images, info.labels, train, train_info.labels)[rows["s"]]
        synthetic = images[rows["s"]]
        aucs = {name: two_sample_auc(view(synthetic), groups[0], view(real), groups[1]) for name, view in views.items()}
        aucs["quantile-matched"] = two_sample_auc(matched, groups[0], real, groups[1])
        print(f"{path}: {len(real)} per side; exact zeros {np.mean(synthetic == 0):.2f} "
              f"(quantile-matched {np.mean(matched == 0):.2f}); ROC AUC "
              + ", ".join(f"{name} {'n/a' if v is None else f'{v:.2f}'}" for name, v in aucs.items()), flush=True)


if __name__ == "__main__":
    main()
