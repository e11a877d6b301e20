"""Downstream utility: does adding synthetic images help a standard classifier on held-out real images?

The leakage-free protocol of synthetic-data papers (train on synthetic, test on real; Esteban et al. 2017,
arXiv 1706.02633, "TSTR"): the same CNN (:func:`augflow.audit.baseline.train_cnn`, one fixed recipe) is trained on

- ``real``: the real training images only,
- ``real+synthetic``: the real training images plus, per class, as many synthetic images as it takes to reach
  the largest real class (fewer if the synthetic file has fewer),
- ``synthetic``: the synthetic images only,

and evaluated on the held-out real test images, for ``seeds`` seeds (mean and standard deviation). The test
subjects must not occur in the training file (that would measure memory of a subject, not generalisation): the
protocol refuses to run if they do. Synthetic images are generated from the training file only, so they add
no test information.
"""

from __future__ import annotations

import numpy as np

from augflow.audit.baseline import predict_proba, train_cnn
from augflow.classify.metrics import Predictions, classification_metrics, entropy
from augflow.errors import DataError

PROTOCOLS = ("real", "real+synthetic", "synthetic")
MINORITY_FRACTION = 0.25  # a class with fewer real training images than this fraction of the largest is a minority
SCALAR_KEYS = ("accuracy", "balanced_accuracy", "auc_macro", "precision_macro", "recall_macro", "f1_macro")


def check_subjects_disjoint(train_subjects, test_subjects, train_name: str = "--train",
                            test_name: str = "--real") -> None:
    """Raise DataError if any test subject also occurs in the training data.

    Raises:
        DataError: naming the files, the number of shared subjects and a few of them.
    """
    shared = sorted(set(map(str, train_subjects)) & set(map(str, test_subjects)))
    if shared:
        raise DataError(f"{test_name} and {train_name} share {len(shared)} subject(s) (e.g. {', '.join(shared[:5])}); "
                        "the test images must come from subjects never used for training (split by subject with "
                        "`augflow split`)")


def minority_classes(train_labels: np.ndarray, class_names: list[str]) -> list[str]:
    """Classes with fewer real training images than ``MINORITY_FRACTION`` of the largest class."""
    counts = np.bincount(train_labels, minlength=len(class_names))
    return [name for name, c in zip(class_names, counts, strict=True) if c < MINORITY_FRACTION * counts.max()]


def topup_rows(train_labels: np.ndarray, synthetic_labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Synthetic rows that top every class up to the largest real class (a seeded choice within each class)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(train_labels, minlength=num_classes)
    rows = []
    for k in range(num_classes):
        available = np.flatnonzero(synthetic_labels == k)
        need = min(int(counts.max() - counts[k]), len(available))
        rows.append(np.sort(rng.choice(available, need, replace=False)))
    return np.concatenate(rows).astype(np.int64)


def cnn_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """The metrics of :func:`augflow.classify.metrics.classification_metrics` for softmax outputs (N, K)."""
    log_p = np.log(np.maximum(probs, 1e-300))
    preds = Predictions(log_likelihoods=log_p, probs=probs, predicted=probs.argmax(axis=1), entropy=entropy(probs))
    return classification_metrics(labels, preds, class_names)


def summarize(runs: list[dict], class_names: list[str]) -> dict:
    """Mean and standard deviation over seeds of the scalar metrics and the per-class recall."""
    out = {}
    for key in SCALAR_KEYS:
        values = np.array([r[key] for r in runs], dtype=float)
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    out["per_class_recall"] = {
        name: {"mean": float(np.mean([r["per_class_recall"][name] for r in runs])),
               "std": float(np.std([r["per_class_recall"][name] for r in runs]))} for name in class_names}
    return out


def downstream(train_images: np.ndarray, train_labels: np.ndarray, synthetic_images: np.ndarray,
               synthetic_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
               class_names: list[str], *, train_subjects=None, test_subjects=None, seeds: int = 3,
               epochs: int = 30, budget_s: float | None = None, batch_size: int = 64, lr: float = 1e-3,
               protocols: tuple[str, ...] = PROTOCOLS, device: str = "cpu", progress=None,
               amp: bool = False) -> dict:
    """Train the baseline CNN per protocol and seed; evaluate on the real test images.

    Arguments:
        train_images, train_labels: The real training data.
        synthetic_images, synthetic_labels: The synthetic file's data.
        test_images, test_labels: The held-out real data.
        class_names: The K class names (shared by all three files).
        train_subjects, test_subjects: Subject ids; when given, checked to be disjoint.
        seeds: Trainings per protocol (seeds 0..seeds-1).
        epochs, budget_s, batch_size, lr: The CNN recipe (budget_s per training).
        protocols: Subset of ``PROTOCOLS`` to run.
        device: Training device.
        progress: Optional callable called after each training (e.g. a tqdm bar's ``update``).

    Returns:
        ``{"protocols": {name: {"summary": mean/std, "runs": [metrics per seed], "n_train"}}, "seeds",
        "recipe", "minority_classes", "topup_counts"}``.

    Raises:
        DataError: if a test subject is in the training data, or a protocol has no training images.
    """
    if train_subjects is not None and test_subjects is not None:
        check_subjects_disjoint(train_subjects, test_subjects)
    if seeds < 1:
        raise DataError(f"seeds must be at least 1, but is: {seeds}")
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise DataError(f"unknown downstream protocols {sorted(unknown)}; allowed: {PROTOCOLS}")
    k = len(class_names)
    topup = topup_rows(train_labels, synthetic_labels, k)
    sets = {
        "real": (train_images, train_labels),
        "real+synthetic": (np.concatenate([train_images, synthetic_images[topup]]),
                           np.concatenate([train_labels, synthetic_labels[topup]])),
        "synthetic": (synthetic_images, synthetic_labels),
    }
    results = {}
    for name in protocols:
        x, y = sets[name]
        if len(x) < 2:
            raise DataError(f"downstream protocol {name!r} has {len(x)} training images; it needs at least 2")
        runs = []
        for seed in range(seeds):
            model = train_cnn(x, y, k, epochs=epochs, budget_s=budget_s, batch_size=batch_size, lr=lr, seed=seed,
                              device=device, amp=amp)
            runs.append(cnn_metrics(predict_proba(model, test_images, device=device, amp=amp), test_labels,
                                    class_names))
            if progress is not None:
                progress()
        results[name] = {"summary": summarize(runs, class_names), "runs": runs, "n_train": int(len(x)),
                         "class_counts": dict(zip(class_names, np.bincount(y, minlength=k).tolist(), strict=True))}
    return {"protocols": results, "seeds": seeds, "test_n": int(len(test_labels)),
            "recipe": {"model": "resnet18", "epochs": epochs, "budget_s": budget_s, "batch_size": batch_size,
                       "lr": lr, "amp": amp},
            "minority_classes": minority_classes(train_labels, class_names),
            "topup_counts": dict(zip(class_names, np.bincount(synthetic_labels[topup], minlength=k).tolist(),
                                     strict=True))}
