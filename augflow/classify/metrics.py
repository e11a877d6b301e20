"""Classification metrics with stable keys: pure functions of labels, class scores and a posterior.

Every classifier of augflow reports through :class:`Scores` — per-image class scores (``log p(x | k)`` of
MAGIC-Flow's likelihood classifier, minus the mask's distance to each class colour of MedSymmFlow's read-out) and
how to read them — so ``augflow classify --json`` has the same keys for every family. The posterior is
``softmax((scores + log prior) / T)`` with ``T`` fitted by temperature scaling (Guo et al. 2017, arXiv 1706.04599);
uncertainty is the predictive entropy unless the classifier brings its own, and the selective-prediction curve
reports the accuracy on the images kept when the most uncertain ones are rejected.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from sklearn import metrics as skm

REJECTION_GRID = np.arange(0, 100, 5) / 100  # reject the most uncertain 0, 5, ..., 95 %
DISTANCE_EPS = 1e-6  # keeps power_scores finite for a mask exactly on a colour


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration: the posterior's temperature ``T`` and per-class decision offsets ``b`` (None: none).

    The probabilities are the Bayes posterior ``softmax((scores + log prior) / T)``, calibrated for images with the
    training mix; the offsets move only the decisions, ``argmax(scores + log prior + b)``, to the minority classes
    (a cost-sensitive decision rule: the probabilities stay those of the images as they come). ``shift_radius``: the
    test-time shift averaging of the scores both were fitted to (:mod:`augflow.classify.likelihood`); ``passes``: the
    read-out passes averaged in MedSymmFlow's scores (:mod:`augflow.classify.readout`) and ``steps`` the integration
    steps of each (None: the model's own); scores to be calibrated must be computed with them. ``distance_power``:
    scores that are minus distances (the read-out's) enter the posterior and the offsets through :func:`power_scores`
    with this power (None: as they are).
    """

    temperature: float = 1.0
    biases: tuple[float, ...] | None = None
    shift_radius: int = 0
    passes: int = 1
    distance_power: float | None = None
    steps: int | None = None

    def predict(self, scores: np.ndarray, log_pi: np.ndarray) -> Predictions:
        """The calibrated posterior of class scores (N, K) under a log prior, the decisions and the entropy."""
        logits = scores if self.distance_power is None else power_scores(scores, self.distance_power)
        preds = predict(logits, log_pi, self.temperature)
        preds.log_likelihoods = scores
        if self.biases is not None:
            preds.predicted = np.argmax(logits + log_pi + np.asarray(self.biases), axis=1)
        return preds


def power_scores(scores: np.ndarray, power: float) -> np.ndarray:
    """Scores ``-d`` (minus distances) as minus the Box-Cox transform of the distance, ``-(d^power - 1) / power``
    (``-log d`` at power 0; power 1 keeps the scores up to a constant).

    Why: in ``softmax(-d / T)`` the gap between two classes' logits is at most the distance between their colours
    over ``T`` (triangle inequality), so a mask that sits on its colour can never be confident unless ``T`` is
    small, and then every ambiguous mask is over-confident. A power below 1 lets the logit of a colour grow without
    bound as the mask approaches it.
    """
    d = np.maximum(-scores, 0.0) + DISTANCE_EPS
    return -np.log(d) if power == 0 else -(d ** power - 1.0) / power


def posterior(log_likelihoods: np.ndarray, log_pi: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``p(y | x)`` (N, K) from log-likelihoods (N, K) and a log prior, with the logits divided by ``temperature``."""
    logits = (log_likelihoods + log_pi) / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    return float(_binned_gaps(probs, (probs.argmax(axis=1) == labels)[None], bins)[0])


def calibration_error_floor(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """The ECE a perfectly calibrated classifier shows on these images: mean and std over label sets drawn from
    ``probs`` itself (consistency resampling; Bröcker & Smith, "Increasing the Reliability of Reliability Diagrams",
    Weather and Forecasting 2007). On a few hundred images it is about 0.05, so an ECE near it cannot be told from
    perfect calibration."""
    rng = np.random.default_rng(seed)
    drawn = (rng.random((draws, len(probs), 1)) > np.cumsum(probs, axis=1)[None]).sum(axis=2)
    gaps = _binned_gaps(probs, drawn == probs.argmax(axis=1)[None], bins)
    return float(gaps.mean()), float(gaps.std())


def _binned_gaps(probs: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of ``correct`` (draws, N) for the top-label confidences of ``probs`` (N, K)."""
    confidence = probs.max(axis=1)
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    gaps = np.zeros(len(correct))
    for b in np.unique(which):
        members = which == b
        gaps += np.abs(correct[:, members].mean(axis=1) - confidence[members].mean()) * members.mean()
    return gaps


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats, (N,)."""
    return -np.sum(probs * np.log(np.maximum(probs, 1e-300)), axis=1)


def selective_prediction(correct: np.ndarray, uncertainty: np.ndarray) -> dict:
    """Accuracy on the kept images when the most uncertain 0, 5, ..., 95 % are rejected, and the curve's area.

    The area is the mean accuracy over the rejection grid (1.0 for a perfect classifier).
    """
    order = np.argsort(-uncertainty, kind="stable")  # most uncertain first
    n = len(correct)
    accuracy = []
    for fraction in REJECTION_GRID:
        kept = order[int(math.floor(fraction * n)):]
        accuracy.append(float(np.mean(correct[kept])) if len(kept) else float("nan"))
    return {"rejected": REJECTION_GRID.tolist(), "accuracy": accuracy, "area": float(np.nanmean(accuracy))}


def error_auroc(wrong: np.ndarray, uncertainty: np.ndarray) -> float:
    """AUROC of the uncertainty for detecting wrong predictions (0.5 = uninformative; nan without errors)."""
    wrong = np.asarray(wrong, dtype=bool)
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(skm.roc_auc_score(wrong, uncertainty))


@dataclass
class Predictions:
    """Per-image results of a classifier over a dataset."""

    log_likelihoods: np.ndarray  # (N, K) the class scores: log p(x | k), or minus the mask's colour distances
    probs: np.ndarray  # (N, K) calibrated posterior
    predicted: np.ndarray  # (N,)
    entropy: np.ndarray  # (N,)


def predict(log_likelihoods: np.ndarray, log_pi: np.ndarray, temperature: float = 1.0) -> Predictions:
    """The posterior of class scores and a log prior at a temperature, its argmax and its entropy."""
    probs = posterior(log_likelihoods, log_pi, temperature)
    return Predictions(log_likelihoods, probs, probs.argmax(axis=1), entropy(probs))


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels`` (scikit-learn's definition).

    A class without images has no recall; the metrics name such classes (``classes_without_images``) instead of
    scikit-learn's warning that the predictions hold a class the labels do not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")  # one class present: still defined
        return float(skm.balanced_accuracy_score(labels, predicted))


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUC (scikit-learn's "ovr"/"macro" definition) over the classes present in the labels."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([skm.roc_auc_score(labels == c, scores[:, c]) for c in present]))


def classification_metrics(labels: np.ndarray, preds: Predictions, class_names: list[str],
                           scores: np.ndarray | None = None, uncertainty: np.ndarray | None = None) -> dict:
    """The metrics of ``augflow classify --json`` (scikit-learn), with stable keys.

    Arguments:
        labels: (N,) true labels.
        preds: The predictions.
        class_names: The K class names.
        scores: (N, K) class scores for the AUC; the posterior ``preds.probs`` when omitted.
        uncertainty: (N,) ranking of the selective-prediction curve; the posterior's entropy when omitted.
    """
    k = len(class_names)
    y, yhat = np.asarray(labels), preds.predicted
    present = np.isin(np.arange(k), y)  # macro means over these, as balanced accuracy: an absent class has no recall
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, yhat, labels=np.flatnonzero(present), average="macro", zero_division=0)
    per_class_recall = skm.recall_score(y, yhat, labels=np.arange(k), average=None, zero_division=0)
    per_class_recall[~present] = np.nan
    return {
        "n": int(len(y)),
        "classes_without_images": [name for name, p in zip(class_names, present, strict=True) if not p],
        "accuracy": float(skm.accuracy_score(y, yhat)),
        "balanced_accuracy": balanced_accuracy(y, yhat),
        "auc_macro": macro_auc(y, preds.probs if scores is None else scores),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "per_class_recall": dict(zip(class_names, map(float, per_class_recall), strict=True)),
        "confusion_matrix": skm.confusion_matrix(y, yhat, labels=np.arange(k)).tolist(),
        "ece": expected_calibration_error(preds.probs, y),
        "ece_floor": calibration_error_floor(preds.probs)[0],
        "selective_prediction": selective_prediction(yhat == y, preds.entropy if uncertainty is None else uncertainty),
    }


@dataclass
class Scores:
    """A classifier's class scores of N images, and how to read them.

    Attributes:
        values: (N, K) class scores, higher = more likely.
        log_prior: (K,) log prior added to the scores before the softmax (zeros: none).
        predicted: (N,) the classifier's own decision where it is not the posterior's argmax (None: the argmax).
        uncertainty: (N,) its own uncertainty, which ranks the selective-prediction curve and is scored for
            detecting errors (None: the posterior's entropy, not scored).
        auc_from_values: Compute the AUC from ``values`` (else from the posterior).
        extra: Further metrics of the classifier, reported after the shared ones.
    """

    values: np.ndarray
    log_prior: np.ndarray
    predicted: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    auc_from_values: bool = False
    extra: dict = field(default_factory=dict)

    def predictions(self, calibration: Calibration | None = None) -> Predictions:
        """The posterior ``softmax((values + log_prior) / T)`` of a calibration and its decisions (none: T = 1)."""
        calibration = calibration or Calibration()
        preds = calibration.predict(self.values, self.log_prior)
        if self.predicted is not None and calibration.biases is None:  # the same argmax, kept exactly (no ties
            # from a flat posterior); class offsets change the decisions
            preds.predicted = self.predicted
        return preds

    def metrics(self, labels: np.ndarray, class_names: list[str], calibration: Calibration | None = None) -> dict:
        """:func:`classification_metrics` of the scores under a calibration, and the classifier's own."""
        labels = np.asarray(labels)
        preds = self.predictions(calibration)
        metrics = classification_metrics(labels, preds, class_names,
                                         scores=self.values if self.auc_from_values else None,
                                         uncertainty=self.uncertainty)
        metrics.update(self.extra)
        if self.uncertainty is not None:
            metrics["uncertainty_error_auroc"] = error_auroc(preds.predicted != labels, self.uncertainty)
        return metrics


class Scorer(Protocol):
    """A classifier of dataset files: MAGIC-Flow's likelihood classifier or MedSymmFlow's read-out.

    Attributes:
        prior: The class prior's name, reported in the metrics (``"train"``, ``"uniform"``, or ``"none"``).
        score_column: Prefix of the score columns of the predictions file (``"logp_x_given"``).
    """

    prior: str
    score_column: str

    def score(self, path: str | Path) -> Scores:
        """The class scores of every image of a dataset file."""
