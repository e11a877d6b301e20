"""MedSymmFlow's classification read-out: integrate images back to class masks, read the nearest palette colour.

For each image the joint state ``[x, eps]`` is integrated from t = 1 to t = 0; the class is the palette colour
with the smallest mean per-pixel L2 distance to the integrated mask, the class scores are minus those distances
(the paper's AUC uses them), and the uncertainty is the distance to the predicted colour. Beyond the paper,
``passes > 1`` averages the distances over several mask-noise draws and reports their spread.

The metrics are those of the MAGIC-Flow classifier (:func:`augflow.classify.metrics.classification_metrics`,
same keys), with two method-specific definitions: ``auc_macro`` is computed from the scores (minus distances), and
the selective-prediction curve ranks images by the uncertainty (``rank_by``) instead of the posterior's entropy.
Posterior probabilities for ECE and the predictions file are ``softmax(scores / T)``, with ``T`` the calibration
temperature (:mod:`augflow.classify.calibration`; 1 otherwise); a calibration also chooses the posterior's shape,
``softmax(-(d^q - 1) / (q T))`` of the distances ``d`` with a power ``q`` chosen by the validation NLL
(:func:`~augflow.classify.metrics.power_scores`; ``q = 1``: the distances as they are). The nearest-colour decision,
the AUC and the uncertainty stay the distances'.

References:
    Caetano et al., "MedSymmFlow", 2025, arXiv:2507.19098 (classification by mask readout, uncertainty and
    selective prediction).
    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", 2017, arXiv:1706.04599.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from augflow.classify.metrics import Calibration, Predictions, Scores
from augflow.data.store import read_images
from augflow.errors import ConfigError
from augflow.models import ModelFamily
from augflow.precision import autocast, resolve_amp
from augflow.runs import resolve_device

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
    steps: int  # integration steps of each read-out

    def as_scores(self) -> Scores:
        """The read-out as :class:`~augflow.classify.metrics.Scores`: no prior, the nearest-colour decision, the
        AUC from the scores, selective prediction by ``uncertainty``."""
        return Scores(self.scores, np.zeros(self.scores.shape[1]), predicted=self.predicted,
                      uncertainty=self.uncertainty, auc_from_values=True,
                      extra={"selective_prediction_by": self.rank_by, "passes": self.passes, "steps": self.steps})

    def predictions(self, calibration: Calibration | None = None) -> Predictions:
        """As the MAGIC-Flow classifier's :class:`~augflow.classify.metrics.Predictions`: ``softmax(scores / T)``."""
        return self.as_scores().predictions(calibration)


@torch.inference_mode()
def classify_images(model: ModelFamily, images: torch.Tensor | np.ndarray, passes: int = 1, batch_size: int = 32,
                    seed: int = 0, device: str = "cpu", rank_by: str = "distance",
                    progress: bool = False, amp: bool = False, steps: int | None = None) -> SymmFlowClassification:
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
        steps: Integration steps of each read-out (default: the model's ``model.steps``).

    Returns:
        A :class:`SymmFlowClassification`.

    Raises:
        ConfigError: For invalid arguments or a model of another family.
    """
    if model.has_likelihood:
        raise ConfigError(f"classify_images reads out class masks of a MedSymmFlow model, but got family "
                          f"{model.family!r}: classify it by its likelihood (augflow.classify.classify_file)")
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
    steps = model.config.steps if steps is None else steps
    scores, predicted, distance, spread = [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="classify", disable=not progress, dynamic_ncols=True):
        x = images[start:start + batch_size].to(dev)
        with autocast(dev, amp):
            s, p, u = model.classify(x, passes=passes, generator=generator, steps=steps)
        scores.append(s.double().cpu())
        predicted.append(p.cpu())
        distance.append(u.distance.double().cpu())
        spread.append(u.spread.double().cpu())
    k = model.config.num_classes
    if not scores:
        empty = np.zeros(0)
        return SymmFlowClassification(np.zeros((0, k)), empty.astype(np.int64), empty, empty, empty, passes, rank_by,
                                      steps)
    distance_np, spread_np = torch.cat(distance).numpy(), torch.cat(spread).numpy()
    return SymmFlowClassification(
        scores=torch.cat(scores).numpy(), predicted=torch.cat(predicted).numpy(), distance=distance_np,
        spread=spread_np, uncertainty=distance_np if rank_by == "distance" else spread_np, passes=passes,
        rank_by=rank_by, steps=steps)


def readout_metrics(labels: np.ndarray, result: SymmFlowClassification, class_names: list[str],
                    temperature: float = 1.0) -> dict:
    """The metrics of ``augflow classify`` of a read-out (keys of
    :func:`~augflow.classify.metrics.classification_metrics`, plus ``selective_prediction_by``, ``passes`` and
    ``uncertainty_error_auroc``)."""
    return result.as_scores().metrics(labels, class_names, Calibration(temperature))


class ReadoutScorer:
    """Scores of MedSymmFlow's read-out of dataset files: minus the mask's distance to each class colour.

    Arguments: see :func:`classify_images`.
    """

    prior = "none"  # the read-out uses no class prior
    score_column = "minus_distance_to"
    # The calibration's choice of posterior shape (metrics.power_scores): at 64 px over five folds the power chosen by
    # the validation NLL cut the test ECE from 0.20 (the distances as they are) to about 0.11
    # (reports/classification-notes.md).
    distance_powers = (1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0)

    def __init__(self, model: ModelFamily, passes: int = 1, batch_size: int = 32, seed: int = 0,
                 device: str = "auto", rank_by: str = "distance", progress: bool = False, amp: bool = False,
                 steps: int | None = None):
        self.model, self.passes = model, passes
        self.steps = model.config.steps if steps is None else steps
        self.options = dict(passes=passes, batch_size=batch_size, seed=seed, device=device, rank_by=rank_by,
                            progress=progress, amp=amp, steps=self.steps)

    def score(self, path: str | Path) -> Scores:
        return classify_images(self.model, read_images(path), **self.options).as_scores()
