"""Likelihood (Bayes) classification with a class-conditional flow, calibration and selective prediction.

``log p(y | x) = log p(x | y) + log pi(y) - logsumexp_k (log p(x | k) + log pi(k))`` with the exact flow
likelihood (MAGIC-Flow, arXiv 2510.22070, section "Classification"). The K class likelihoods of a batch are
computed in one pass: the batch is repeated K times with the K labels. The posterior is calibrated by one
temperature fitted on validation data (temperature scaling, Guo et al. 2017, arXiv 1706.04599) instead of the
reference's fixed 600; uncertainty is the predictive entropy, and the selective-prediction curve reports the
accuracy on the images kept when the most uncertain ones are rejected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm

from augflow.errors import ConfigError
from augflow.precision import autocast, resolve_amp

PRIORS = ("train", "uniform")
CALIBRATION = "calibration.json"  # the fitted temperature, stored beside model.pt
REJECTION_GRID = np.arange(0, 100, 5) / 100  # reject the most uncertain 0, 5, ..., 95 %


@torch.inference_mode()
def class_log_likelihoods(model, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``log p(x | k)`` for every class k: (B, K), from one batched pass over the K-fold repeated batch."""
    b = x.shape[0]
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(b)  # (K*B,) class-major
    log_p = model.log_prob(x.repeat(num_classes, 1, 1, 1), labels)  # (K*B,)
    return log_p.reshape(num_classes, b).T  # (B, K)


def log_prior(class_counts, prior: str = "train") -> np.ndarray:
    """``log pi``: training-class frequencies, or uniform."""
    if prior not in PRIORS:
        raise ConfigError(f"--prior must be one of {PRIORS}, but is: {prior!r}")
    counts = np.asarray(class_counts, dtype=np.float64)
    if prior == "uniform":
        counts = np.ones_like(counts)
    return np.log(np.maximum(counts, 1e-12) / counts.sum())


def posterior(log_likelihoods: np.ndarray, log_pi: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``p(y | x)`` (N, K) from log-likelihoods (N, K) and a log prior, with the logits divided by ``temperature``."""
    logits = (log_likelihoods + log_pi) / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def fit_temperature(log_likelihoods: np.ndarray, labels: np.ndarray, log_pi: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of the labels (searched on log T in [-3, 12])."""

    def nll(log_t: float) -> float:
        p = posterior(log_likelihoods, log_pi, math.exp(log_t))
        return -np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-300)))

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 12), method="bounded").x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))


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


@dataclass
class Predictions:
    """Per-image results of a classifier over a dataset."""

    log_likelihoods: np.ndarray  # (N, K) log p(x | k)
    probs: np.ndarray  # (N, K) calibrated posterior
    predicted: np.ndarray  # (N,)
    entropy: np.ndarray  # (N,)


def predict(log_likelihoods: np.ndarray, log_pi: np.ndarray, temperature: float = 1.0) -> Predictions:
    probs = posterior(log_likelihoods, log_pi, temperature)
    return Predictions(log_likelihoods, probs, probs.argmax(axis=1), entropy(probs))


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
        scores: (N, K) class scores for the AUC; the posterior ``preds.probs`` when omitted.
        uncertainty: (N,) ranking of the selective-prediction curve; the posterior's entropy when omitted.
    """
    k = len(class_names)
    y, yhat = np.asarray(labels), preds.predicted
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, yhat, labels=np.arange(k), average="macro", zero_division=0)
    per_class_recall = skm.recall_score(y, yhat, labels=np.arange(k), average=None, zero_division=0)
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, yhat)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, yhat)),
        "auc_macro": macro_auc(y, preds.probs if scores is None else scores),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "per_class_recall": dict(zip(class_names, map(float, per_class_recall), strict=True)),
        "confusion_matrix": skm.confusion_matrix(y, yhat, labels=np.arange(k)).tolist(),
        "ece": expected_calibration_error(preds.probs, y),
        "selective_prediction": selective_prediction(yhat == y, preds.entropy if uncertainty is None else uncertainty),
    }


def dataset_log_likelihoods(model, path, batch_size: int = 32, device: str = "auto", amp: bool = False) -> np.ndarray:
    """``log p(x | k)`` (N, K) for every image of a dataset file, streamed in batches; ``amp``: the coupling
    networks in bf16 (:mod:`augflow.precision`)."""
    from augflow.data.store import read_images, read_info
    from augflow.train.loop import resolve_device

    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    model = model.to(dev).eval()
    n = len(read_info(path, check_values=False))
    k = model.config.num_classes
    out = []
    for start in range(0, n, batch_size):
        x = torch.from_numpy(read_images(path, np.arange(start, min(start + batch_size, n)))).to(dev)
        with autocast(dev, amp):
            out.append(class_log_likelihoods(model, x, k).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k))


def calibrate(model_path, calibrate_on, prior: str = "train", batch_size: int = 32, device: str = "auto",
              amp: bool | None = None) -> dict:
    """Fit the posterior temperature on a labelled file (the validation split) and store it beside the model.

    Returns:
        The stored record: {"temperature", "prior", "fitted_on", "fitted_on_sha256", "n", "ece_before", "ece_after"}.
    """
    from augflow.data.store import read_info, sha256_file
    from augflow.models import load_model
    from augflow.synthesize import model_file, stored_amp
    from augflow.train.checkpoint import write_json

    path = model_file(model_path)
    model, meta = load_model(path, with_meta=True)
    val = read_info(calibrate_on)
    if val.class_names != meta["class_names"]:
        raise ConfigError(f"--calibrate-on {calibrate_on}: classes {val.class_names} differ from the model's "
                          f"{meta['class_names']}")
    log_pi = log_prior(meta["class_counts"], prior)
    log_lik = dataset_log_likelihoods(model, calibrate_on, batch_size, device, stored_amp(meta) if amp is None else amp)
    temperature = fit_temperature(log_lik, val.labels, log_pi)
    record = {
        "temperature": temperature, "prior": prior, "fitted_on": str(Path(calibrate_on).resolve()),
        "fitted_on_sha256": sha256_file(calibrate_on), "n": len(val),
        "ece_before": expected_calibration_error(posterior(log_lik, log_pi), val.labels),
        "ece_after": expected_calibration_error(posterior(log_lik, log_pi, temperature), val.labels),
    }
    write_json(record, path.parent / CALIBRATION)
    return record


def stored_temperature(model_path, prior: str) -> float | None:
    """The temperature :func:`calibrate` stored for this model and prior, or None."""
    from augflow.synthesize import model_file

    path = model_file(model_path).parent / CALIBRATION
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["temperature"] if record.get("prior") == prior else None


def classify_file(model_path, data, prior: str = "train", calibrate_on=None, batch_size: int = 32,
                  device: str = "auto", amp: bool | None = None) -> dict:
    """Classify every image of ``data`` with a trained flow; metrics when the file has labels.

    Arguments:
        model_path: Run folder or model file.
        data: Dataset file to classify.
        prior: "train" (training-class frequencies stored with the model) or "uniform".
        calibrate_on: Optional labelled dataset (the validation split) on which to fit the temperature; it is
            stored beside the model (``calibration.json``) and used by later calls without ``calibrate_on``.
        batch_size: Images per batch (each is evaluated K times).
        device: "auto", "cpu" or "cuda[:N]".
        amp: Run the networks in bf16 (:mod:`augflow.precision`); default: as the model was trained.

    Returns:
        {"class_names", "predictions": Predictions, "labels", "metrics" (with "temperature", its
        "temperature_source" and "ece_uncalibrated")}.
    """
    from augflow.data.store import read_info
    from augflow.models import load_model
    from augflow.synthesize import model_file, stored_amp

    model, meta = load_model(model_file(model_path), with_meta=True)
    amp = stored_amp(meta) if amp is None else amp
    if model.family == "symmflow":  # no likelihood: the integrated class mask's nearest palette colour
        from augflow.symmflow.classify import classify_file as classify_symmflow

        return classify_symmflow(model_path, data, calibrate_on=calibrate_on, batch_size=batch_size, device=device,
                                 amp=amp)
    class_names = meta["class_names"]
    info = read_info(data)
    if info.class_names != class_names:
        raise ConfigError(f"--data {data}: classes {info.class_names} differ from the model's {class_names}")
    log_pi = log_prior(meta["class_counts"], prior)
    if calibrate_on is not None:
        temperature = calibrate(model_path, calibrate_on, prior, batch_size, device, amp)["temperature"]
        source = f"fitted on {calibrate_on}"
    else:
        temperature = stored_temperature(model_path, prior)
        source = "stored with the model" if temperature is not None else "none (temperature 1)"
        temperature = 1.0 if temperature is None else temperature
    log_lik = dataset_log_likelihoods(model, data, batch_size, device, amp)
    preds = predict(log_lik, log_pi, temperature)
    result_metrics = classification_metrics(info.labels, preds, class_names)
    result_metrics["ece_uncalibrated"] = expected_calibration_error(posterior(log_lik, log_pi), info.labels)
    result_metrics["temperature"] = temperature
    result_metrics["temperature_source"] = source
    result_metrics["prior"] = prior
    return {"class_names": class_names, "predictions": preds, "labels": info.labels, "metrics": result_metrics,
            "score_column": "logp_x_given"}


def write_predictions(result: dict, path) -> None:
    """Per-image CSV (atomic): row, label, predicted class, entropy, posterior and the class scores.

    The scores are ``log p(x|y)`` for MAGIC-Flow (columns ``logp_x_given_*``) and minus the mask's distance to
    each class colour for MedSymmFlow (``minus_distance_to_*``), as named by ``result["score_column"]``.
    """
    from augflow.atomic import atomic_write_text

    names, preds = result["class_names"], result["predictions"]
    header = ["row", "label", "predicted", "entropy", *[f"p_{c}" for c in names],
              *[f"{result['score_column']}_{c}" for c in names]]
    rows = [",".join(header)]
    for i in range(len(preds.predicted)):
        rows.append(",".join([str(i), names[result["labels"][i]], names[preds.predicted[i]], f"{preds.entropy[i]:.6g}",
                              *(f"{p:.6g}" for p in preds.probs[i]), *(f"{v:.8g}" for v in preds.log_likelihoods[i])]))
    atomic_write_text("\n".join(rows) + "\n", path)
