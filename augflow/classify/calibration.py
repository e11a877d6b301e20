"""Calibration of a classifier's posterior, fitted on labelled data and stored with the model.

The posterior is ``softmax((scores + log prior) / T)`` and the decision ``argmax(scores + log prior + b)``:

- ``T``, temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", 2017,
  arXiv:1706.04599), fixes over- or under-confidence without changing any decision;
- ``b``, one offset per class (logit adjustment; Menon et al. 2021, arXiv:2007.07314), corrects the normalisers
  of class-conditional likelihoods: a class whose density is systematically higher wins the argmax for images of
  every class even when the likelihoods rank the images well (high AUC, low balanced accuracy). ``b_0 = 0``.

The offsets are fitted (jointly with a temperature) by minimising the class-balanced negative log-likelihood of the
labels of a held-out file: each class weighs the same, so the minority classes count as much as in balanced accuracy,
and a small L2 penalty on ``b / T`` keeps the offsets finite when a class is perfectly separated. They set the
decisions only. The probabilities keep the Bayes posterior of the training prior, its ``T`` fitted alone by the
ordinary negative log-likelihood (Guo et al.): a confidence is a frequency among the images as they come, majority
classes included, which is what the expected calibration error measures. Offsets in the probabilities as well would
make them the posterior of a balanced world, miscalibrated for the data a user has (5-fold test ECE 0.097 against
0.060 for the Bayes posterior, same decisions; reports/classification-notes.md). The offsets are optional, and may be
fitted on other labelled files than the temperature (``offsets_on``): a validation split holds a handful of images of
a rare class, and offsets fitted on them vary from split to split; the training file holds several times as many.
Offsets are a K-parameter decision rule, not a confidence, so the training images bias them little, whereas the
temperature is fitted on images the model never trained on (reports/classification-32-shift.md). The
fitted record is stored beside the model (``calibration.json``, :mod:`augflow.runs`) and used by later calls that fit
none. This calibration temperature is not the sampling temperature stored with the model (``meta["temperature"]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from augflow.classify.metrics import Calibration, Scorer, balanced_accuracy, expected_calibration_error, power_scores
from augflow.data.store import read_info, sha256_file
from augflow.errors import DataError
from augflow.runs import calibration_file, check_classes, write_json

BIAS_L2 = 1e-4  # per squared logit: negligible against the likelihood term, finite offsets on separable data


def fit_calibration(scores: np.ndarray, labels: np.ndarray, log_pi: np.ndarray, biases: bool = True,
                    distance_powers: Sequence[float] = ()) -> Calibration:
    """Decision offsets ``b`` (when ``biases``) by the class-balanced NLL of ``labels``; ``T`` by their ordinary NLL
    without offsets; for scores that are minus distances, the power of :func:`power_scores` too.

    Arguments:
        scores: (N, K) class scores (``log p(x | k)`` for the likelihood classifier).
        labels: (N,) true classes.
        log_pi: (K,) log prior.
        biases: Fit the K - 1 free class offsets (else the temperature only).
        distance_powers: Scores that are minus distances (MedSymmFlow's read-out): the powers to choose from, the
            one whose temperature-scaled posterior has the lowest NLL of ``labels`` (a grid: a temperature is fitted
            for each); empty: the scores as they are.
    """
    labels = np.asarray(labels)
    if distance_powers:
        fits = {q: _fit_temperature(power_scores(scores, q), labels, log_pi) for q in distance_powers}
        power = min(fits, key=lambda q: fits[q][1])
        scores, temperature = power_scores(scores, power), fits[power][0]
    else:
        power, temperature = None, _fit_temperature(scores, labels, log_pi)[0]
    offsets = _fit_offsets(scores, labels, log_pi) if biases else None
    return Calibration(temperature, offsets, distance_power=power)


def _nll(scores: np.ndarray, labels: np.ndarray, log_pi: np.ndarray, theta: np.ndarray, weight: np.ndarray) -> float:
    """Weighted NLL of the labels under ``softmax((scores + log_pi + b) / T)``; theta = (log T, b_1 / T, ...,
    b_{K-1} / T): offsets in units of the posterior's logits, so that their penalty does not depend on the scale of
    the scores (theta = (log T,): no offsets)."""
    t = np.exp(theta[0])
    b = t * np.concatenate([[0.0], theta[1:]]) if len(theta) > 1 else 0.0
    logits = (scores + log_pi + b) / t
    log_p = logits[np.arange(len(labels)), labels] - np.logaddexp.reduce(logits, axis=1)
    return float(-np.sum(weight * log_p) / weight.sum() + BIAS_L2 * np.sum(theta[1:] ** 2))


def _log_t0(scores: np.ndarray) -> float:
    """Start T at the scores' spread: log-likelihood gaps are hundreds of nats, softmax needs units."""
    return float(np.log(max(float(np.std(scores)), 1e-3)))


def _fit_temperature(scores: np.ndarray, labels: np.ndarray, log_pi: np.ndarray) -> tuple[float, float]:
    """``T`` by the ordinary NLL, and that NLL."""
    fit = minimize(lambda theta: _nll(scores, labels, log_pi, theta, np.ones(len(labels))), [_log_t0(scores)],
                   method="L-BFGS-B", bounds=[(-3, 12)])
    return float(np.exp(fit.x[0])), float(fit.fun)


def _fit_offsets(scores: np.ndarray, labels: np.ndarray, log_pi: np.ndarray) -> tuple[float, ...]:
    """The offsets ``b`` (``b_0 = 0``), jointly with a temperature, by the class-balanced NLL."""
    k = scores.shape[1]
    balanced = 1.0 / np.bincount(labels, minlength=k)[labels]
    theta = minimize(lambda theta: _nll(scores, labels, log_pi, theta, balanced),
                     np.concatenate([[_log_t0(scores)], np.zeros(k - 1)]), method="L-BFGS-B",
                     bounds=[(-3, 12)] + [(None, None)] * (k - 1)).x
    return tuple(map(float, np.exp(theta[0]) * np.concatenate([[0.0], theta[1:]])))


def calibrate(model: str | os.PathLike, scorer: Scorer, calibrate_on: str | os.PathLike,
              class_names: list[str], biases: bool = True, offsets_on: Sequence[str | os.PathLike] = ()) -> dict:
    """Fit the calibration of a classifier on a labelled file and store it beside the model.

    Arguments:
        model: The model's run folder or file (where the record is stored).
        scorer: The model's classifier (its ``shift_radius`` or read-out ``passes`` and ``steps``, if any, are
            recorded: the fit holds for them only; a read-out's ``distance_powers`` are the powers its posterior may
            take).
        calibrate_on: The labelled file (the validation split).
        class_names: The model's classes.
        biases: Fit per-class offsets as well as the temperature.
        offsets_on: Labelled files to fit the offsets on instead of ``calibrate_on`` (for example the training
            and validation files together: more images of the rare classes, whose few validation images make the
            offsets vary; the temperature stays fitted on ``calibrate_on``, which the model never trained on).

    Returns:
        The stored record: ``{"calibration_temperature", "class_biases" (by class name, or None), "prior",
        "shift_radius", "passes", "steps", "distance_power", "fitted_on", "fitted_on_sha256", "offsets_fitted_on", "n",
        "ece_before", "ece_after", "balanced_accuracy_before", "balanced_accuracy_after"}`` (before / after: on
        ``calibrate_on``).

    Raises:
        DataError: If a file's classes differ from the model's, or the offsets' files lack images of a class.
    """
    val = read_info(calibrate_on).require_images("--calibrate-on")
    check_classes(val.class_names, class_names, f"--calibrate-on {calibrate_on}")
    infos = [read_info(f).require_images("--offsets-on") for f in offsets_on] if biases else []
    for info in infos:
        check_classes(info.class_names, class_names, f"--offsets-on {info.path}")
    if biases:
        _check_every_class(offsets_on or [calibrate_on], infos or [val], class_names)
    scores = scorer.score(calibrate_on)
    radius, passes = getattr(scorer, "shift_radius", 0), getattr(scorer, "passes", 1)
    steps = getattr(scorer, "steps", None)
    fitted = fit_calibration(scores.values, val.labels, scores.log_prior, biases and not offsets_on,
                             getattr(scorer, "distance_powers", ()))
    power, offsets = fitted.distance_power, fitted.biases
    if infos:
        same = Path(calibrate_on).resolve()  # its scores are computed above
        pooled = np.concatenate([scores.values if Path(f).resolve() == same else scorer.score(f).values
                                 for f in offsets_on])
        pooled = pooled if power is None else power_scores(pooled, power)
        offsets = fit_calibration(pooled, np.concatenate([info.labels for info in infos]), scores.log_prior).biases
    fitted = Calibration(fitted.temperature, offsets, radius, passes, power, steps)
    before, after = scores.predictions(), scores.predictions(fitted)
    record = {
        "calibration_temperature": fitted.temperature,
        "class_biases": None if fitted.biases is None else dict(zip(class_names, fitted.biases, strict=True)),
        "prior": scorer.prior, "shift_radius": radius, "passes": passes, "steps": steps, "distance_power": power,
        "fitted_on": str(Path(calibrate_on).resolve()),
        "fitted_on_sha256": sha256_file(calibrate_on),
        "offsets_fitted_on": [str(Path(f).resolve()) for f in offsets_on] if biases and offsets_on else None,
        "n": len(val),
        "ece_before": expected_calibration_error(before.probs, val.labels),
        "ece_after": expected_calibration_error(after.probs, val.labels),
        "balanced_accuracy_before": balanced_accuracy(val.labels, before.predicted),
        "balanced_accuracy_after": balanced_accuracy(val.labels, after.predicted),
    }
    write_json(record, calibration_file(model))
    return record


def _check_every_class(files: Sequence[str | os.PathLike], infos: list, class_names: list[str]) -> None:
    """The per-class offsets need images of every class: the offset of a class without any would be pushed down until
    the class is never predicted."""
    labels = np.concatenate([info.labels for info in infos])
    missing = [name for i, name in enumerate(class_names) if not np.any(labels == i)]
    if missing:
        raise DataError(f"{', '.join(map(str, files))}: no images of class(es) {missing}, so their decision offsets "
                        f"cannot be fitted (the class would never be predicted); fit the offsets on files that have "
                        f"every class (--offsets-on train.h5 --offsets-on val.h5), or the temperature only "
                        f"(--no-class-offsets)")


def stored_calibration(model: str | os.PathLike, prior: str, class_names: list[str]) -> Calibration | None:
    """The calibration stored for a model and prior, or None; the offsets in the order of ``class_names``.

    The record keys the offsets by class name (and JSON sorts the keys), so they are read back by name, never by
    position. Files written before the keys were renamed hold the temperature as ``"temperature"`` and no biases.

    Raises:
        DataError: If the stored offsets name other classes than the model's.
    """
    path = calibration_file(model)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("prior") != prior:
        return None
    biases = record.get("class_biases")
    if biases is not None:
        check_classes(sorted(biases), sorted(class_names), str(path))
        biases = tuple(float(biases[name]) for name in class_names)
    return Calibration(record.get("calibration_temperature", record.get("temperature")), biases,
                       record.get("shift_radius", 0), record.get("passes", 1), record.get("distance_power"),
                       record.get("steps"))
