"""Classification with MedSymmFlow: integrate images back to class masks, read the nearest palette colour.

For each image the joint state ``[x, eps]`` is integrated from t = 1 to t = 0; the class is the palette colour
with the smallest mean per-pixel L2 distance to the integrated mask, the class scores are minus those distances
(the paper's AUC uses them), and the uncertainty is the distance to the predicted colour. Beyond the paper,
``passes > 1`` averages the distances over several mask-noise draws and reports their spread.

The metrics are those of the MAGIC-Flow classifier (:func:`augflow.classify.classification_metrics`, same keys),
with two method-specific definitions: ``auc_macro`` is computed from the scores (minus distances), and the
selective-prediction curve ranks images by the uncertainty (``rank_by``) instead of the posterior's entropy.
Posterior probabilities for ECE and the predictions file are ``softmax(scores / T)``, with ``T`` fitted on
``calibrate_on`` (temperature scaling; 1 otherwise).

References:
    Caetano et al., "MedSymmFlow", 2025, arXiv:2507.19098 (classification by mask readout, uncertainty and
    selective prediction).
    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", 2017, arXiv:1706.04599.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn import metrics as skm

from augflow.classify import (
    Predictions,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    predict,
)
from augflow.errors import ConfigError
from augflow.precision import autocast, resolve_amp

RANK_BY = ("distance", "spread")


@dataclass
class SymmFlowClassification:
    """Per-image results of :func:`classify_images` (numpy, N images, K classes)."""

    scores: np.ndarray  # (N, K) minus the mean per-pixel distance to each class colour; higher = more likely
    predicted: np.ndarray  # (N,) argmax of the scores (nearest colour)
    distance: np.ndarray  # (N,) distance to the predicted colour (the paper's uncertainty)
    spread: np.ndarray  # (N,) spread over the stochastic passes (0 for one pass)
    uncertainty: np.ndarray  # (N,) the ranking used for selective prediction (distance or spread)
    passes: int
    rank_by: str

    def predictions(self, temperature: float = 1.0) -> Predictions:
        """As the MAGIC-Flow classifier's :class:`~augflow.classify.Predictions`: ``softmax(scores / T)``."""
        preds = predict(self.scores, np.zeros(self.scores.shape[1]), temperature)
        preds.predicted = self.predicted  # argmax is the same; keep the nearest-colour decision exactly
        return preds


@torch.inference_mode()
def classify_images(model, images: torch.Tensor | np.ndarray, passes: int = 1, batch_size: int = 32,
                    seed: int = 0, device: str = "cpu", rank_by: str = "distance",
                    progress: bool = False, amp: bool = False) -> SymmFlowClassification:
    """Classify images ``(N, C, H, W)`` in ``[0, 1]`` with a trained :class:`~augflow.symmflow.SymmFlow`.

    Arguments:
        model: The model (``augflow.models.load_model`` of a symmflow run).
        images: The images.
        passes: Stochastic readouts per image (1 = the paper's).
        batch_size: Images per batch.
        seed: Seed of the mask noise (same seed, same results).
        device: "auto", "cpu" or "cuda[:N]".
        rank_by: Uncertainty for selective prediction: "distance" (the paper's) or "spread" (needs passes > 1).
        progress: Show a progress bar.
        amp: Run the U-Net in bf16 (:mod:`augflow.precision`).

    Returns:
        A :class:`SymmFlowClassification`.

    Raises:
        ConfigError: For invalid arguments or a model of another family.
    """
    from tqdm.auto import tqdm

    from augflow.train.loop import resolve_device

    if getattr(model, "family", None) != "symmflow":
        raise ConfigError(f"classify_images needs a symmflow model, but got family {getattr(model, 'family', None)!r}")
    if rank_by not in RANK_BY:
        raise ConfigError(f"rank_by must be one of {RANK_BY}, but is: {rank_by!r}")
    if rank_by == "spread" and passes < 2:
        raise ConfigError(f"rank_by='spread' needs passes >= 2, but passes is: {passes}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, but is: {batch_size!r}")
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    model = model.to(dev).eval()
    images = torch.as_tensor(images)
    generator = torch.Generator(dev).manual_seed(seed)
    scores, predicted, distance, spread = [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="classify", disable=not progress, dynamic_ncols=True):
        x = images[start:start + batch_size].to(dev)
        with autocast(dev, amp):
            s, p, u = model.classify(x, passes=passes, generator=generator)
        scores.append(s.double().cpu())
        predicted.append(p.cpu())
        distance.append(u.distance.double().cpu())
        spread.append(u.spread.double().cpu())
    k = model.config.num_classes
    if not scores:
        empty = np.zeros(0)
        return SymmFlowClassification(np.zeros((0, k)), empty.astype(np.int64), empty, empty, empty, passes, rank_by)
    distance_np, spread_np = torch.cat(distance).numpy(), torch.cat(spread).numpy()
    return SymmFlowClassification(
        scores=torch.cat(scores).numpy(), predicted=torch.cat(predicted).numpy(), distance=distance_np,
        spread=spread_np, uncertainty=distance_np if rank_by == "distance" else spread_np, passes=passes,
        rank_by=rank_by)


def symmflow_metrics(labels: np.ndarray, result: SymmFlowClassification, class_names: list[str],
                     temperature: float = 1.0) -> dict:
    """The metrics of ``augflow classify`` (keys of :func:`augflow.classify.classification_metrics`).

    ``auc_macro`` is computed from the scores and ``selective_prediction`` ranks by ``result.uncertainty``.
    """
    labels = np.asarray(labels)
    metrics = classification_metrics(labels, result.predictions(temperature), class_names, scores=result.scores,
                                     uncertainty=result.uncertainty)
    metrics["selective_prediction_by"] = result.rank_by
    metrics["passes"] = result.passes
    metrics["uncertainty_error_auroc"] = error_auroc(result.predicted != labels, result.uncertainty)
    return metrics


def error_auroc(wrong: np.ndarray, uncertainty: np.ndarray) -> float:
    """AUROC of the uncertainty for detecting wrong predictions (0.5 = uninformative; nan without errors)."""
    wrong = np.asarray(wrong, dtype=bool)
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(skm.roc_auc_score(wrong, uncertainty))


def classify_file(model_path, data, passes: int = 1, calibrate_on=None, batch_size: int = 32,
                  device: str = "auto", seed: int = 0, rank_by: str = "distance", progress: bool = False,
                  amp: bool = False) -> dict:
    """Classify every image of ``data`` with a trained MedSymmFlow; the same result as MAGIC-Flow's
    :func:`augflow.classify.classify_file`.

    Arguments:
        model_path: Run folder or model file.
        data: Dataset file to classify.
        passes: Stochastic readouts per image.
        calibrate_on: Optional labelled file (the validation split) on which to fit the softmax temperature.
        batch_size: Images per batch.
        device: "auto", "cpu" or "cuda[:N]".
        seed: Seed of the mask noise.
        rank_by: "distance" or "spread" (selective prediction).
        progress: Show a progress bar.
        amp: Run the U-Net in bf16 (:mod:`augflow.precision`).

    Returns:
        ``{"class_names", "predictions": Predictions, "labels", "metrics", "classification":
        SymmFlowClassification}``; ``metrics`` also holds ``ece_uncalibrated``, ``temperature``,
        ``temperature_source`` and ``prior`` ("none": the readout uses no class prior).
    """
    from augflow.data.store import read_images, read_info
    from augflow.models import load_model
    from augflow.synthesize import model_file

    model, meta = load_model(model_file(model_path), with_meta=True)
    class_names = meta["class_names"]
    info = read_info(data)
    if info.class_names != class_names:
        raise ConfigError(f"--data {data}: classes {info.class_names} differ from the model's {class_names}")
    options = dict(passes=passes, batch_size=batch_size, seed=seed, device=device, rank_by=rank_by,
                   progress=progress, amp=amp)
    temperature = 1.0
    if calibrate_on is not None:
        val = read_info(calibrate_on)
        if val.class_names != class_names:
            raise ConfigError(f"--calibrate-on {calibrate_on}: classes {val.class_names} differ from the model's")
        val_result = classify_images(model, read_images(calibrate_on), **options)
        temperature = fit_temperature(val_result.scores, val.labels, np.zeros(len(class_names)))
    result = classify_images(model, read_images(data), **options)
    metrics = symmflow_metrics(info.labels, result, class_names, temperature)
    metrics["ece_uncalibrated"] = expected_calibration_error(result.predictions(1.0).probs, info.labels)
    metrics["temperature"] = temperature
    metrics["temperature_source"] = f"fitted on {calibrate_on}" if calibrate_on is not None else "none (temperature 1)"
    metrics["prior"] = "none"
    return {"class_names": class_names, "predictions": result.predictions(temperature), "labels": info.labels,
            "metrics": metrics, "classification": result, "score_column": "minus_distance_to"}
