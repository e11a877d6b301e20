"""Memorization and membership inference: does the synthetic data, or the model, give training images away?

Distance to closest record (DCR; Park et al. 2018, arXiv 1806.03384; Zhao et al. 2021, arXiv 2102.08369): for
every synthetic image the distance to its nearest training image, in pixel space (root-mean-square difference
per pixel) and in the domain feature space, set against the same distance for held-out real images, which the
model never saw. A synthetic image closer to a training image than the closest 1% of held-out images is
flagged; ``copy_fraction`` is the fraction flagged (the larger of the two spaces: pixels catch verbatim
copies, features catch shifted or re-noised ones). A generator that does not copy gives about 0.01, the
held-out images' own rate by construction.

Membership inference with the model's exact likelihood (the loss-threshold attack of Yeom et al. 2018, arXiv
1709.01604): members (training images) should not have systematically higher ``log p(x|y)`` than held-out
non-members. Reported: ROC AUC (0.5 = no leakage), TPR at FPR 1% and 0.1% (Carlini et al. 2022, arXiv
2112.03570), and an empirical lower bound on epsilon: for an (epsilon, delta)-DP training algorithm every test
satisfies TPR <= e^epsilon FPR + delta (and the same with the roles of members and non-members swapped), so
Clopper-Pearson bounds on TPR and FPR give a one-sided 95% lower bound on epsilon (Jagielski et al. 2020,
arXiv 2006.07709; Nasr et al. 2021, arXiv 2101.04535). The threshold is chosen on a random half of the scores
and the bound evaluated on the other half, so choosing it does not inflate the bound. A simple population
attack gives a weak bound: a small value does not prove privacy; only the model's DP ledger does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

COPY_PERCENTILE = 1.0  # held-out percentile below which a synthetic image counts as a copy
EXACT_COPY = 0.5 / 255  # pixel RMS distance below half an 8-bit grey level: indistinguishable once saved
CLOSEST_PAIRS = 16
FPR_TARGETS = (0.01, 0.001)


def nearest(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index."""
    with threadpool_limits(1, "blas"):  # see augflow.audit.fidelity.compare: threads stall on shared cores
        dist, idx = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(reference).kneighbors(queries)
    return dist[:, 0], idx[:, 0]


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) as rows scaled so that Euclidean distance is the RMS difference per pixel."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    return flat / math.sqrt(flat.shape[1])


def distance_to_closest_record(synthetic: np.ndarray, heldout: np.ndarray, train: np.ndarray,
                               percentile: float = COPY_PERCENTILE) -> dict:
    """DCR statistics in one space: synthetic and held-out rows against the training rows.

    Returns:
        ``{"copy_fraction", "threshold", "median_synthetic", "median_heldout", "ratio", "distances", "nearest"}``;
        ``distances``/``nearest`` (per synthetic row) are numpy arrays for the caller, not for JSON.
    """
    d_syn, idx = nearest(synthetic, train)
    d_held, _ = nearest(heldout, train)
    threshold = float(np.percentile(d_held, percentile))
    med_syn, med_held = float(np.median(d_syn)), float(np.median(d_held))
    return {"copy_fraction": float(np.mean(d_syn < threshold)), "threshold": threshold,
            "median_synthetic": med_syn, "median_heldout": med_held,
            "ratio": med_syn / med_held if med_held > 0 else None,
            "distances": d_syn, "heldout_distances": d_held, "nearest": idx}


def memorization(synthetic_images: np.ndarray, heldout_images: np.ndarray, train_images: np.ndarray,
                 synthetic_features: np.ndarray, heldout_features: np.ndarray, train_features: np.ndarray) -> dict:
    """Copy detection in pixel and feature space.

    Returns:
        ``{"copy_fraction" (max over spaces), "exact_copies", "near_copies", "pixel": {...}, "feature": {...},
        "closest_pairs": [{"synthetic", "train", "distance"}] (16 smallest pixel distances)}``, where
        exact copies are within half an 8-bit grey level per pixel (RMS) and near copies (not exact) are closer
        to a training image than any held-out image is. ``pixel``/``feature`` are :func:`distance_to_closest_record`
        without the arrays; the arrays are returned under ``"_arrays"`` for figures.
    """
    spaces = {
        "pixel": distance_to_closest_record(pixel_vectors(synthetic_images), pixel_vectors(heldout_images),
                                            pixel_vectors(train_images)),
        "feature": distance_to_closest_record(synthetic_features, heldout_features, train_features),
    }
    pixel = spaces["pixel"]
    d = pixel["distances"]
    exact = d <= EXACT_COPY
    near = ~exact & (d < pixel["heldout_distances"].min())
    order = np.argsort(d, kind="stable")[:CLOSEST_PAIRS]
    arrays = {name: {k: s.pop(k) for k in ("distances", "heldout_distances", "nearest")} for name, s in spaces.items()}
    return {
        "copy_fraction": max(spaces["pixel"]["copy_fraction"], spaces["feature"]["copy_fraction"]),
        "exact_copies": int(exact.sum()), "near_copies": int(near.sum()), "n_synthetic": int(len(d)),
        "percentile": COPY_PERCENTILE, **spaces,
        "closest_pairs": [{"synthetic": int(i), "train": int(pixel_nearest), "distance": float(d[i])}
                          for i, pixel_nearest in zip(order, arrays["pixel"]["nearest"][order], strict=True)],
        "_arrays": arrays,
    }


def _cp_lower(k, n, alpha):
    """One-sided Clopper-Pearson lower bound of a binomial proportion k/n at confidence 1 - alpha."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    return np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1), 0.0)


def _cp_upper(k, n, alpha):
    """One-sided Clopper-Pearson upper bound of k/n at confidence 1 - alpha."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    return np.where(k < n, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)), 1.0)


def epsilon_lower_bound(tp, fn, fp, tn, delta: float, confidence: float = 0.95):
    """Lower bound on epsilon implied by a membership test's counts (vectorised over thresholds).

    ``epsilon >= max(log((TPR_lo - delta) / FPR_hi), log((TNR_lo - delta) / FNR_hi), 0)`` with Clopper-Pearson
    bounds; each of the two bounds used at confidence 1 - (1 - confidence) / 2, so the pair holds jointly at
    ``confidence`` (Bonferroni). Jagielski et al. 2020, arXiv 2006.07709.
    """
    alpha = (1 - confidence) / 2
    tp, fn, fp, tn = (np.asarray(v, dtype=float) for v in (tp, fn, fp, tn))
    tpr_lo, fpr_hi = _cp_lower(tp, tp + fn, alpha), _cp_upper(fp, fp + tn, alpha)
    tnr_lo, fnr_hi = _cp_lower(tn, fp + tn, alpha), _cp_upper(fn, tp + fn, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), 0.0)
        b = np.where(tnr_lo > delta, np.log((tnr_lo - delta) / fnr_hi), 0.0)
    return np.maximum(np.maximum(a, b), 0.0)


def _counts(members: np.ndarray, nonmembers: np.ndarray, thresholds: np.ndarray):
    """(tp, fn, fp, tn) of the test "member if score >= t" for each threshold t."""
    m, o = np.sort(members), np.sort(nonmembers)
    tp = len(m) - np.searchsorted(m, thresholds, side="left")
    fp = len(o) - np.searchsorted(o, thresholds, side="left")
    return tp, len(m) - tp, fp, len(o) - fp


def membership_inference(member_scores: np.ndarray, nonmember_scores: np.ndarray, delta: float = 1e-5,
                         seed: int = 0, member_subjects: np.ndarray | None = None,
                         nonmember_subjects: np.ndarray | None = None, bootstraps: int = 200) -> dict:
    """Loss-threshold membership inference: higher score (log-likelihood) means "member".

    Arguments:
        member_scores: Scores of training images (N_m,).
        nonmember_scores: Scores of held-out images (N_o,).
        delta: The delta of the (epsilon, delta) bound.
        seed: Seeds the split into threshold-selection and evaluation halves, and the bootstrap.
        member_subjects, nonmember_subjects: Subject of each image. With both, the AUC gets a 95% interval from a
            bootstrap over subjects: the slices of one subject are not independent, and with few held-out subjects
            the AUC measures how those subjects differ as much as membership.
        bootstraps: Bootstrap resamples of the interval.

    Returns:
        ``{"auc", "auc_interval" ([low, high] or None), "tpr_at_fpr": {"0.01", "0.001"}, "fpr_resolvable": {...},
        "epsilon_lower_bound", "delta", "confidence", "threshold", "n_members", "n_nonmembers", "n_member_subjects",
        "n_nonmember_subjects"}`` (subject counts None without subjects); ``fpr_resolvable`` is False where fewer
        than 1/FPR non-members make that FPR unmeasurable (the TPR is then the one at FPR 0).
    """
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    scores = np.r_[members, nonmembers]
    fpr, tpr, _ = roc_curve(y, scores)
    tpr_at = {str(t): float(tpr[fpr <= t].max()) for t in FPR_TARGETS}

    rng = np.random.default_rng(seed)
    pm, po = rng.permutation(len(members)), rng.permutation(len(nonmembers))
    (m_sel, m_eval), (o_sel, o_eval) = np.array_split(members[pm], 2), np.array_split(nonmembers[po], 2)
    candidates = np.unique(np.r_[m_sel, o_sel])
    eps_sel = epsilon_lower_bound(*_counts(m_sel, o_sel, candidates), delta)
    threshold = float(candidates[int(np.argmax(eps_sel))]) if len(candidates) else float("nan")
    eps = float(epsilon_lower_bound(*_counts(m_eval, o_eval, np.array([threshold])), delta)[0])
    interval = n_subjects = None
    if member_subjects is not None and nonmember_subjects is not None:
        groups = [_rows_by_subject(member_subjects), _rows_by_subject(nonmember_subjects)]
        n_subjects = [len(g) for g in groups]
        aucs = []
        for _ in range(bootstraps):
            m, o = (np.concatenate([g[i] for i in rng.integers(0, len(g), len(g))]) for g in groups)
            aucs.append(roc_auc_score(np.r_[np.ones(len(m)), np.zeros(len(o))], np.r_[members[m], nonmembers[o]]))
        interval = [float(v) for v in np.percentile(aucs, [2.5, 97.5])]
    return {
        "auc": float(roc_auc_score(y, scores)), "auc_interval": interval, "tpr_at_fpr": tpr_at,
        "fpr_resolvable": {str(t): bool(len(nonmembers) >= 1 / t) for t in FPR_TARGETS},
        "epsilon_lower_bound": eps, "delta": delta, "confidence": 0.95, "threshold": threshold,
        "n_members": int(len(members)), "n_nonmembers": int(len(nonmembers)),
        "n_member_subjects": None if n_subjects is None else n_subjects[0],
        "n_nonmember_subjects": None if n_subjects is None else n_subjects[1],
        "_roc": {"fpr": fpr, "tpr": tpr},
    }


def _rows_by_subject(subjects: np.ndarray) -> list[np.ndarray]:
    """The row indices of each subject."""
    _, inverse = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
