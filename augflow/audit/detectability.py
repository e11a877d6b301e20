"""Detectability: can a classifier tell the synthetic images from real images of the same classes?

The classifier two-sample test (Lopez-Paz & Oquab 2017, arXiv 1610.06545): a classifier trained to separate two
samples scores at chance (ROC AUC 0.5) on held-out data when both come from one distribution. Here it is an L2
logistic regression on standardised inputs (scikit-learn), scored by 5-fold cross-validation grouped by subject
(the slices of one subject stay in one fold, or the classifier would learn subjects), on class-matched samples
(every class contributes as many images to both sides, so the class mix tells nothing), in the audit's feature space
and in pixels. The candidates are the synthetic images and, as the real-vs-real reference, the real training images,
each against the held-out real test images.

Why it matters for augmentation: a downstream classifier that can tell a top-up's images from real ones can learn
"looks synthetic" as a feature of the minority classes they fill, and then miss the real images of those classes
(on the built-in scanner data a top-up whose classes a real-trained classifier recognised well still did; see
reports/usefulness.md, Round 14).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

FOLDS = 5
PENALTY_C = 0.1  # a strong L2 penalty: a few hundred images against up to 4096 pixels


def matched_rows(labels: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of each set (same keys as ``labels``) such that every class has the same count in all of them: the
    smallest count of that class over the sets (seeded choice); classes missing from a set are left out."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in labels}
    for k in np.unique(np.concatenate(list(labels.values()))):
        members = {name: np.flatnonzero(y == k) for name, y in labels.items()}
        n = min(len(m) for m in members.values())
        for name, m in members.items():
            rows[name].append(rng.choice(m, n, replace=False))
    return {name: np.sort(np.concatenate(r)).astype(np.int64) for name, r in rows.items()}


def discriminator():
    """The two-sample classifier: standardised inputs, L2 logistic regression with a strong penalty; balanced class
    weights, so that unequal sides (as in ``augflow synthesize --select realism``) weigh the same as equal ones."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=PENALTY_C, class_weight="balanced", max_iter=2000))


def two_sample_auc(candidate: np.ndarray, candidate_groups: np.ndarray, reference: np.ndarray,
                   reference_groups: np.ndarray, seed: int = 0) -> float | None:
    """Cross-validated ROC AUC of a logistic regression separating ``candidate`` from ``reference`` rows (flattened),
    folds grouped by ``*_groups`` (subject ids); None when a side has fewer than :data:`FOLDS` groups."""
    if min(len(np.unique(candidate_groups)), len(np.unique(reference_groups))) < FOLDS:
        return None
    x = np.concatenate([candidate.reshape(len(candidate), -1), reference.reshape(len(reference), -1)])
    y = np.r_[np.ones(len(candidate)), np.zeros(len(reference))]
    # Candidate and reference ids may coincide (two real files): keep them apart.
    groups = np.concatenate([np.char.add("c:", candidate_groups.astype(str)),
                             np.char.add("r:", reference_groups.astype(str))])
    model = discriminator()
    folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
    with threadpool_limits(1):  # small problems: threads cost more than they give
        scores = cross_val_predict(model, x, y, groups=groups, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def detectability(spaces: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                  subjects: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Two-sample AUCs of the synthetic and the real training images against the real test images.

    Arguments:
        spaces: Per space name (e.g. ``"features"``, ``"pixels"``), arrays of the sets ``"synthetic"``, ``"train"``
            and ``"real"`` (the held-out test images), row-aligned with ``labels``.
        labels, subjects: Per set, class labels and subject ids.

    Returns:
        ``{"n": images per side, space: {"synthetic": auc, "real": auc}}`` (an AUC is None when too few subjects);
        the three sets are matched per class (:func:`matched_rows`), so both comparisons see the same class counts.
    """
    rows = matched_rows(labels, seed)
    result: dict = {"n": int(len(rows["real"]))}
    for space, sets in spaces.items():
        reference = (sets["real"][rows["real"]], subjects["real"][rows["real"]])
        result[space] = {name: two_sample_auc(sets[role][rows[role]], subjects[role][rows[role]], *reference, seed)
                         for name, role in (("synthetic", "synthetic"), ("real", "train"))}
    return result
