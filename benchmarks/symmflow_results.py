"""MedSymmFlow vs MAGIC-Flow on the built-in scanner data: classification, selective prediction, generation audit,
membership inference and throughput. Writes reports/symmflow.md and reports/symmflow-*.png.

    python benchmarks/symmflow_results.py --work /work/results/symmflow --threads 1

``--work`` holds ``data/{train,val,test}.h5`` (``augflow demo-data --task scanner --size 32`` then ``augflow
split``) and the two trained run folders ``runs/symmflow`` and ``runs/magic`` (commands in the report). Each stage
stores its results in ``WORK/results.json`` and is skipped when already there (``--redo STAGE`` reruns one), so the
report can be rebuilt without recomputing.

Stages:
- classify: MedSymmFlow's mask readout and MAGIC-Flow's Bayes classifier (both ``augflow.classify.classify_file``;
  the read-out with 1 and 4 passes), both calibrated on the validation split.
- synthesize: 100 images per class from each model (``augflow synthesize``), timed.
- audit: ``augflow audit`` of each synthetic file against the held-out test images (domain features; the
  downstream CNN protocol only with ``--downstream``).
- mia: loss-threshold membership inference with the model's own per-image training loss (bits/dim for MAGIC-Flow,
  the flow-matching loss averaged over 8 noise draws for MedSymmFlow), training vs test images; a score every
  family has, unlike a likelihood.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
AUGFLOW = [sys.executable, "-m", "augflow"]
MODELS = {"symmflow": "MedSymmFlow", "magic": "MAGIC-Flow"}
PER_CLASS = 100


def run(cmd: list[str], cwd: Path) -> str:
    """Run an augflow command in ``cwd``; return its stdout (raise with its stderr on failure)."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def shown(cmd: list[str]) -> str:
    return " ".join(["augflow", *cmd[len(AUGFLOW):]])


def reference_gflops(threads: int) -> float:
    """Same-run reference: dense 2048x2048 fp32 matmul throughput (GFLOP/s), for comparing timings across runs."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def classify_symmflow(work: Path, run_name: str, prefix: str) -> dict:
    """MedSymmFlow's readout of the test split with 1 and 4 passes (temperature fitted on the validation split)."""
    import dataclasses

    from augflow.classify.calibration import fit_calibration
    from augflow.classify.metrics import expected_calibration_error
    from augflow.classify.readout import classify_images, readout_metrics
    from augflow.data.store import read_images, read_info
    from augflow.models import load_model

    data = work / "data"
    val, test = read_info(data / "val.h5"), read_info(data / "test.h5")
    x_val, x_test = read_images(data / "val.h5"), read_images(data / "test.h5")
    model, meta = load_model(work / f"runs/{run_name}/model.pt", with_meta=True)
    names = meta["class_names"]
    out = {}
    for passes in (1, 4):
        # The same calls as augflow.classify.classify_file(..., calibrate_on=val), with the test pass timed.
        temperature = fit_calibration(classify_images(model, x_val, passes=passes, batch_size=64).scores,
                                      val.labels, np.zeros(len(names)), biases=False).temperature
        start = time.perf_counter()
        result = classify_images(model, x_test, passes=passes, batch_size=64)
        seconds = time.perf_counter() - start
        for rank_by in ("distance", "spread") if passes > 1 else ("distance",):
            r = dataclasses.replace(result, rank_by=rank_by,
                                    uncertainty=result.distance if rank_by == "distance" else result.spread)
            metrics = readout_metrics(test.labels, r, names, temperature)
            metrics["ece_uncalibrated"] = expected_calibration_error(r.predictions().probs, test.labels)
            metrics["temperature"] = temperature
            key = prefix + ("" if passes == 1 else "-4pass") + ("-spread" if rank_by == "spread" else "")
            out[key] = {"metrics": metrics, "images_per_s": len(x_test) / seconds,
                        "call": f"augflow.classify.classify_file('runs/{run_name}', 'data/test.h5', "
                                f"passes={passes}, calibrate_on='data/val.h5', rank_by='{rank_by}')",
                        "uncertainty": r.uncertainty.tolist(), "correct": (r.predicted == test.labels).tolist()}
        print(f"  {run_name} {passes} pass(es): accuracy {out[key]['metrics']['accuracy']:.3f}", flush=True)
    return out


def stage_classify(work: Path, threads: int) -> dict:

    from augflow.classify import classify_file as magic_classify
    from augflow.classify.likelihood import dataset_log_likelihoods
    from augflow.classify.metrics import error_auroc
    from augflow.data.store import read_info
    from augflow.models import load_model

    torch.set_num_threads(threads)
    data = work / "data"
    n_test = len(read_info(data / "test.h5"))
    out = classify_symmflow(work, "symmflow", "symmflow")
    result = magic_classify(work / "runs/magic", data / "test.h5", calibrate_on=data / "val.h5", batch_size=64,
                            device="cpu")
    start = time.perf_counter()
    dataset_log_likelihoods(load_model(work / "runs/magic/model.pt"), data / "test.h5", batch_size=64, device="cpu")
    seconds = time.perf_counter() - start
    preds = result["predictions"]
    out["magic"] = {"metrics": result["metrics"], "images_per_s": n_test / seconds,
                    "call": "augflow classify --model runs/magic --data data/test.h5 --calibrate-on data/val.h5 --json",
                    "uncertainty": preds.entropy.tolist(), "correct": (preds.predicted == result["labels"]).tolist()}
    out["magic"]["metrics"]["uncertainty_error_auroc"] = error_auroc(~np.asarray(out["magic"]["correct"]),
                                                                     preds.entropy)
    return out


def stage_synthesize(work: Path, threads: int) -> dict:
    out = {}
    from augflow.data.store import read_info

    names = read_info(work / "data/train.h5").class_names
    for name in MODELS:
        synth = work / f"synth-{name}.h5"
        synth.unlink(missing_ok=True)
        # One call per class: the built-in classes are larger than 100 in training, so --balance would skip them.
        start = time.perf_counter()
        parts, made = [], 0
        for k, cls in enumerate(names):
            part = work / f".synth-{name}-{k}.h5"
            cmd = [*AUGFLOW, "synthesize", "--model", f"runs/{name}", "--class", cls, "--n", str(PER_CLASS),
                   "--out", part.name, "--seed", str(k), "--threads", str(threads), "--device", "cpu"]
            run(cmd, work)
            parts.append(part)
            made += PER_CLASS
        seconds = time.perf_counter() - start
        _merge(parts, synth, names)
        out[name] = {"file": synth.name, "images": made, "seconds": seconds, "images_per_s": made / seconds,
                     "command": f"augflow synthesize --model runs/{name} --class NAME --n {PER_CLASS} --out "
                                f"PART.h5 --seed K --threads {threads} --device cpu (for each class K, merged)"}
    return out


def _merge(parts: list[Path], out: Path, names: list[str]) -> None:
    """Concatenate per-class synthetic files into one (provenance of the first, with every part's)."""
    from augflow.data.store import read_images, read_info, write_dataset

    infos = [read_info(p) for p in parts]
    images = np.concatenate([read_images(p) for p in parts])
    labels = np.concatenate([i.labels for i in infos])
    subjects = [s for i in infos for s in i.subjects]
    provenance = dict(infos[0].provenance)
    provenance["parts"] = [i.provenance for i in infos]
    write_dataset(out, images, labels, subjects, np.zeros(len(labels), dtype=np.int64), names, source="synthetic",
                  provenance=provenance)
    for p in parts:
        p.unlink()


def stage_audit(work: Path, threads: int, downstream: bool) -> dict:
    out = {}
    for name in MODELS:
        report = work / "audits" / name
        cmd = [*AUGFLOW, "audit", "--real", "data/test.h5", "--train", "data/train.h5", "--synthetic",
               f"synth-{name}.h5", "--out", str(report.relative_to(work)), "--json", "--threads", str(threads),
               "--device", "cpu", "--cache-dir", "cache"]
        cmd += ["--seeds", "1", "--epochs", "10"] if downstream else ["--no-downstream"]
        start = time.perf_counter()
        metrics = json.loads(run(cmd, work))
        out[name] = {"command": shown(cmd), "seconds": time.perf_counter() - start, "metrics": metrics}
    return out


@torch.inference_mode()
def _loss_scores(model, images: np.ndarray, labels: np.ndarray, repeats: int) -> np.ndarray:
    """Minus the mean per-image training loss over ``repeats`` noise draws (higher = more member-like)."""
    torch.manual_seed(0)
    total = np.zeros(len(images))
    for _ in range(repeats):
        for i in range(0, len(images), 64):
            x = torch.from_numpy(images[i:i + 64])
            y = torch.from_numpy(labels[i:i + 64].astype(np.int64))
            total[i:i + 64] += model.training_loss(model.dequantize(x) if hasattr(model, "dequantize") else x,
                                                   y).double().numpy()
    return -total / repeats


def stage_mia(work: Path, threads: int) -> dict:
    from augflow.audit.memorization import membership_inference
    from augflow.data.store import read_images, read_info
    from augflow.models import load_model

    torch.set_num_threads(threads)
    train, test = work / "data/train.h5", work / "data/test.h5"
    xs = {"train": read_images(train), "test": read_images(test)}
    ys = {"train": read_info(train).labels, "test": read_info(test).labels}
    out = {}
    for name in MODELS:
        model = load_model(work / f"runs/{name}/model.pt").eval()
        repeats = 8 if name == "symmflow" else 1  # the flow-matching loss is a noisy one-sample estimate
        members = _loss_scores(model, xs["train"], ys["train"], repeats)
        nonmembers = _loss_scores(model, xs["test"], ys["test"], repeats)
        mia = membership_inference(members, nonmembers, delta=1e-5, seed=0)
        out[name] = {k: v for k, v in mia.items() if not k.startswith("_")}  # drop the ROC arrays
        out[name]["score"] = f"minus the per-image training loss ({model.loss_name}), mean of {repeats} draw(s)"
    return out


@torch.inference_mode()
def stage_throughput(work: Path, threads: int) -> dict:
    """In-process sampling throughput (images/s) of 2 batches of 64, the two models alternating in one process."""
    from augflow.models import load_model

    torch.set_num_threads(threads)
    models = {name: load_model(work / f"runs/{name}/model.pt").eval() for name in MODELS}
    y = torch.arange(64) % 7
    seconds = dict.fromkeys(MODELS, 0.0)
    for repeat in range(2):
        for name, model in models.items():
            generator = torch.Generator().manual_seed(repeat)
            start = time.perf_counter()
            model.sample(y, temperature=1.0, generator=generator)
            seconds[name] += time.perf_counter() - start
    return {name: {"images_per_s": 128 / s} for name, s in seconds.items()}


# ----------------------------------------------------------------------------------------------- report


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    return str(v)


def figure_selective(results: dict, path: Path) -> None:
    results = {**results, **results.get("long", {})}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    styles = {"symmflow": ("MedSymmFlow (distance, 1 pass)", "C0", "-"),
              "symmflow-4pass": ("MedSymmFlow (distance, 4 passes)", "C0", "--"),
              "symmflow-4pass-spread": ("MedSymmFlow (spread, 4 passes)", "C2", ":"),
              "magic": ("MAGIC-Flow (entropy)", "C3", "-"),
              "symmflow-long": ("MedSymmFlow, longer run (distance, 1 pass)", "C1", "-"),
              "symmflow-long-4pass": ("MedSymmFlow, longer run (distance, 4 passes)", "C1", "--"),
              "symmflow-long-4pass-spread": ("MedSymmFlow, longer run (spread, 4 passes)", "C1", ":")}
    for key, (label, colour, line) in styles.items():
        if key not in results:
            continue
        curve = results[key]["metrics"]["selective_prediction"]
        ax.plot(100 * np.array(curve["rejected"]), curve["accuracy"], line, color=colour, label=label, marker=".")
    ax.axvline(20, color="grey", lw=0.8)
    ax.set_xlabel("most uncertain test images rejected (%)")
    ax.set_ylabel("accuracy on the rest")
    ax.axhline(100 / 269, color="grey", lw=0.8, ls=":")  # always the largest class
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_samples(work: Path, path: Path) -> None:
    from augflow.data.store import read_images, read_info

    info = read_info(work / "data/train.h5")
    real = read_images(work / "data/train.h5")
    sets = {"real (train)": (real, info.labels)}
    for name, title in MODELS.items():
        f = work / f"synth-{name}.h5"
        sets[title] = (read_images(f), read_info(f).labels)
    k, per = len(info.class_names), 4
    fig, axes = plt.subplots(k, per * len(sets), figsize=(per * len(sets) * 0.75, k * 0.8))
    for col0, (title, (images, labels)) in enumerate(sets.items()):
        for c in range(k):
            rows = np.flatnonzero(labels == c)
            rows = rows[np.linspace(0, len(rows) - 1, per).astype(int)]  # spread out: real slices come by subject
            for j in range(per):
                ax = axes[c, col0 * per + j]
                ax.imshow(images[rows[j], 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0 and col0 == 0:
                    ax.set_ylabel(info.class_names[c], fontsize=6, rotation=0, ha="right")
            if c == 0:
                axes[0, col0 * per].set_title(title, fontsize=8, loc="left")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(work: Path, results: dict) -> None:
    cls = results["classify"]
    lines = ["# MedSymmFlow vs MAGIC-Flow on the built-in scanner data (32 px)", ""]
    env = results["env"]
    lines += [
        f"Made by `python benchmarks/symmflow_results.py --work {work} --threads {env['threads']}` on "
        f"{env['date']}: 2 shared CPU cores, load average {env['load']} during the run (other jobs were running), "
        f"{env['threads']} torch thread(s); same-run reference matmul throughput {env['gflops']:.0f} GFLOP/s. "
        "Small CPU budgets (about 10 minutes of training per model): these are smoke-scale numbers of two "
        "methods under the same budget, not the papers' settings.", "",
        "## Data and training", "",
        "```", *results["commands"]["data"], "```", "",
        "Split: subject-wise, class-stratified; 949 training, 134 validation and 269 test images of 7 imbalanced "
        "scanner classes. Always predicting the largest class (TrioTim SALD) scores accuracy 100/269 = 0.372 and "
        "balanced accuracy 1/7 = 0.143 on the test split.", "",
        "| model | command | steps | wall time (min) | best validation loss |", "|---|---|---|---|---|"]
    for name, title in MODELS.items():
        t = results["training"][name]
        lines.append(f"| {title} | `{t['command']}` | {t['steps']} | {t['minutes']:.1f} | {_fmt(t['val_loss'])} "
                     f"({t['loss_name']}) |")
    lines += ["", "MedSymmFlow uses `scanner-symmflow` with `model.base_channels=16` (a U-Net of "
              f"{results['training']['symmflow']['parameters'] / 1e6:.2f} M parameters; the recipe's 32 is for "
              "64 px runs of 30-60 minutes), EMA 0.999 with the loop's warm-up, 25 Euler steps. MAGIC-Flow uses "
              f"`scanner` ({results['training']['magic']['parameters'] / 1e6:.2f} M parameters), the generation "
              "coupling, no EMA; its epochs were cut to fit the same wall-clock budget (a step costs more).", ""]

    lines += ["## Classification (test split, 269 images)", "",
              "MedSymmFlow: the integrated mask's nearest palette colour (the paper's readout); AUC from minus the "
              "distances; uncertainty = distance to the predicted colour (1 pass: the paper's), or the spread of that "
              "distance over 4 passes. MAGIC-Flow: Bayes classifier with the training prior; uncertainty = predictive "
              "entropy. Both calibrated (one temperature) on the validation split for ECE.", "",
              "| metric | MedSymmFlow 1 pass | MedSymmFlow 4 passes | MedSymmFlow 4 passes, spread | MAGIC-Flow |",
              "|---|---|---|---|---|"]
    keys = ["symmflow", "symmflow-4pass", "symmflow-4pass-spread", "magic"]

    def at(curve, fraction):
        return curve["accuracy"][int(round(fraction / 0.05))]

    rows = [("accuracy", lambda m: m["accuracy"]), ("balanced accuracy", lambda m: m["balanced_accuracy"]),
            ("macro AUC", lambda m: m["auc_macro"]), ("macro F1", lambda m: m["f1_macro"]),
            ("ECE (calibrated)", lambda m: m["ece"]),
            ("accuracy at 10% rejected", lambda m: at(m["selective_prediction"], 0.10)),
            ("accuracy at 20% rejected", lambda m: at(m["selective_prediction"], 0.20)),
            ("gain at 20% rejected (points)", lambda m: 100 * (at(m["selective_prediction"], 0.20) - m["accuracy"])),
            ("selective-prediction area", lambda m: m["selective_prediction"]["area"]),
            ("uncertainty AUROC for errors", lambda m: m["uncertainty_error_auroc"])]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(float(get(cls[k]["metrics"]))) for k in keys) + " |")
    names = list(cls["magic"]["metrics"]["per_class_recall"])
    for n in names:
        lines.append(f"| recall {n} | " + " | ".join(_fmt(cls[k]["metrics"]["per_class_recall"][n]) for k in keys)
                     + " |")
    long = results.get("classify_long")
    if long:
        t = results["training"]["symmflow-long"]
        lines += ["", f"The same MedSymmFlow recipe trained {t['steps']} steps ({t['minutes']:.0f} min; "
                  f"`{t['command']}`; best validation loss {_fmt(t['val_loss'])}), beyond the 10-minute budget, "
                  "to see the trend:", "",
                  "| metric | 1 pass | 4 passes | 4 passes, spread |", "|---|---|---|---|"]
        for label, get in rows:
            lines.append(f"| {label} | " + " | ".join(
                _fmt(float(get(long[k]["metrics"]))) for k in ("symmflow-long", "symmflow-long-4pass",
                                                               "symmflow-long-4pass-spread")) + " |")
    lines += ["", "![selective prediction](symmflow-selective.png)", "",
              "Calls: " + "; ".join(f"`{cls[k]['call']}`" for k in keys), "",
              "Confusion matrices (rows: true, columns: predicted; order " + ", ".join(names) + "):", ""]
    for k in ("symmflow", "magic"):
        lines += [f"{MODELS[k]}:", "", "```", *[" ".join(f"{v:4d}" for v in row)
                                               for row in cls[k]["metrics"]["confusion_matrix"]], "```", ""]

    lines += ["## Generation: fidelity, diversity, memorization (`augflow audit`)", "",
              f"{PER_CLASS} synthetic images per class from each model (temperature: the model's, 1.0 for "
              "MedSymmFlow and 0.8 for MAGIC-Flow), audited against the held-out test images in the audit's domain "
              "feature space (an encoder trained on the training file).", ""]
    audit = results.get("audit")
    if audit:
        lines += ["| metric | MedSymmFlow | MAGIC-Flow | real training images (reference) |", "|---|---|---|---|"]

        def m(name):
            return audit[name]["metrics"]

        fo = {n: m(n)["fidelity"]["overall"] for n in MODELS}
        for key, label in [("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
                           ("density", "density"), ("coverage", "coverage")]:
            lines.append(f"| {label} | {_fmt(fo['symmflow']['synthetic'][key])} | {_fmt(fo['magic']['synthetic'][key])}"
                         f" | {_fmt(fo['magic']['real'][key])} |")
        dv = {n: m(n)["diversity"] for n in MODELS}
        lines.append(f"| intra-class MS-SSIM (lower = more diverse) | {_fmt(dv['symmflow']['synthetic']['intra'])} | "
                     f"{_fmt(dv['magic']['synthetic']['intra'])} | {_fmt(dv['magic']['real']['intra'])} |")
        lines.append(f"| inter-class MS-SSIM | {_fmt(dv['symmflow']['synthetic']['inter'])} | "
                     f"{_fmt(dv['magic']['synthetic']['inter'])} | {_fmt(dv['magic']['real']['inter'])} |")
        mem = {n: m(n)["memorization"] for n in MODELS}
        lines.append(f"| copy fraction (about 0.01 without copying) | {_fmt(mem['symmflow']['copy_fraction'])} | "
                     f"{_fmt(mem['magic']['copy_fraction'])} | |")
        lines.append(f"| exact / near copies | {mem['symmflow']['exact_copies']} / {mem['symmflow']['near_copies']} | "
                     f"{mem['magic']['exact_copies']} / {mem['magic']['near_copies']} | |")
        for space in ("pixel", "feature"):
            lines.append(f"| median DCR ratio synthetic / held-out ({space}) | {_fmt(mem['symmflow'][space]['ratio'])}"
                         f" | {_fmt(mem['magic'][space]['ratio'])} | |")
        ds = {n: m(n).get("downstream") for n in MODELS}
        if all(ds.values()):
            for protocol in ds["magic"]["protocols"]:
                lines.append(f"| downstream CNN balanced accuracy, {protocol} | "
                             f"{_fmt(ds['symmflow']['protocols'][protocol]['summary']['balanced_accuracy']['mean'])} | "
                             f"{_fmt(ds['magic']['protocols'][protocol]['summary']['balanced_accuracy']['mean'])} | |")
        lines += ["", "Commands: " + "; ".join(f"`{audit[n]['command']}`" for n in MODELS),
                  f"(reports: `{work}/audits/NAME/report.html`).", ""]
    else:
        lines += ["TODO: audit not run.", ""]
    mia = results.get("mia")
    if mia:
        lines += ["Membership inference (loss threshold, training vs test images; the audit's "
                  "`membership_inference` on each model's own per-image training loss, since MedSymmFlow has no "
                  "likelihood):", "", "| | MedSymmFlow | MAGIC-Flow |", "|---|---|---|",
                  f"| ROC AUC (0.5 = no leak) | {_fmt(mia['symmflow']['auc'])} | {_fmt(mia['magic']['auc'])} |",
                  f"| TPR at FPR 1% | {_fmt(mia['symmflow']['tpr_at_fpr']['0.01'])} | "
                  f"{_fmt(mia['magic']['tpr_at_fpr']['0.01'])} |",
                  f"| empirical epsilon lower bound (delta 1e-5) | {_fmt(mia['symmflow']['epsilon_lower_bound'])} | "
                  f"{_fmt(mia['magic']['epsilon_lower_bound'])} |", "",
                  f"Scores: MedSymmFlow {mia['symmflow']['score']}; MAGIC-Flow {mia['magic']['score']}.", ""]
    lines += ["![samples](symmflow-samples.png)", ""]

    syn, tp = results["synthesize"], results["throughput"]
    lines += ["## Throughput (CPU, the thread count above)", "",
              "| | MedSymmFlow | MAGIC-Flow |", "|---|---|---|",
              f"| sampling, images/s (in-process, batches of 64) | {tp['symmflow']['images_per_s']:.1f} | "
              f"{tp['magic']['images_per_s']:.1f} |",
              f"| sampling, images/s (`augflow synthesize`, one process per class: incl. start-up and writing) | "
              f"{syn['symmflow']['images_per_s']:.1f} | {syn['magic']['images_per_s']:.1f} |",
              "| classification, images/s (the test file; calibration not counted) | "
              f"{cls['symmflow']['images_per_s']:.1f} | "
              f"{cls['magic']['images_per_s']:.1f} |",
              f"| classification with 4 passes, images/s | {cls['symmflow-4pass']['images_per_s']:.1f} | |", "",
              "Sampling: " + "; ".join(f"`{syn[n]['command']}`" for n in MODELS) + ".",
              "MedSymmFlow costs 25 U-Net evaluations per image for either direction; MAGIC-Flow one inverse pass "
              "per sample and one forward pass per class (K = 7) per classified image.", ""]
    lines += results.get("discussion", [])
    (REPORTS / "symmflow.md").write_text("\n".join(lines) + "\n")


def training_summary(work: Path, commands: dict) -> dict:
    from augflow.models import load_model

    out = {}
    for name in [*MODELS, "symmflow-long"]:
        run_dir = work / "runs" / name
        if not (run_dir / "model.pt").is_file():
            continue
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        model, meta = load_model(run_dir / "model.pt", with_meta=True)
        out[name] = {"command": commands[name], "steps": records[-1]["step"],
                     "minutes": records[-1]["elapsed_s"] / 60, "val_loss": meta.get("val_loss"),
                     "loss_name": meta.get("loss_name"), "parameters": sum(p.numel() for p in model.parameters()
                                                                          if p.requires_grad)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--redo", action="append", default=[])
    parser.add_argument("--downstream", action="store_true", help="Also run the audit's downstream CNN protocol.")
    parser.add_argument("--skip", action="append", default=[], help="Stages to skip (e.g. audit).")
    args = parser.parse_args()
    work = args.work.resolve()
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    commands = {n: p.read_text().strip() for n in [*MODELS, "symmflow-long"]
                if (p := work / "logs" / f"cmd-{n}.txt").is_file()}
    results["commands"] = {"data": ["augflow demo-data --task scanner --size 32 --out scanner32.h5",
                                    "augflow split scanner32.h5 --out-dir data"]}
    results["training"] = training_summary(work, commands)
    stages = {"classify": lambda: stage_classify(work, args.threads),
              "synthesize": lambda: stage_synthesize(work, args.threads),
              "audit": lambda: stage_audit(work, args.threads, args.downstream),
              "throughput": lambda: stage_throughput(work, args.threads),
              "mia": lambda: stage_mia(work, args.threads)}
    if (work / "runs/symmflow-long/model.pt").is_file():  # the same recipe trained for longer (optional)
        stages["classify_long"] = lambda: classify_symmflow(work, "symmflow-long", "symmflow-long")
    for name, fn in stages.items():
        if name in args.skip or (name in results and name not in args.redo):
            continue
        print(f"stage {name} ...", flush=True)
        start = time.perf_counter()
        results[name] = fn()
        print(f"stage {name}: {time.perf_counter() - start:.0f} s", flush=True)
        store.write_text(json.dumps(results, indent=1))
    results["env"] = {"threads": args.threads, "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
                      "gflops": reference_gflops(args.threads), "date": time.strftime("%Y-%m-%d")}
    discussion = work / "discussion.md"
    results["discussion"] = discussion.read_text().splitlines() if discussion.is_file() else []
    store.write_text(json.dumps(results, indent=1))
    figure_selective({**results["classify"], "long": results.get("classify_long", {})},
                     REPORTS / "symmflow-selective.png")
    if "synthesize" in results:
        figure_samples(work, REPORTS / "symmflow-samples.png")
    write_report(work, results)
    print(f"wrote {REPORTS / 'symmflow.md'}")


if __name__ == "__main__":
    main()
