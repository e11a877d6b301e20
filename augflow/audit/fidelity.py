"""Fidelity of synthetic images: FID, KID and precision/recall/density/coverage, each beside a real-vs-real reference.

Everything is computed in one feature space (:mod:`augflow.audit.features`) against the held-out real test
images, for two candidates of equal size: the synthetic images and the real training images. The second pair
(real train vs real test) is the reference: the value a perfect generator could reach with this many images,
since FID is biased by the sample size (Chong & Forsyth 2020, arXiv 1911.07023). Candidates are subsampled
(seeded) to a common size per comparison, overall and per class.

- FID (Heusel et al. 2017, arXiv 1706.08500) and KID (Binkowski et al. 2018, arXiv 1801.01401): the overall
  values come from ``torch_fidelity.calculate_metrics`` with the registered extractor; per-class values from
  the same features, KID with torch-fidelity's own function, FID with an eigen-decomposition form that equals
  torch-fidelity's (tested) and is fast enough for the bootstrap. FID's 95% interval is a bootstrap over the
  candidate set (reference fixed), centred on the point estimate (see :func:`fid_bootstrap`); KID reports the
  mean and standard deviation over subsets.
- Precision, recall, density and coverage (Naeem et al. 2020, arXiv 2002.09797) with ``prdc.compute_prdc``,
  k = 5: precision/density measure how much of the synthetic set lies on the real manifold, recall/coverage
  how much of the real manifold the synthetic set covers (a collapsed generator: high precision, low recall).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from augflow.audit.features import FeatureSpace

NEAREST_K = 5
KID_SUBSETS = 100
MAX_KID_SUBSET = 1000
CANDIDATES = ("synthetic", "real")  # "real": the real training images, the real-vs-real reference


def frechet_distance(reference: np.ndarray, candidate: np.ndarray) -> float:
    """FID between two feature sets (N, D), with torch-fidelity's statistics and formula."""
    stats = [fid_features_to_statistics(torch.from_numpy(np.asarray(f, dtype=np.float64)))
             for f in (reference, candidate)]
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


class FrechetToReference:
    """Fast FID of many candidate sets against one fixed reference set (for the bootstrap).

    ``tr sqrt(S_r S_c) = sum sqrt(eig(A S_c A))`` with ``A = S_r^(1/2)`` computed once: a symmetric
    eigenproblem instead of torch-fidelity's general one. With ``S_c = X^T X / (n - 1)`` for the centred
    candidate X (n, D), ``A S_c A`` has the non-zero eigenvalues of the n x n matrix ``X A A X^T / (n - 1)``,
    which is the smaller problem when n < D.
    """

    def __init__(self, reference: np.ndarray):
        self.mu = reference.mean(axis=0)
        sigma = np.cov(reference, rowvar=False)
        self.trace = np.trace(sigma)
        w, v = np.linalg.eigh(sigma)
        self.sqrt_sigma = (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def __call__(self, candidate: np.ndarray) -> float:
        n = len(candidate)
        xc = candidate - candidate.mean(axis=0)
        b = xc @ self.sqrt_sigma  # (n, D)
        m = b @ b.T if n < b.shape[1] else b.T @ b
        eig = np.linalg.eigvalsh(m / (n - 1))
        diff = self.mu - candidate.mean(axis=0)
        trace = np.sum(xc * xc) / (n - 1)
        return float(diff @ diff + self.trace + trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid_bootstrap(fid: FrechetToReference, candidate: np.ndarray, bootstraps: int, seed: int) -> list[float] | None:
    """95% interval of FID over ``bootstraps`` resamples (with replacement) of the candidate set.

    A resample repeats images, which shrinks its covariance and biases its FID upwards (the whole bootstrap
    distribution can lie above the point estimate); the percentiles are therefore taken of the bootstrap
    distribution shifted by its mean bias, so the interval describes the spread around the point estimate.
    """
    if bootstraps < 2 or len(candidate) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([fid(candidate[rng.integers(0, len(candidate), len(candidate))]) for _ in range(bootstraps)])
    values -= values.mean() - fid(candidate)
    return [float(v) for v in np.clip(np.percentile(values, [2.5, 97.5]), 0, None)]


def kid_subset_size(n_reference: int, n_candidate: int) -> int:
    """Subsets of half the smaller set, at most 1000: subsets as large as a set would all be the whole set, and
    the standard deviation over them would be 0 whatever the sampling noise."""
    return max(2, min(MAX_KID_SUBSET, min(n_reference, n_candidate) // 2))


def kernel_distance(reference: np.ndarray, candidate: np.ndarray, seed: int) -> dict:
    """KID (unbiased MMD^2, cubic polynomial kernel) mean and std over subsets, via torch-fidelity."""
    size = kid_subset_size(len(reference), len(candidate))
    # candidate first, as calculate_metrics(input1=candidate, input2=reference) orders them: the same subsets
    out = kid_features_to_metric(torch.from_numpy(candidate), torch.from_numpy(reference), kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, verbose=False, rng_seed=seed)
    return {"kid": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"]), "kid_subset_size": size}


def prdc_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int = NEAREST_K) -> dict:
    """Precision, recall, density, coverage (Naeem et al. 2020) with the ``prdc`` package, its printing silenced."""
    import prdc

    with contextlib.redirect_stdout(io.StringIO()):
        out = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=nearest_k)
    return {k: float(out[k]) for k in ("precision", "recall", "density", "coverage")}


def compare(reference: np.ndarray, candidate: np.ndarray, bootstraps: int = 100, seed: int = 0) -> dict:
    """All fidelity metrics of one candidate feature set against the reference (held-out real) set.

    Metrics that a set is too small for are None: FID/KID need 2 images per set, PRDC more than k + 1 = 6.
    """
    out = {"n_reference": int(len(reference)), "n_candidate": int(len(candidate)), "fid": None, "fid_ci95": None,
           "kid": None, "kid_std": None, "precision": None, "recall": None, "density": None, "coverage": None}
    # Small matrix products and D x D eigenproblems gain little from BLAS threads, and stall badly when the cores
    # are shared (measured here: KID of 300 x 16 features 10 s with 2 threads under load, 0.6 s with one).
    with threadpool_limits(1, "blas"):
        if min(len(reference), len(candidate)) >= 2:
            fid = FrechetToReference(reference)
            out["fid"] = fid(candidate)
            out["fid_ci95"] = fid_bootstrap(fid, candidate, bootstraps, seed)
            out.update(kernel_distance(reference, candidate, seed))
        if min(len(reference), len(candidate)) > NEAREST_K + 1:  # prdc partitions at k + 1
            out.update(prdc_metrics(reference, candidate))
    return out


def matched_subsets(synthetic: np.ndarray, real: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of equally many synthetic and real candidates (a seeded subsample of the larger set)."""
    rng = np.random.default_rng(seed)
    n = min(len(synthetic), len(real))
    return (np.sort(rng.choice(len(synthetic), n, replace=False)), np.sort(rng.choice(len(real), n, replace=False)))


def fidelity(test: np.ndarray, test_labels: np.ndarray, synthetic: np.ndarray, synthetic_labels: np.ndarray,
             train: np.ndarray, train_labels: np.ndarray, class_names: list[str], bootstraps: int = 100,
             seed: int = 0) -> dict:
    """Fidelity of the synthetic features and of the real training features, both against the test features.

    Arguments:
        test, synthetic, train: Feature arrays (N, D) of the held-out real, synthetic and real training images.
        test_labels, synthetic_labels, train_labels: Their class indices.
        class_names: The K class names.
        bootstraps: FID bootstrap resamples.
        seed: Seeds the subsampling, the bootstrap and KID's subsets.

    Returns:
        ``{"overall": {"synthetic": metrics, "real": metrics}, "per_class": {name: {...same...}},
        "subsets": {"overall": (synthetic rows, train rows)}}``; metrics as in :func:`compare`. The overall
        comparison uses the files as they are: a top-up file's class mix differs from the real one, so read the
        per-class rows for class-level fidelity.
    """

    def pair(ref, synth, real, s):
        i, j = matched_subsets(synth, real, s)
        return {"synthetic": compare(ref, synth[i], bootstraps, s), "real": compare(ref, real[j], bootstraps, s)}, \
            (i, j)

    overall, rows = pair(test, synthetic, train, seed)
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[name], _ = pair(test[test_labels == k], synthetic[synthetic_labels == k],
                                  train[train_labels == k], seed + 1 + k)
    return {"overall": overall, "per_class": per_class, "subsets": {"overall": rows}}


class _Images(Dataset):
    """Images as the tensors a torch-fidelity extractor takes, one per item."""

    def __init__(self, space: FeatureSpace, images: np.ndarray):
        self.space, self.images = space, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.space.to_input(self.images[i:i + 1])[0]


def torch_fidelity_metrics(space: FeatureSpace, reference: np.ndarray, candidate: np.ndarray, seed: int = 0) -> dict:
    """FID and KID of two image sets (N, C, H, W) with ``torch_fidelity.calculate_metrics`` in ``space``."""
    import torch_fidelity

    with threadpool_limits(1, "blas"):
        out = torch_fidelity.calculate_metrics(
            input1=_Images(space, candidate), input2=_Images(space, reference), fid=True, kid=True, cuda=False,
            cache=False, save_cpu_ram=True, verbose=False, batch_size=128, rng_seed=seed, kid_subsets=KID_SUBSETS,
            kid_subset_size=kid_subset_size(len(reference), len(candidate)), **space.metric_kwargs())
    return {"fid": float(out["frechet_inception_distance"]), "kid": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"])}
