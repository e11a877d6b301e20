"""Downstream utility: does adding synthetic images help a standard classifier on held-out real images?

The leakage-free protocol of synthetic-data papers (train on synthetic, test on real; Esteban et al. 2017,
arXiv 1706.02633, "TSTR"): the same CNN (:func:`augflow.audit.baseline.train_cnn`, one fixed recipe) is trained on

- ``real``: the real training images only (class-weighted loss, as every arm),
- ``real+oversampled``: the real training images with each minority class's images duplicated up to the
  largest class: the control every user has without augflow; a top-up that does not beat it is not worth
  releasing,
- ``real+synthetic``: the real training images plus, per class, as many synthetic images as it takes to reach
  the largest real class (fewer if the synthetic file has fewer),
- ``real+duplicates+synthetic``: the same gap filled by duplicates of the class's real images (the share
  ``duplicates``, by default half) and synthetic images (the rest): on the built-in scanner data it beat
  oversampling at 32 px (+0.024 [+0.009, +0.039] balanced accuracy over 10 seeds, reports/usefulness.md Round 12)
  and tied with it at 64 px (-0.003 [-0.017, +0.011], Round 13),
- ``real+oversampled+synthetic``: ``real+oversampled`` plus, for every class, as many synthetic images as the
  largest real class has: every class is half real, half synthetic, so that looking synthetic says nothing about
  the class (a top-up puts synthetic images in the minority classes only, and a CNN learns "looks synthetic ->
  minority class"). On the built-in scanner data at 32 px it tied with oversampling where the top-up hurt
  (+0.009 [-0.017, +0.034] over 10 seeds, reports/usefulness.md Round 16); at 64 px it hurt (-0.046, Round 17)
  unless the release kept only the samples a real-trained classifier recognises (``--select classifier``: +0.006
  [-0.014, +0.025], a tie). It needs a release with that many
  images of every class (``augflow synthesize --per-class N``); with fewer (a top-up) it is skipped and
  ``skipped`` says why,
- ``synthetic``: the synthetic images only,

and evaluated on the held-out real test images, for ``seeds`` seeds (mean and standard deviation). Seed ``s``
of every arm starts from the same initialisation, so arms are compared seed by seed: the paired difference of
``real+synthetic`` against each control, with a Student-t 95% interval over seeds and a verdict (helped / hurt /
not distinguishable). Budgets are steps or epochs, never wall-clock seconds, so a figure reproduces on a slower
machine. By default (``budget="steps"``) every protocol gets the updates of ``epochs`` passes over the real
training images, so that the protocols differ in their images, not in their compute; with ``budget="epochs"`` a
larger set gets as many passes as the real one, hence more updates (on the built-in scanner data that alone cost
oversampling 0.04 balanced accuracy: reports/usefulness.md). The budget itself can decide a verdict: at 64 px on the
built-in data, 30 epochs overfit the oversampled control's duplicated minority images (-0.05 against 10 epochs) and a
selected half-synthetic release beats it, while at 10 epochs, oversampling's best budget on val, the two tie
(reports/usefulness.md Round 19). So, as a user tunes each approach, the protocol can choose each one's budget: given
several budgets and a validation file of real images (subjects disjoint from the training and the test files),
every protocol is trained at every budget and reported at the one with its best mean balanced accuracy on the
validation images; the test images never choose anything.

The test subjects must not occur in the training file (that would measure memory of a subject, not
generalisation): the protocol refuses to run if they do. Synthetic images are generated from the training file
only, so they add no test information.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from augflow.audit.baseline import predict_proba, steps_per_epoch, train_cnn
from augflow.classify.metrics import Predictions, classification_metrics, entropy
from augflow.errors import ConfigError, DataError

PROTOCOLS = ("real", "real+oversampled", "real+synthetic", "real+duplicates+synthetic", "real+oversampled+synthetic",
             "synthetic")
BUDGETS = ("steps", "epochs")
COMPARISONS = (("real+synthetic", "real+oversampled"), ("real+synthetic", "real"),  # (arm, control)
               ("real+duplicates+synthetic", "real+oversampled"), ("real+oversampled+synthetic", "real+oversampled"))
DUPLICATE_SHARE = 0.5  # fixed before it was measured (Round 12); 0.3 / 0.7 did no better on val (Round 13)
CONFIDENCE = 0.95
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


def oversample_rows(train_labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Rows of the real training set with every class duplicated up to the largest class (random oversampling).

    Every row once, then each smaller class's rows repeated ``need // n`` more times and a seeded choice of
    ``need % n`` of them without replacement, so that duplicates are spread as evenly as possible.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(train_labels, minlength=num_classes)
    rows = [np.arange(len(train_labels))]
    for k in range(num_classes):
        idx = np.flatnonzero(train_labels == k)
        need = int(counts.max() - counts[k])
        if need and len(idx):
            rows.append(np.tile(idx, need // len(idx)))
            rows.append(np.sort(rng.choice(idx, need % len(idx), replace=False)))
    return np.concatenate(rows).astype(np.int64)


def mixed_rows(train_labels: np.ndarray, synthetic_labels: np.ndarray, topup: np.ndarray, share: float,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Replace the share ``share`` of each class's ``topup`` rows by duplicates of that class's real images.

    Returns the synthetic rows kept and the real rows to duplicate (each real image of a class once before any
    twice, in a seeded order), so that ``real + duplicates + kept`` has the class counts of ``real + topup``.
    """
    if not 0 <= share <= 1:
        raise ConfigError(f"the share of duplicates must be in [0, 1], but is: {share}")
    rng = np.random.default_rng(seed)
    kept, duplicates = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k in np.unique(synthetic_labels[topup]):
        mine = topup[synthetic_labels[topup] == k]
        real = np.flatnonzero(train_labels == k)
        n_dup = round(share * len(mine)) if len(real) else 0
        kept.append(np.sort(rng.choice(mine, len(mine) - n_dup, replace=False)))
        duplicates.append(np.resize(rng.permutation(real), n_dup))
    return np.concatenate(kept).astype(np.int64), np.concatenate(duplicates).astype(np.int64)


def balanced_synthetic_rows(train_labels: np.ndarray, synthetic_labels: np.ndarray,
                            class_names: list[str]) -> tuple[np.ndarray | None, str]:
    """The first ``n`` synthetic rows of every class, ``n`` the largest real class's count, or ``None`` and why
    not when a class of the training data has fewer synthetic images."""
    target = int(np.bincount(train_labels, minlength=len(class_names)).max())
    rows = []
    for k in np.unique(train_labels):
        mine = np.flatnonzero(synthetic_labels == k)
        if len(mine) < target:
            return None, (f"needs {target} synthetic images of every class (the largest real class), but class "
                          f"{class_names[k]!r} has {len(mine)}: sample the release with `augflow synthesize "
                          f"--per-class {target}`")
        rows.append(mine[:target])
    return np.concatenate(rows), ""


def paired_difference(arm: list[float], control: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of the per-seed differences ``arm - control`` with a Student-t interval over seeds, and a verdict.

    ``helped`` when the whole interval is above 0, ``hurt`` when below, else ``not distinguishable`` (always so
    for one seed, which has no interval).
    """
    d = np.asarray(arm, dtype=float) - np.asarray(control, dtype=float)
    if d.size < 1:
        raise ValueError("paired_difference needs at least one pair")
    mean = float(d.mean())
    if d.size < 2:
        return {"mean": mean, "std": 0.0, "low": None, "high": None, "n": 1, "confidence": confidence,
                "verdict": "not distinguishable"}
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * std / np.sqrt(d.size))
    low, high = mean - half, mean + half
    verdict = "helped" if low > 0 else "hurt" if high < 0 else "not distinguishable"
    return {"mean": mean, "std": std, "low": low, "high": high, "n": int(d.size), "confidence": confidence,
            "verdict": verdict}


def compare(results: dict, metric: str = "balanced_accuracy") -> dict:
    """Paired differences of ``metric`` for each (arm, control) of ``COMPARISONS`` present in ``results``."""
    return {f"{arm} vs {control}": paired_difference([r[metric] for r in results[arm]["runs"]],
                                                     [r[metric] for r in results[control]["runs"]])
            for arm, control in COMPARISONS if arm in results and control in results}


def _change(c: dict) -> str:
    interval = "" if c["low"] is None else f", {c['confidence']:.0%} interval {c['low']:+.3f} to {c['high']:+.3f}"
    return f"{c['mean']:+.3f} balanced accuracy over {c['n']} seed(s){interval}"


def best_verdict(result: dict) -> str | None:
    """The verdict of the best use of the synthetic images against oversampling (a top-up alone, beside
    duplicates, or added to the oversampled set)."""
    verdicts = [c["verdict"] for name, c in result["comparisons"].items() if name.endswith("vs real+oversampled")]
    for verdict in ("helped", "not distinguishable", "hurt"):
        if verdict in verdicts:
            return verdict
    return None


def usefulness_sentence(result: dict) -> str:
    """Plain sentences: did the top-up help the downstream CNN compared with oversampling the real images, alone,
    when it fills part of each gap next to duplicates of the real images, and added to the oversampled set?"""
    c = result["comparisons"].get("real+synthetic vs real+oversampled")
    if c is None:
        return "The top-up was not compared with oversampling the real images."
    if c["verdict"] == "helped":
        text = f"The synthetic top-up helped: it beat duplicating the real minority images ({_change(c)})."
    elif c["verdict"] == "hurt":
        text = (f"The synthetic top-up hurt: duplicating the real minority images trained a better classifier "
                f"({_change(c)}).")
    else:
        text = (f"The synthetic top-up could not be told apart from duplicating the real minority images "
                f"({_change(c)}).")
    share = result.get("duplicate_share", DUPLICATE_SHARE)
    uses = {"real+duplicates+synthetic": f"Filling {1 - share:.0%} of each class's gap with it and {share:.0%} with "
                                         "duplicates of the real images",
            "real+oversampled+synthetic": "Adding it to the oversampled real images, every class half real and half "
                                          "synthetic,"}
    for arm, use in uses.items():
        c = result["comparisons"].get(f"{arm} vs real+oversampled")
        if c is not None:
            text += {"helped": f" {use} helped ({_change(c)}): train on it that way.",
                     "hurt": f" {use} hurt ({_change(c)}).",
                     }.get(c["verdict"], f" {use} could not be told apart from oversampling ({_change(c)}).")
    verdict = best_verdict(result)
    if verdict == "hurt":
        text += " Do not release it for augmentation."
    elif verdict == "not distinguishable":
        text += " It is not shown to be worth releasing for augmentation."
    return text


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


def candidate_budgets(epochs: int | Sequence[int]) -> list[int]:
    """The distinct candidate budgets (epochs) of ``epochs``, ascending."""
    return sorted({int(e) for e in np.atleast_1d(epochs)})


def choose_budget(val_scores: dict[int, list[float]]) -> int:
    """The budget (epochs) with the best mean validation score over seeds; the smallest of equals."""
    return max(sorted(val_scores), key=lambda e: (np.mean(val_scores[e]), -e))


def downstream(train_images: np.ndarray, train_labels: np.ndarray, synthetic_images: np.ndarray,
               synthetic_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
               class_names: list[str], *, train_subjects=None, test_subjects=None, seeds: int = 3,
               epochs: int | Sequence[int] = 30, batch_size: int = 64, lr: float = 1e-3,
               protocols: tuple[str, ...] = PROTOCOLS, device: str = "cpu", progress=None,
               amp: bool = False, budget: str = "steps", duplicates: float = DUPLICATE_SHARE,
               val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
               val_subjects=None) -> dict:
    """Train the baseline CNN per protocol and seed; evaluate on the real test images.

    Arguments:
        train_images, train_labels: The real training data.
        synthetic_images, synthetic_labels: The synthetic file's data.
        test_images, test_labels: The held-out real data.
        class_names: The K class names (shared by all three files).
        train_subjects, test_subjects: Subject ids; when given, checked to be disjoint.
        seeds: Trainings per protocol (seeds 0..seeds-1).
        epochs, batch_size, lr: The CNN recipe. Several values of ``epochs`` are candidate budgets: each protocol
            is reported at the one with its best mean balanced accuracy on the validation images (needed then).
        protocols: Subset of ``PROTOCOLS`` to run.
        device: Training device.
        progress: Optional callable given the number of trainings done (e.g. a tqdm bar's ``update``): 1 after each,
            ``seeds`` for a skipped protocol.
        amp: bf16 autocast for the CNNs.
        budget: ``"steps"``: every protocol trains for the steps of ``epochs`` passes over the real training images;
            ``"epochs"``: ``epochs`` passes over its own set.
        duplicates: The share of each class's gap that ``real+duplicates+synthetic`` fills with duplicates.
        val_images, val_labels: Real validation images that choose each protocol's budget; their balanced accuracy
            is reported too.
        val_subjects: Their subject ids; when given, checked to be disjoint from the training and test subjects.

    Returns:
        ``{"protocols": {name: {"summary": mean/std, "runs": [metrics per seed], "n_train", "class_counts",
        "epochs": the budget reported, "val_balanced_accuracy": {epochs: mean} (with validation images)}},
        "comparisons": {"real+synthetic vs real+oversampled": paired difference, ...}, "seeds", "test_n",
        "classes_without_test_images", "val_n", "recipe", "minority_classes", "topup_counts", "duplicate_share",
        "skipped": {protocol: why}}``.

    Raises:
        DataError: if a test (or validation) subject is in the training data, a validation subject in the test
            data, or a protocol has no training images. ConfigError: several budgets without validation images.
    """
    budgets = candidate_budgets(epochs)
    if not budgets or budgets[0] < 1:
        raise ConfigError(f"downstream epochs must be at least 1, but are: {budgets}")
    if len(budgets) > 1 and val_images is None:
        raise ConfigError(f"several downstream budgets ({', '.join(map(str, budgets))} epochs) need validation "
                          "images to choose among them (audit --val FILE)")
    if train_subjects is not None and test_subjects is not None:
        check_subjects_disjoint(train_subjects, test_subjects)
    if val_subjects is not None:
        if train_subjects is not None:
            check_subjects_disjoint(train_subjects, val_subjects, test_name="--val")
        if test_subjects is not None:
            check_subjects_disjoint(val_subjects, test_subjects, train_name="--val")
    if seeds < 1:
        raise DataError(f"seeds must be at least 1, but is: {seeds}")
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise DataError(f"unknown downstream protocols {sorted(unknown)}; allowed: {PROTOCOLS}")
    if budget not in BUDGETS:
        raise ConfigError(f"the downstream budget must be one of {', '.join(BUDGETS)}, but is: {budget!r}")
    k = len(class_names)
    topup = topup_rows(train_labels, synthetic_labels, k)
    over = oversample_rows(train_labels, k)
    kept, dups = mixed_rows(train_labels, synthetic_labels, topup, duplicates)
    sets = {
        "real": (train_images, train_labels),
        "real+oversampled": (train_images[over], train_labels[over]),
        "real+synthetic": (np.concatenate([train_images, synthetic_images[topup]]),
                           np.concatenate([train_labels, synthetic_labels[topup]])),
        "real+duplicates+synthetic": (np.concatenate([train_images, train_images[dups], synthetic_images[kept]]),
                                      np.concatenate([train_labels, train_labels[dups], synthetic_labels[kept]])),
        "synthetic": (synthetic_images, synthetic_labels),
    }
    balanced, why_not = balanced_synthetic_rows(train_labels, synthetic_labels, class_names)
    if balanced is not None:
        sets["real+oversampled+synthetic"] = (np.concatenate([train_images[over], synthetic_images[balanced]]),
                                              np.concatenate([train_labels[over], synthetic_labels[balanced]]))
    skipped = {name: why_not for name in protocols if name not in sets}
    steps = {e: e * steps_per_epoch(len(train_labels), batch_size) if budget == "steps" else None for e in budgets}
    results = {}
    for name in protocols:
        if name in skipped:
            if progress is not None:
                progress(seeds * len(budgets))  # its trainings count as done, so a bar still ends full
            continue
        x, y = sets[name]
        if len(x) < 2:
            raise DataError(f"downstream protocol {name!r} has {len(x)} training images; it needs at least 2")
        runs, val_scores = {}, {}
        for e in budgets:
            runs[e], val_scores[e] = [], []
            for seed in range(seeds):
                model = train_cnn(x, y, k, epochs=e, steps=steps[e], batch_size=batch_size, lr=lr, seed=seed,
                                  device=device, amp=amp)
                runs[e].append(cnn_metrics(predict_proba(model, test_images, device=device, amp=amp), test_labels,
                                           class_names))
                if val_images is not None:
                    val = predict_proba(model, val_images, device=device, amp=amp)
                    val_scores[e].append(cnn_metrics(val, val_labels, class_names)["balanced_accuracy"])
                if progress is not None:
                    progress(1)
        chosen = choose_budget(val_scores) if len(budgets) > 1 else budgets[0]
        results[name] = {"summary": summarize(runs[chosen], class_names), "runs": runs[chosen], "n_train": int(len(x)),
                         "class_counts": dict(zip(class_names, np.bincount(y, minlength=k).tolist(), strict=True)),
                         "epochs": chosen, "steps": steps[chosen]}
        if val_images is not None:
            results[name]["val_balanced_accuracy"] = {str(e): float(np.mean(v)) for e, v in val_scores.items()}
    return {"protocols": results, "comparisons": compare(results), "seeds": seeds, "test_n": int(len(test_labels)),
            "classes_without_test_images": [n for i, n in enumerate(class_names) if not np.any(test_labels == i)],
            "val_n": None if val_labels is None else int(len(val_labels)),
            "recipe": {"model": "resnet18", "epochs": budgets[0] if len(budgets) == 1 else budgets,
                       "steps": steps[budgets[0]] if len(budgets) == 1 else [steps[e] for e in budgets],
                       "budget": budget, "batch_size": batch_size, "lr": lr, "amp": amp},
            "minority_classes": minority_classes(train_labels, class_names),
            "topup_counts": dict(zip(class_names, np.bincount(synthetic_labels[topup], minlength=k).tolist(),
                                     strict=True)),
            "duplicate_share": duplicates, "skipped": skipped}
