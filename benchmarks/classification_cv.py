"""5-fold subject-wise cross-validation of the MAGIC-Flow likelihood classifier against a ResNet-18.

The protocol of the MAGIC-Flow paper's Table 3 on augflow's built-in scanner data (7 scanners, imbalanced):
folds by subject, stratified by scanner (scikit-learn ``StratifiedGroupKFold``). Per fold, the flow
(``recipes/scanner-classify.toml``: class means and scales, one-pass hybrid objective) trains on the training
subjects, keeps its best-validation weights and fits its posterior temperature on a subject-wise validation part of
them; the ResNet-18 (``augflow.audit.baseline``: one channel, from scratch, class-weighted loss) trains on the same
training subjects (validation part included, it needs no selection) for the same wall-clock time the flow's training
took, on the same number of threads (measured as this process's CPU time, which other jobs on a shared machine
do not inflate; with one thread it is the wall-clock time of a dedicated core). Both are scored on the
held-out fold.

MedSymmFlow's mask read-out (``recipes/scanner-symmflow.toml``; Caetano et al. 2025, arXiv:2507.19098) joins the same
folds with ``--family symmflow`` after the flow's run: it trains on the same training subjects for as many epochs as
fit in the flow's CPU time (one timed epoch first), fits per-class offsets and a temperature on the
same validation part, and writes ``WORK/fold-K/symmflow.json``; the report adds its row.

Run the folds (two processes at once on a 2-core machine), then the report:

    python benchmarks/classification_cv.py run --work /tmp/cv --size 32 --epochs 10 --folds 0,2,4 --threads 1
    python benchmarks/classification_cv.py run --work /tmp/cv --size 32 --epochs 10 --folds 1,3 --threads 1
    python benchmarks/classification_cv.py run --work /tmp/cv --size 32 --folds 0,2,4 --threads 1 --family symmflow
    python benchmarks/classification_cv.py report --work /tmp/cv

``run`` writes ``WORK/fold-K/result.json`` (metrics) and ``predictions.npz``; ``calibrate`` refits the calibrations
of folds that have run from their stored models (after a change of ``augflow.classify.calibration``; the report lists
its command; ``--weights last`` scores the last step's weights of the checkpoint instead of the released model;
``--passes`` / ``--readout-steps`` re-read MedSymmFlow's models with other read-out settings);
``report`` writes reports/classification.md and its figures; ``seeds --work W0 --seed-work W1`` prints the decision
rules of the flow over training seeds (W1: ``run --train-seed 1 --flow-only`` on the same folds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from augflow.audit.baseline import predict_proba, train_cnn
from augflow.classify.calibration import fit_calibration
from augflow.classify.likelihood import dataset_log_likelihoods, log_prior, shifted
from augflow.classify.metrics import (
    Calibration,
    Predictions,
    balanced_accuracy,
    classification_metrics,
    entropy,
    expected_calibration_error,
    posterior,
)
from augflow.classify.readout import ReadoutScorer
from augflow.data.phantom import generate_demo_data
from augflow.data.splits import subject_kfold, subject_split, write_subset
from augflow.data.store import read_images, read_info, sha256_file
from augflow.models import load_model
from augflow.runs import CHECKPOINT
from augflow.train.loop import train
from augflow.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
K_FOLDS = 5


def dataset(work: Path, size: int, seed: int) -> Path:
    path = work / f"scanner-{size}.h5"
    if not path.exists():
        generate_demo_data("scanner", path, size=size, seed=seed, progress=False)
    return path


def write_fold(data: Path, fold_dir: Path, fold: int, seed: int) -> dict[str, Path]:
    """train/val/test files of one fold: test = the fold's subjects, val = 10% of the other subjects."""
    info = read_info(data, check_values=False)
    train_rows, test_rows = subject_kfold(info.labels, info.subjects, k=K_FOLDS, seed=seed)[fold]
    inner = subject_split(info.labels[train_rows], info.subjects[train_rows], val=0.1, test=0.0, seed=seed)
    parts = {"train": train_rows[inner["train"]], "val": train_rows[inner["val"]], "test": test_rows}
    paths = {}
    for name, rows in parts.items():
        paths[name] = fold_dir / f"{name}.h5"
        if not paths[name].exists():
            write_subset(data, rows, paths[name], {"fold": fold, "k": K_FOLDS, "part": name, "seed": seed})
    return paths


def run_fold(data: Path, work: Path, fold: int, epochs: int, seed: int, command: str,
             overrides: list[str] = (), train_seed: int | None = None, flow_only: bool = False,
             cnn_epochs_from: Path | None = None) -> None:
    """One fold: the flow, then the ResNet-18 at its CPU time. The folds are drawn with ``seed``, the models
    initialised and their batches drawn with ``train_seed`` (default ``seed``). ``flow_only``: a screen, the flow's
    rows alone (``fold-K/flow_rows.json``); a later full run of the fold reuses them. ``cnn_epochs_from``: another
    work folder on the same folds whose CNN epochs this fold's CNN gets (another training seed at the same budget)."""
    fold_dir = work / f"fold-{fold}"
    budget = None if cnn_epochs_from is None else cnn_epochs_from / f"fold-{fold}" / "result.json"
    if budget is not None and not budget.exists():
        raise SystemExit(f"--cnn-epochs-from: {budget} is missing: run the fold's CNN in {cnn_epochs_from} first")
    paths = write_fold(data, fold_dir, fold, seed)
    train_info, val_info, test_info = (read_info(paths[p]) for p in ("train", "val", "test"))
    names, k = test_info.class_names, test_info.num_classes
    seed = seed if train_seed is None else train_seed

    recipe = load_recipe("scanner-classify", [f"train.epochs={epochs}", *overrides])
    flow = train_flow(paths, fold_dir / "flow", recipe, seed)
    rows = stored_flow_rows(fold_dir)
    if flow_only:
        print(f"fold {fold} (training seed {seed}): flow bacc {rows['flow']['balanced_accuracy']:.3f}, 9 shifts "
              "(offsets on val / train+val) " + " / ".join(
                  f"{rows['decision_levers'][f'shift radius 1, offsets on {p}']:.3f}" for p in ("val", "train+val")),
              flush=True)
        return
    flow_seconds = flow["seconds"]
    images = np.concatenate([read_images(paths["train"]), read_images(paths["val"])])
    labels = np.concatenate([train_info.labels, val_info.labels])
    # The same CPU-seconds as the flow, as a number of epochs, so that the CNN's run is an epoch budget that
    # reproduces (recorded in the summary). Timed runs of one and two epochs separate the cost of an epoch from the
    # fixed cost (set-up, BatchNorm re-estimation): one timed epoch alone set budgets 12-20 % under the flow's time.
    if budget is not None:
        cnn_epochs = json.loads(budget.read_text())["cnn_epochs"]
    else:
        one, two = (cpu_seconds(lambda e=e: train_cnn(images, labels, k, epochs=e, seed=seed)) for e in (1, 2))
        per_epoch = max(two - one, 1e-3)
        cnn_epochs = max(1, round((flow_seconds - (one - per_epoch)) / per_epoch))
    started = time.process_time()
    cnn = train_cnn(images, labels, k, epochs=cnn_epochs, seed=seed)
    cnn_seconds = time.process_time() - started
    torch.save(cnn.state_dict(), fold_dir / "cnn.pt")
    test_images = read_images(paths["test"])
    probs = predict_proba(cnn, test_images).astype(np.float64)
    cnn_metrics = classification_metrics(test_info.labels, cnn_predictions(probs), names)
    # Like for like with the flow's shift lever: the CNN's softmax averaged over the same 9 shifts.
    shift_probs = np.mean([predict_proba(cnn, shifted(torch.from_numpy(test_images), dy, dx).numpy())
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0).astype(np.float64)
    cnn_shift_metrics = classification_metrics(test_info.labels, cnn_predictions(shift_probs), names)

    summary = {
        "fold": fold, "command": command, "image_size": test_info.image_shape[-1], "class_names": names,
        "train_images": len(train_info), "val_images": len(val_info),
        "test_images": len(test_info), "flow_steps": flow["steps"], "flow_train_seconds": flow_seconds,
        "cnn_train_seconds": cnn_seconds, "cnn_epochs": cnn_epochs, "threads": torch.get_num_threads(),
        "cnn_epochs_from": None if cnn_epochs_from is None else str(cnn_epochs_from),
        "best_val_bpd": flow["best_val_bpd"], "recipe_overrides": list(overrides), "train_seed": seed,
        "cnn": cnn_metrics,
        "cnn_shift": cnn_shift_metrics,
        **rows,
    }
    np.savez(fold_dir / "predictions.npz", labels=test_info.labels, cnn_probs=probs, cnn_shift_probs=shift_probs)
    (fold_dir / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"fold {fold}: flow bacc {summary['flow']['balanced_accuracy']:.3f} ({flow_seconds:.0f} s), "
          f"cnn bacc {cnn_metrics['balanced_accuracy']:.3f} ({cnn_seconds:.0f} s)", flush=True)


def cnn_predictions(probs: np.ndarray) -> Predictions:
    return Predictions(np.log(np.maximum(probs, 1e-300)), probs, probs.argmax(1), entropy(probs))


def cpu_seconds(work) -> float:
    """This process's CPU seconds for ``work()``."""
    started = time.process_time()
    work()
    return time.process_time() - started


def train_flow(paths: dict[str, Path], out: Path, recipe, seed: int) -> dict:
    """Train (or resume) a fold's flow: ``{"seconds", "steps", "steps_measured", "best_val_bpd"}``, its training CPU
    seconds being the CNN's budget.

    CPU seconds, not wall time: the budget is fair on a machine other jobs share. A resumed run's earlier processes
    are not measured, so its seconds are this process's, scaled to all the run's steps; a finished run's seconds
    are read from the record written when it finished.
    """
    record = out / "cpu_seconds.json"
    if record.exists():
        return json.loads(record.read_text())
    checkpoint = out / CHECKPOINT
    first = torch.load(checkpoint, map_location="cpu", weights_only=False)["step"] if checkpoint.exists() else 0
    started = time.process_time()
    result = train(paths["train"], out, recipe, val=paths["val"], seed=seed, progress=False,
                   resume=checkpoint.exists())
    seconds = time.process_time() - started
    if result.steps == first:
        raise SystemExit(f"{out} finished in a process that did not record its CPU time: delete it to retrain")
    summary = {"seconds": seconds * result.steps / (result.steps - first), "steps": result.steps,
               "steps_measured": result.steps - first, "best_val_bpd": result.best_val_loss}
    record.write_text(json.dumps(summary))
    return summary


# Test-time shift averaging (augflow.classify.likelihood); the recipe trains with 2 px shifts. Radius 2 (25 passes)
# tied radius 1 over five folds at 64 px (reports/classification-dropout03.md) and was dropped.
SHIFT_RADII = (0, 1)


def stored_flow_rows(fold_dir: Path) -> dict:
    """``flow_rows`` of the fold's released model, kept in ``fold-K/flow_rows.json`` with the model's SHA-256 (a
    screen's rows serve the fold's full run; a retrained model is scored again, and a change of the scoring code
    wants the file deleted or the ``calibrate`` stage)."""
    path, sha = fold_dir / "flow_rows.json", sha256_file(fold_dir / "flow" / "model.pt")
    if path.exists() and (stored := json.loads(path.read_text())).pop("model_sha256", None) == sha:
        return stored
    rows = flow_rows(fold_dir)
    path.write_text(json.dumps({**rows, "model_sha256": sha}, indent=2))
    return rows


def flow_rows(fold_dir: Path, weights: str = "released") -> dict:
    """The flow's rows of a fold, from its stored model and the calibrations fitted on the fold's validation part.

    ``weights``: "released" (``model.pt``, the run's selection) or "last" (the last step's weights, from the run's
    checkpoint: what the run would have released without selection).

    ``flow``: per-class offsets and temperature (the decisions set for balanced accuracy); ``flow_temperature_only``:
    the Bayes posterior's decisions, temperature only; ``flow_uniform_prior``: a uniform class prior, temperature only;
    ``flow_shift``: the class scores averaged over the 9 whole-pixel shifts within 1 pixel, the offsets fitted on the
    training and validation parts together (eight times the validation part's rare-class images), the temperature
    on the validation part. ``decision_levers``: the test balanced accuracy of each shift radius (``SHIFT_RADII``)
    with the offsets fitted on the validation part or on both parts, so that the report can say what each lever gave.
    """
    val_info, test_info = read_info(fold_dir / "val.h5"), read_info(fold_dir / "test.h5")
    model, meta = load_model(fold_dir / "flow" / "model.pt", with_meta=True)
    if weights == "last":
        state = torch.load(fold_dir / "flow" / CHECKPOINT, map_location="cpu", weights_only=False)
        if state["ema"] is not None:
            raise SystemExit(f"--weights last: {fold_dir / 'flow'} kept an EMA of its weights: use --weights released")
        model.load_state_dict(state["model"])
    val_ll = dataset_log_likelihoods(model, fold_dir / "val.h5", device="cpu")
    test_ll = dataset_log_likelihoods(model, fold_dir / "test.h5", device="cpu")
    rows = {}
    for key, prior, offsets in (("flow", "train", True), ("flow_temperature_only", "train", False),
                                ("flow_uniform_prior", "uniform", False)):
        log_pi = log_prior(meta["class_counts"], prior)
        calibration = fit_calibration(val_ll, val_info.labels, log_pi, biases=offsets)
        rows[key] = classification_metrics(test_info.labels, calibration.predict(test_ll, log_pi),
                                           test_info.class_names)
        rows[key]["temperature"] = calibration.temperature
    rows["flow"]["ece_uncalibrated"] = expected_calibration_error(
        posterior(test_ll, log_prior(meta["class_counts"])), test_info.labels)
    train_info, log_pi = read_info(fold_dir / "train.h5"), log_prior(meta["class_counts"])
    labels = {"train": train_info.labels, "val": val_info.labels}
    levers = {}
    for radius in SHIFT_RADII:
        ll = {"val": val_ll, "test": test_ll} if radius == 0 else {}  # scored above
        for part in {"train", "val", "test"} - set(ll):
            ll[part] = dataset_log_likelihoods(model, fold_dir / f"{part}.h5", device="cpu", shift_radius=radius)
        temperature = fit_calibration(ll["val"], val_info.labels, log_pi, biases=False).temperature
        for offsets_on in ("val", "train+val"):
            parts = offsets_on.split("+")
            offsets = fit_calibration(np.concatenate([ll[p] for p in parts]),
                                      np.concatenate([labels[p] for p in parts]), log_pi).biases
            predictions = Calibration(temperature, offsets).predict(ll["test"], log_pi)
            metrics = classification_metrics(test_info.labels, predictions, test_info.class_names)
            levers[f"shift radius {radius}, offsets on {offsets_on}"] = metrics["balanced_accuracy"]
            if radius == 1 and offsets_on == "train+val":
                rows["flow_shift"] = {**metrics, "temperature": temperature}
    rows["decision_levers"] = levers
    return rows


def run_symmflow_fold(work: Path, fold: int, seed: int, command: str, overrides: list[str] = (),
                      passes: int = 1, steps: int | None = None) -> None:
    """MedSymmFlow's read-out on a fold the flow has run: the flow's CPU time, offsets fitted on its validation part."""
    fold_dir = work / f"fold-{fold}"
    flow_result = fold_dir / "result.json"
    if not flow_result.exists():
        raise SystemExit(f"{flow_result} is missing: run the flow's folds first (MedSymmFlow gets the flow's CPU time)")
    flow_seconds = json.loads(flow_result.read_text())["flow_train_seconds"]
    paths = {part: fold_dir / f"{part}.h5" for part in ("train", "val", "test")}
    budget_file = fold_dir / "symmflow-budget.json"  # written before training, so that a resumed run keeps it
    if not budget_file.exists():
        timing = fold_dir / "symmflow-epoch"
        epoch_seconds = cpu_seconds(lambda: train(paths["train"], timing, load_recipe(
            "scanner-symmflow", ["train.epochs=1", *overrides]), val=paths["val"], seed=seed, progress=False,
            overwrite=True))
        shutil.rmtree(timing)
        budget_file.write_text(json.dumps({"epochs": max(1, round(flow_seconds / epoch_seconds)),
                                           "epoch_seconds": epoch_seconds}))
    epochs = json.loads(budget_file.read_text())["epochs"]

    run_dir = fold_dir / "symmflow"
    started = time.process_time()
    result = train(paths["train"], run_dir, load_recipe("scanner-symmflow", [f"train.epochs={epochs}", *overrides]),
                   val=paths["val"], seed=seed, progress=False, resume=(run_dir / "checkpoint.pt").exists())
    seconds = time.process_time() - started
    summary = {"fold": fold, "command": command, "steps": result.steps, "epochs": epochs, "train_seconds": seconds,
               "passes": passes, "readout_steps": steps, "seed": seed, "recipe_overrides": list(overrides),
               "best_val_loss": result.best_val_loss, **symmflow_rows(fold_dir, passes, seed, steps)}
    (fold_dir / "symmflow.json").write_text(json.dumps(summary, indent=2))
    print(f"fold {fold}: symmflow bacc {summary['symmflow']['balanced_accuracy']:.3f} (nearest colour "
          f"{summary['symmflow_nearest_colour']['balanced_accuracy']:.3f}; {result.steps} steps, {seconds:.0f} s)",
          flush=True)


def symmflow_rows(fold_dir: Path, passes: int, seed: int, steps: int | None = None) -> dict:
    """MedSymmFlow's rows of a fold from its stored model: offsets, temperature and posterior shape (distance power)
    fitted on the validation part, and the paper's nearest-colour decision (same calibration); ``ece_power_1``: the
    test ECE of the distances as they are, temperature only; ``validation_balanced_accuracy``: the nearest colour's on
    the validation part, where a setting is chosen."""
    scorer = ReadoutScorer(load_model(fold_dir / "symmflow" / "model.pt"), passes=passes, seed=seed, device="cpu",
                           steps=steps)
    val_info, test_info = read_info(fold_dir / "val.h5"), read_info(fold_dir / "test.h5")
    val_scores, test_scores = scorer.score(fold_dir / "val.h5"), scorer.score(fold_dir / "test.h5")
    calibration = fit_calibration(val_scores.values, val_info.labels, val_scores.log_prior,
                                  distance_powers=scorer.distance_powers)
    names = test_info.class_names
    metrics = test_scores.metrics(test_info.labels, names, calibration)
    metrics["temperature"], metrics["distance_power"] = calibration.temperature, calibration.distance_power
    linear = fit_calibration(val_scores.values, val_info.labels, val_scores.log_prior, biases=False)  # power 1
    metrics["ece_power_1"] = expected_calibration_error(test_scores.predictions(linear).probs, test_info.labels)
    metrics["validation_balanced_accuracy"] = balanced_accuracy(val_info.labels, val_scores.predicted)
    raw = test_scores.metrics(test_info.labels, names, Calibration(calibration.temperature,
                                                                   distance_power=calibration.distance_power))
    return {"symmflow": metrics, "symmflow_nearest_colour": raw}


def calibrate_folds(work: Path, folds: list[int], command: str, weights: str = "released",
                    symmflow_only: bool = False, passes: int | None = None, steps: int | None = None) -> None:
    """Refit the calibrated rows of folds that have run, from their stored models (no training; ``weights``: as
    :func:`flow_rows`; ``symmflow_only``: MedSymmFlow's rows only); the command is recorded
    (``calibrate_command``) for the report."""
    for fold in folds:
        fold_dir = work / f"fold-{fold}"
        flow, symmflow = fold_dir / "result.json", fold_dir / "symmflow.json"
        needed = symmflow if symmflow_only else flow
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run the fold first")
        if not symmflow_only:
            record = json.loads(flow.read_text())
            rows = flow_rows(fold_dir, weights)
            flow.write_text(json.dumps({**record, **rows, "flow_weights": weights, "calibrate_command": command},
                                       indent=2))
        if symmflow.exists():
            record = json.loads(symmflow.read_text())
            readout = {"passes": passes or record["passes"], "readout_steps": steps or record.get("readout_steps")}
            rows = symmflow_rows(fold_dir, readout["passes"], record.get("seed", 0), readout["readout_steps"])
            symmflow.write_text(json.dumps({**record, **readout, **rows, "calibrate_command": command}, indent=2))
        print(f"fold {fold}: calibrations refitted", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "calibrate", "report", "seeds"])
    parser.add_argument("--work", type=Path, required=True, help="Folder for the data, folds and models.")
    parser.add_argument("--seed-work", type=Path, action="append", default=[],
                        help="seeds: the work folder of another training seed on the same folds (repeatable).")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8, help="Flow training epochs (the CNN gets its time).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and the folds (and of the training).")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="run: seed of the training instead of --seed, on the same folds (run-to-run spread).")
    parser.add_argument("--flow-only", action="store_true",
                        help="run: train and score the flow only (a screen): WORK/fold-K/flow_rows.json, no CNN.")
    parser.add_argument("--cnn-epochs-from", type=Path, default=None, metavar="WORK",
                        help="run: the CNN trains for the epochs of WORK's CNN on the same fold instead of the flow's "
                             "CPU time (a second training seed at the first one's budget).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", choices=["magic", "symmflow"], default="magic",
                        help="run: magic: the flow and the CNN; symmflow: MedSymmFlow on folds the flow has run. "
                             "calibrate: symmflow refits MedSymmFlow's rows only.")
    parser.add_argument("--passes", type=int, default=None,
                        help="MedSymmFlow read-outs per image (run: default 1, the paper's; calibrate: default the "
                             "fold's own).")
    parser.add_argument("--readout-steps", type=int, default=None,
                        help="MedSymmFlow's integration steps per read-out (run: default the model's model.steps; "
                             "calibrate: default the fold's own).")
    parser.add_argument("--name", default="classification",
                        help="report: write reports/NAME.md and NAME-*.png (a variant's run beside the main report).")
    parser.add_argument("--weights", choices=["released", "last"], default="released",
                        help="calibrate: score the released model (default) or the last step's weights.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a key of the family's recipe (repeatable), as augflow train --set.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "run":
        data = dataset(args.work, args.size, args.seed)
        command = " ".join(["python", *sys.argv])
        for fold in map(int, args.folds.split(",")):
            if args.family == "symmflow":
                run_symmflow_fold(args.work, fold, args.seed, command, args.set, args.passes or 1, args.readout_steps)
            else:
                run_fold(data, args.work, fold, args.epochs, args.seed, command, args.set, args.train_seed,
                         args.flow_only, args.cnn_epochs_from)
    elif args.stage == "calibrate":
        calibrate_folds(args.work, list(map(int, args.folds.split(","))), " ".join(["python", *sys.argv]),
                        args.weights, args.family == "symmflow", args.passes, args.readout_steps)
    elif args.stage == "seeds":
        from classification_report import seed_table

        print(seed_table([args.work, *args.seed_work], K_FOLDS))
    else:
        from classification_report import write_report

        write_report(args.work, REPORTS, " ".join(["python", "benchmarks/classification_cv.py", *sys.argv[1:]]),
                     args.name, K_FOLDS)


if __name__ == "__main__":
    main()
