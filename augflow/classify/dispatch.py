"""``augflow classify``: classify a dataset file with a trained model of any family, and write the predictions.

A model with an exact likelihood (MAGIC-Flow) is classified by Bayes' rule (:mod:`augflow.classify.likelihood`);
MedSymmFlow by reading out its integrated class mask (:mod:`augflow.classify.readout`). Both report the same
metrics (:mod:`augflow.classify.metrics`) at the calibration temperature (:mod:`augflow.classify.calibration`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from augflow.atomic import atomic_write_text
from augflow.classify.calibration import calibrate, stored_calibration
from augflow.classify.likelihood import LikelihoodScorer
from augflow.classify.metrics import Calibration, Scorer, balanced_accuracy, expected_calibration_error
from augflow.classify.readout import ReadoutScorer
from augflow.data.store import read_info
from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.runs import check_classes, stored_amp


def classify_file(model: str | os.PathLike, data: str | os.PathLike, prior: str = "train",
                  calibrate_on: str | os.PathLike | None = None, batch_size: int = 32, device: str = "auto",
                  passes: int | None = None, seed: int = 0, rank_by: str = "distance", progress: bool = False,
                  amp: bool | None = None, class_offsets: bool = True, shift_radius: int | None = None,
                  offsets_on: Sequence[str | os.PathLike] = (), steps: int | None = None) -> dict:
    """Classify every image of a labelled dataset file with a trained model; its metrics.

    Arguments:
        model: Run folder or model file.
        data: Dataset file to classify.
        prior: Likelihood classifier: "train" (training-class frequencies stored with the model) or "uniform".
        calibrate_on: Optional labelled file (the validation split) on which to fit the calibration (temperature,
            and per-class offsets for the likelihood classifier); it is stored beside the model
            (``calibration.json``) and used by later calls without ``calibrate_on``.
        batch_size: Images per batch.
        device: "auto", "cpu" or "cuda[:N]".
        passes: Read-out: stochastic read-outs per image, their distances averaged. None: the passes the stored
            calibration was fitted with (1 without one). A calibration holds for its passes only.
        seed: Read-out: seed of the mask noise.
        rank_by: Read-out: "distance" or "spread" (selective prediction).
        progress: Read-out: show a progress bar.
        amp: Run the networks in bf16 (:mod:`augflow.precision`); default: as the model was trained.
        class_offsets: Likelihood classifier: fit per-class offsets with the temperature (False: the temperature
            only, which keeps the decisions of the Bayes posterior and calibrates best).
        shift_radius: Likelihood classifier: average the class scores over the whole-pixel shifts within this many
            pixels (:mod:`augflow.classify.likelihood`). None: the radius the stored calibration was fitted with (0
            without one). A calibration holds for its radius only: another radius needs ``calibrate_on``.
        offsets_on: With ``calibrate_on``: labelled files to fit the per-class offsets on instead
            (:func:`augflow.classify.calibration.calibrate`).
        steps: Read-out: integration steps of each read-out. None: the steps the stored calibration was fitted
            with (the model's ``model.steps`` without one). A calibration holds for its steps only.

    Returns:
        ``{"class_names", "predictions": Predictions, "labels", "metrics", "score_column"}``; ``metrics`` holds
        the calibration ``temperature``, the ``class_biases`` (None: none), their ``calibration_source``,
        ``ece_uncalibrated``, ``balanced_accuracy_uncalibrated``, the ``prior`` ("none": the read-out uses no
        class prior) and the ``shift_radius`` of the scores.

    Raises:
        DataError: If a file's classes differ from the model's. ConfigError: For invalid options.
    """
    loaded, meta = load_model(model, with_meta=True)
    names = meta["class_names"]
    info = read_info(data).require_images("--data")
    check_classes(info.class_names, names, f"--data {data}")
    amp = stored_amp(meta) if amp is None else amp
    scorer: Scorer
    # The calibration the scores must match; one being fitted (calibrate_on) replaces it.
    stored = None if calibrate_on is not None else stored_calibration(
        model, prior if loaded.has_likelihood else ReadoutScorer.prior, names)
    if loaded.has_likelihood:
        if passes is not None or steps is not None:
            raise ConfigError(f"--passes and --steps apply to MedSymmFlow's read-out; {model} is a "
                              f"{loaded.family!r} model: leave them out (--shift-radius averages its likelihood over "
                              f"shifts)")
        stored_radius = None if stored is None else stored.shift_radius
        radius = _scoring_setting("--shift-radius", shift_radius, stored_radius, 0, model)
        scorer = LikelihoodScorer(loaded, meta["class_counts"], prior, batch_size, device, amp, radius)
    else:  # MedSymmFlow: the integrated class mask's nearest palette colour
        if shift_radius:
            raise ConfigError(f"--shift-radius averages exact likelihoods; {model} is a {loaded.family!r} model "
                              f"without one: leave --shift-radius out")
        passes = _scoring_setting("--passes", passes, None if stored is None else stored.passes, 1, model)
        own_steps = loaded.config.steps  # a calibration stored before its steps were recorded used the model's
        steps = _scoring_setting("--steps", steps, None if stored is None else stored.steps or own_steps, own_steps,
                                 model)
        scorer = ReadoutScorer(loaded, passes, batch_size, seed, device, rank_by, progress, amp, steps)
    if calibrate_on is not None:
        calibrate(model, scorer, calibrate_on, names, biases=loaded.has_likelihood and class_offsets,
                  offsets_on=offsets_on)
        source = f"fitted on {calibrate_on}" + (f", the offsets on {', '.join(map(str, offsets_on))}"
                                                 if offsets_on and loaded.has_likelihood and class_offsets else "")
    calibration = stored_calibration(model, scorer.prior, names)
    if calibrate_on is None:
        source = "stored with the model" if calibration is not None else "none (temperature 1, no offsets)"
    calibration = calibration or Calibration()
    scores = scorer.score(data)
    metrics = scores.metrics(info.labels, names, calibration)
    uncalibrated = scores.predictions()
    metrics["ece_uncalibrated"] = expected_calibration_error(uncalibrated.probs, info.labels)
    metrics["balanced_accuracy_uncalibrated"] = balanced_accuracy(info.labels, uncalibrated.predicted)
    metrics["temperature"] = calibration.temperature
    metrics["class_biases"] = None if calibration.biases is None else dict(zip(names, calibration.biases,
                                                                              strict=True))
    metrics["calibration_source"] = source
    metrics["prior"] = scorer.prior
    metrics["shift_radius"] = getattr(scorer, "shift_radius", 0)
    if not loaded.has_likelihood:
        metrics["distance_power"] = calibration.distance_power
    return {"class_names": names, "predictions": scores.predictions(calibration), "labels": info.labels,
            "metrics": metrics, "score_column": scorer.score_column}


def _scoring_setting(option: str, requested: int | None, stored: int | None, default: int,
                     model: str | os.PathLike) -> int:
    """The value of a scoring option that a calibration is fitted for (shift radius, read-out passes and steps): the
    requested one, else the stored calibration's, else ``default``. A stored calibration holds for its own value
    only, so another value needs a new fit."""
    if stored is None:
        return default if requested is None else requested
    if requested is not None and requested != stored:
        raise ConfigError(f"{option} {requested}: the calibration stored with {model} was fitted with {option} "
                          f"{stored} and holds for it only; give --calibrate-on FILE to fit one for {requested}, or "
                          f"leave {option} out")
    return stored


def write_predictions(result: dict, path: str | os.PathLike) -> None:
    """Per-image CSV (atomic): row, label, predicted class, entropy, posterior and the class scores.

    The scores are ``log p(x|y)`` for MAGIC-Flow (columns ``logp_x_given_*``) and minus the mask's distance to
    each class colour for MedSymmFlow (``minus_distance_to_*``), as named by ``result["score_column"]``.
    """
    names, preds = result["class_names"], result["predictions"]
    header = ["row", "label", "predicted", "entropy", *[f"p_{c}" for c in names],
              *[f"{result['score_column']}_{c}" for c in names]]
    rows = [",".join(header)]
    for i in range(len(preds.predicted)):
        rows.append(",".join([str(i), names[result["labels"][i]], names[preds.predicted[i]], f"{preds.entropy[i]:.6g}",
                              *(f"{p:.6g}" for p in preds.probs[i]), *(f"{v:.8g}" for v in preds.log_likelihoods[i])]))
    atomic_write_text("\n".join(rows) + "\n", path)
