"""The audit job: read the three files, run every stage in order, write the report (``augflow audit``)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from augflow.atomic import check_output, check_output_folder
from augflow.audit.detectability import detectability
from augflow.audit.diversity import diversity
from augflow.audit.downstream import (
    DUPLICATE_SHARE,
    PROTOCOLS,
    candidate_budgets,
    check_subjects_disjoint,
    downstream,
)
from augflow.audit.features import EncoderRecipe, domain_encoder_path, feature_space, load_encoder
from augflow.audit.fidelity import fidelity, torch_fidelity_metrics
from augflow.audit.figures import (
    figure_closest_pairs,
    figure_dcr,
    figure_prdc,
    figure_recall,
    figure_roc,
    figure_samples,
)
from augflow.audit.memorization import membership_inference, memorization
from augflow.audit.recognition import class_recognition
from augflow.audit.report import REPORT_FILES, GateThresholds, public, release_gate, write_report
from augflow.audit.verdict import verdict
from augflow.classify.calibration import fit_calibration, stored_calibration
from augflow.classify.likelihood import dataset_log_likelihoods, log_prior
from augflow.classify.metrics import Calibration, classification_metrics
from augflow.data.store import read_images, read_info, sha256_file
from augflow.errors import ConfigError, DataError
from augflow.models import ModelFamily, load_model
from augflow.precision import autocast, resolve_amp
from augflow.runs import check_classes, model_file, resolve_device, stored_amp
from augflow.train.privacy.ledger import Ledger

DEFAULT_DELTA = 1e-5  # delta of the empirical epsilon bound when the model has no privacy ledger


def _inputs(real, train, synthetic, val=None):
    """Read and cross-check the three files (four with ``val``); return their infos."""
    infos = {"real": read_info(real), "train": read_info(train), "synthetic": read_info(synthetic)}
    if val is not None:
        infos["val"] = read_info(val)
    ref = infos["real"]
    for role in infos.keys() - {"real"}:
        info = infos[role]
        if info.class_names != ref.class_names:
            raise DataError(f"--{role} {info.path}: class names {info.class_names} differ from --real {ref.path}'s "
                            f"{ref.class_names}; all files must have the same classes in the same order")
        if info.image_shape != ref.image_shape:
            raise DataError(f"--{role} {info.path}: image shape {info.image_shape} differs from --real {ref.path}'s "
                            f"{ref.image_shape}")
    for role, info in infos.items():
        if len(info) < 2:
            raise DataError(f"--{role} {info.path}: has {len(info)} image(s); the audit needs at least 2")
    check_subjects_disjoint(infos["train"].subjects, ref.subjects, f"--train {infos['train'].path}",
                            f"--real {ref.path}")
    if val is not None:  # the validation images choose budgets: they must be neither trained on nor tested
        check_subjects_disjoint(infos["train"].subjects, infos["val"].subjects, f"--train {infos['train'].path}",
                                f"--val {infos['val'].path}")
        check_subjects_disjoint(infos["val"].subjects, ref.subjects, f"--val {infos['val'].path}",
                                f"--real {ref.path}")
    return infos


def _describe(info) -> dict:
    return {"path": str(info.path), "sha256": sha256_file(info.path), "n": len(info), "source": info.source,
            "image_shape": list(info.image_shape), "class_counts": info.class_counts(),
            "created_at": info.created_at, "augflow_version": info.augflow_version}


@torch.inference_mode()
def membership_scores(model: ModelFamily, images: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                      device: str = "cpu", draws: int = 4, seed: int = 0, amp: bool = False) -> np.ndarray:
    """Membership score (N,) of images under their own labels, higher = more member-like: ``log p(x_i | y_i)``
    for a flow with exact likelihood, else minus the model's per-image training loss (mean of ``draws`` seeded
    draws of its noise; MedSymmFlow's flow-matching loss)."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(dev, dtype)
        y = torch.from_numpy(np.asarray(labels[i:i + batch_size], dtype=np.int64)).to(dev)
        if model.has_likelihood:
            with autocast(dev, amp):
                out.append(model.log_prob(x, y).double().cpu().numpy())
            continue
        losses = []
        for d in range(draws):
            torch.manual_seed(seed + 1000 * d + i)
            with autocast(dev, amp):
                losses.append(model.training_loss(x, y).double().cpu().numpy())
        out.append(-np.mean(losses, axis=0))
    return np.concatenate(out)


def _privacy(ledger: Ledger | None) -> dict:
    """The privacy status of a model's ledger, for the report."""
    dp = ledger is not None and ledger.differentially_private
    return {"differentially_private": dp, "epsilon": ledger.epsilon if dp else None,
            "delta": ledger.delta if dp else None, "ledger": ledger.to_dict() if ledger is not None else None}


def run_audit(
    real: str | os.PathLike,
    train: str | os.PathLike,
    synthetic: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    features: str = "domain",
    inception_weights: str | os.PathLike | None = None,
    gate: GateThresholds | None = None,
    seeds: int = 3,
    downstream_epochs: int | tuple[int, ...] = 30,
    downstream_budget: str = "steps",
    val: str | os.PathLike | None = None,
    downstream_duplicates: float = DUPLICATE_SHARE,
    run_downstream: bool = True,
    encoder_recipe: EncoderRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    bootstraps: int = 100,
    pairs: int = 500,
    seed: int = 0,
    device: str = "cpu",
    command: str | None = None,
    progress: bool = True,
    amp: bool | None = None,
    overwrite: bool = False,
) -> dict:
    """Audit a synthetic dataset against the real data it imitates; write the report into ``out``.

    Arguments:
        real: Held-out real images (the test split), never used for training.
        train: The real training file the generator (and the domain encoder) was trained on.
        synthetic: The synthetic file to audit.
        out: Report folder (``metrics.json``, ``report.md``, ``report.html``, ``figures/``).
        model: Optional run folder or model file of the generator: adds membership inference, the privacy
            ledger and the likelihood classifier's test metrics.
        features: Feature space, "domain" or "inception".
        inception_weights: Local Inception-v3 weights for ``features="inception"``.
        gate: Release-gate thresholds (default :class:`GateThresholds`).
        seeds: Downstream trainings per protocol.
        downstream_epochs: Epochs per downstream training; several are candidate budgets, chosen per protocol on
            ``val`` (each protocol at the budget of its best mean validation balanced accuracy).
        downstream_budget: ``"steps"``: every downstream training set gets the steps of ``downstream_epochs``
            passes over the real training images; ``"epochs"``: that many passes over each set.
        val: Real validation images (subjects in neither ``train`` nor ``real``) that choose the downstream budgets
            (needed for several ``downstream_epochs``) and calibrate the model's likelihood classifier when no
            calibration is stored with it.
        downstream_duplicates: The share of each class's gap that the ``real+duplicates+synthetic`` protocol fills
            with duplicates of the real images (the rest with synthetic ones), in [0, 1].
        run_downstream: Run the downstream protocol (the slowest stage).
        encoder_recipe: Recipe of the domain encoder (default :class:`EncoderRecipe`).
        cache_dir: Encoder cache folder (default ``~/.cache/augflow/encoders``).
        bootstraps: FID bootstrap resamples.
        pairs: Image pairs per MS-SSIM estimate.
        seed: Seeds subsampling, bootstraps and pair draws.
        device: "auto", "cpu", "cuda" or "cuda:N" for the CNNs and the model.
        command: The command line, recorded in the report.
        progress: Show progress bars.
        amp: The generator's networks and the downstream CNNs in bf16 (:mod:`augflow.precision`); default: as the
            model was trained (off without ``model``). The domain encoder always runs in float32, so feature-space
            numbers stay comparable between audits.
        overwrite: Write into a non-empty ``out`` (its report files are replaced, never an input).

    Returns:
        The metrics (as written to ``metrics.json``, plus ``"paths"`` of the files written).

    Raises:
        DataError: if the files differ in classes or image shape (the model's included), share subjects between
            train and test, or are too small. ConfigError: on invalid settings, or a non-empty ``out`` without
            ``overwrite``; all before the first stage.
    """
    if not 0 <= downstream_duplicates <= 1:
        raise ConfigError(f"--duplicates must be a share in [0, 1], but is: {downstream_duplicates}")
    check_output_folder(out, overwrite)
    for name in REPORT_FILES:
        check_output(os.path.join(out, name), True, [real, train, synthetic, model, val])
    dev = resolve_device(device)
    device = str(dev)
    gate = gate or GateThresholds()
    encoder_recipe = encoder_recipe or EncoderRecipe()
    budgets = candidate_budgets(downstream_epochs)
    if len(budgets) > 1 and val is None and run_downstream:
        raise ConfigError(f"--epochs {','.join(map(str, budgets))}: several downstream budgets need --val FILE (real "
                          "validation images, e.g. the val.h5 of `augflow split`) to choose among them")
    infos = _inputs(real, train, synthetic, val)
    names = infos["real"].class_names
    stages = ["features", "fidelity", "diversity", "memorization"] + (["membership"] if model else []) \
        + (["downstream"] if run_downstream else []) + ["report"]
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 2)
        bar.update(1)

    metrics: dict = {"schema": "augflow-audit/1", "command": command, "inputs": {
        "class_names": names, "val": None, **{role: _describe(info) for role, info in infos.items()}}}
    metrics["inputs"]["synthetic"]["provenance"] = infos["synthetic"].provenance
    val_info = infos.pop("val", None)  # chooses the downstream budgets and calibrates the likelihood classifier
    ledger = infos["synthetic"].provenance.get("privacy")

    flow = meta = None
    if model is not None:
        path = model_file(model)
        flow, meta = load_model(path, with_meta=True)
        if meta.get("class_names") is not None:
            check_classes(names, meta["class_names"], f"--real {infos['real'].path}")
        if tuple(flow.config.image_shape) != infos["real"].image_shape:
            raise DataError(f"--model {path}: made for images of shape {tuple(flow.config.image_shape)}, but the "
                            f"files hold {infos['real'].image_shape}; audit with the model that made --synthetic")
        metrics["inputs"]["model"] = {"path": str(path), "sha256": sha256_file(path), "privacy": meta.get("privacy")}
        ledger = meta.get("privacy", ledger)
    else:
        metrics["inputs"]["model"] = None
    metrics["privacy"] = _privacy(Ledger.from_dict(ledger))
    amp = resolve_amp(stored_amp(meta or {}) if amp is None else amp, dev)

    os.makedirs(out, exist_ok=True)  # every input is checked: an unwritable place fails now, not after the stages
    # Images and labels stay in memory: the audit compares every set with every other.
    bar = tqdm(total=len(stages), desc="audit", unit="stage", disable=not progress, dynamic_ncols=True)
    x = {role: read_images(info.path) for role, info in infos.items()}
    y = {role: info.labels for role, info in infos.items()}

    with stage("features"):
        space = feature_space(features, train, inception_weights=inception_weights, recipe=encoder_recipe,
                              cache_dir=cache_dir, device=device, progress=progress)
        f = {role: space.extract(images) for role, images in x.items()}
        metrics["feature_space"] = space.summary()

    with stage("fidelity"):
        fid = fidelity(f["real"], y["real"], f["synthetic"], y["synthetic"], f["train"], y["train"], names,
                       bootstraps=bootstraps, seed=seed)
        rows, _ = fid.pop("subsets")["overall"]
        # The headline overall values through torch-fidelity itself (the same images, its own feature pass).
        engine = torch_fidelity_metrics(space, x["real"], x["synthetic"][rows], seed=seed)
        overall = fid["overall"]["synthetic"]
        overall["fid_from_features"] = overall["fid"]
        overall.update(engine)
        metrics["fidelity"] = fid
        # Recognition by the domain encoder (trained on the real training file, cached), whatever the feature space.
        encoder = load_encoder(domain_encoder_path(train, encoder_recipe, cache_dir, device, progress))
        metrics["recognition"] = class_recognition(encoder, x["synthetic"], y["synthetic"], x["real"], y["real"],
                                                   names, device=device)
        # Samples kept by a classifier of their class score high here by construction: say so, do not count it.
        selection = (infos["synthetic"].provenance.get("selection") or {}).get("method", "none")
        metrics["recognition"]["selected_by"] = None if selection == "none" else selection
        metrics["detectability"] = detectability({"features": f, "pixels": x}, y,
                                                 {role: np.asarray(info.subjects) for role, info in infos.items()},
                                                 seed)

    with stage("diversity"):
        metrics["diversity"] = diversity(x["synthetic"], y["synthetic"], x["train"], y["train"], names, pairs, seed)

    with stage("memorization"):
        mem = memorization(x["synthetic"], x["real"], x["train"], f["synthetic"], f["real"], f["train"])
        metrics["memorization"] = mem

    figures = {"samples": figure_samples(x["synthetic"], y["synthetic"], x["train"], y["train"], names),
               "dcr": figure_dcr(mem["_arrays"], {s: mem[s]["threshold"] for s in ("pixel", "feature")}),
               "closest_pairs": figure_closest_pairs(mem["closest_pairs"], x["synthetic"], x["train"]),
               "prdc": figure_prdc(metrics["fidelity"], names)}

    metrics["membership_inference"] = metrics["likelihood_classifier"] = None
    if flow is not None:
        with stage("membership"):
            members = membership_scores(flow, x["train"], y["train"], device=device, amp=amp)
            nonmembers = membership_scores(flow, x["real"], y["real"], device=device, amp=amp)
            delta = metrics["privacy"]["delta"] or DEFAULT_DELTA
            mia = membership_inference(members, nonmembers, delta=delta, seed=seed,
                                       member_subjects=infos["train"].subjects,
                                       nonmember_subjects=infos["real"].subjects)
            metrics["membership_inference"] = mia
            figures["roc"] = figure_roc(mia["_roc"], mia["auc"])
            if flow.has_likelihood:  # the likelihood classifier on the same test images
                # Calibrated on a validation split, never on --real: the one stored with the model (`augflow
                # classify --calibrate-on`), else one fitted on --val (offsets only when it has every class).
                counts = meta.get("class_counts") or np.bincount(y["train"], minlength=len(names)).tolist()
                calibration = stored_calibration(model, "train", names)
                source = "stored with the model (`augflow classify --calibrate-on`)"
                if calibration is None and val_info is not None:
                    every_class = bool(np.isin(np.arange(len(names)), val_info.labels).all())
                    calibration = fit_calibration(
                        dataset_log_likelihoods(flow, val_info.path, device=device, amp=amp), val_info.labels,
                        log_prior(counts), biases=every_class)
                    source = (f"fitted on the {len(val_info)} images of --val"
                              + ("" if every_class else " (temperature only: --val lacks a class)"))
                if calibration is None:
                    calibration, source = Calibration(), "none (no `augflow classify --calibrate-on`, no --val)"
                test_ll = dataset_log_likelihoods(flow, real, device=device, amp=amp,
                                                  shift_radius=calibration.shift_radius)
                preds = calibration.predict(test_ll, log_prior(counts))
                metrics["likelihood_classifier"] = classification_metrics(y["real"], preds, names)
                metrics["likelihood_classifier"]["calibrated"] = calibration.biases is not None
                metrics["likelihood_classifier"]["calibration"] = source

    metrics["downstream"] = None
    if run_downstream:
        with stage("downstream"):
            val_data = {} if val_info is None else {"val_images": read_images(val_info.path),
                                                    "val_labels": val_info.labels, "val_subjects": val_info.subjects}
            inner = tqdm(total=len(PROTOCOLS) * seeds * len(budgets), desc="downstream", unit="cnn",
                         disable=not progress, leave=False, dynamic_ncols=True)
            metrics["downstream"] = downstream(
                x["train"], y["train"], x["synthetic"], y["synthetic"], x["real"], y["real"], names,
                train_subjects=infos["train"].subjects, test_subjects=infos["real"].subjects, seeds=seeds,
                epochs=downstream_epochs, device=device, progress=inner.update, amp=amp, budget=downstream_budget,
                duplicates=downstream_duplicates, **val_data)
            inner.close()
        figures["recall"] = figure_recall(metrics["downstream"], names)

    with stage("report"):
        metrics["settings"] = {"features": features, "bootstraps": bootstraps, "pairs": pairs, "seed": seed,
                               "seeds": seeds, "amp": amp, "encoder_recipe": encoder_recipe.__dict__}
        metrics["gate"] = release_gate(metrics, gate)
        metrics["verdict"] = verdict(metrics)
        metrics["timings_s"] = timings
        paths = write_report(metrics, out, figures)
    bar.close()
    result = public(metrics)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result
