"""Calibration of a classifier's posterior by one temperature, fitted on labelled data and stored with the model.

Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", 2017,
arXiv:1706.04599): the posterior is ``softmax((scores + log prior) / T)`` with ``T`` minimising the negative
log-likelihood of the labels of a held-out file. The fitted record is stored beside the model
(``calibration.json``, :mod:`augflow.runs`) and used by later calls that fit none. This calibration temperature is
not the sampling temperature stored with the model (``meta["temperature"]``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from augflow.classify.metrics import Scorer, expected_calibration_error, posterior
from augflow.data.store import read_info, sha256_file
from augflow.runs import calibration_file, check_classes, write_json


def fit_temperature(log_likelihoods: np.ndarray, labels: np.ndarray, log_pi: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of the labels (searched on log T in [-3, 12])."""

    def nll(log_t: float) -> float:
        p = posterior(log_likelihoods, log_pi, math.exp(log_t))
        return -np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-300)))

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 12), method="bounded").x))


def calibrate(model: str | os.PathLike, scorer: Scorer, calibrate_on: str | os.PathLike,
              class_names: list[str]) -> dict:
    """Fit the calibration temperature of a classifier on a labelled file and store it beside the model.

    Arguments:
        model: The model's run folder or file (where the record is stored).
        scorer: The model's classifier.
        calibrate_on: The labelled file (the validation split).
        class_names: The model's classes.

    Returns:
        The stored record: ``{"calibration_temperature", "prior", "fitted_on", "fitted_on_sha256", "n",
        "ece_before", "ece_after"}``.

    Raises:
        DataError: If the file's classes differ from the model's.
    """
    val = read_info(calibrate_on).require_images("--calibrate-on")
    check_classes(val.class_names, class_names, f"--calibrate-on {calibrate_on}")
    scores = scorer.score(calibrate_on)
    temperature = fit_temperature(scores.values, val.labels, scores.log_prior)
    record = {
        "calibration_temperature": temperature, "prior": scorer.prior,
        "fitted_on": str(Path(calibrate_on).resolve()), "fitted_on_sha256": sha256_file(calibrate_on),
        "n": len(val), "ece_before": expected_calibration_error(scores.predictions().probs, val.labels),
        "ece_after": expected_calibration_error(scores.predictions(temperature).probs, val.labels),
    }
    write_json(record, calibration_file(model))
    return record


def calibration_temperature(model: str | os.PathLike, prior: str) -> float | None:
    """The calibration temperature stored for a model and prior, or None.

    Files written before the key was renamed hold it as ``"temperature"``.
    """
    path = calibration_file(model)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("prior") != prior:
        return None
    return record.get("calibration_temperature", record.get("temperature"))
