"""reports/classification.md from the folds of ``classification_cv.py``: tables, confusion matrices, curves, maps.

Called by ``python benchmarks/classification_cv.py report --work WORK``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from augflow.classify.metrics import REJECTION_GRID  # noqa: E402
from augflow.data.store import read_info  # noqa: E402
from augflow.explain import explain_file, plot_explanation  # noqa: E402

MODELS = {"flow": "MAGIC-Flow (Bayes, training prior, temperature; offset decisions)",
          "flow_temperature_only": "MAGIC-Flow (Bayes, training prior, temperature; argmax decisions)",
          "flow_uniform_prior": "MAGIC-Flow (uniform prior)",
          "flow_shift": "MAGIC-Flow (scores averaged over the 9 shifts within 1 px; offsets on training + validation "
                        "parts)",
          "cnn": "ResNet-18 (class-weighted)",
          "cnn_shift": "ResNet-18 (softmax averaged over the same 9 shifts)",
          "symmflow": "MedSymmFlow (mask read-out, temperature and distance power; offset decisions)",
          "symmflow_nearest_colour": "MedSymmFlow (nearest colour: the paper's read-out)"}
METRICS = ["accuracy", "balanced_accuracy", "auc_macro", "precision_macro", "recall_macro", "f1_macro", "ece"]


def _mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def _confusion_figure(results: list[dict], keys: list[str], out: Path) -> None:
    names = results[0]["class_names"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.8))
    for ax, key in zip(axes, keys, strict=True):
        matrix = np.sum([r[key]["confusion_matrix"] for r in results], axis=0)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{MODELS[key]}\n(summed over {len(results)} folds; colour = row rate)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _selective_figure(results: list[dict], keys: list[str], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in keys:
        curves = np.array([r[key]["selective_prediction"]["accuracy"] for r in results])
        mean, std = curves.mean(axis=0), curves.std(axis=0)
        ax.plot(100 * REJECTION_GRID, mean, marker="o", markersize=3, label=MODELS[key])
        ax.fill_between(100 * REJECTION_GRID, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("most uncertain images rejected (%)")
    ax.set_ylabel("accuracy on the kept images")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _attribution_figures(work: Path, reports: Path, fold: int, name: str) -> list[str]:
    """Two figures on fold ``fold``'s test images: maps of one image per scanner, and a close-pair contrast."""
    fold_dir = work / f"fold-{fold}"
    test = fold_dir / "test.h5"
    info = read_info(test, check_values=False)
    names = info.class_names
    first = [int(np.flatnonzero(info.labels == k)[0]) for k in range(len(names)) if np.any(info.labels == k)]
    per_class = reports / f"{name}-attribution.png"
    plot_explanation(explain_file(fold_dir / "flow", test, first[:4], device="cpu"), per_class)
    # The designed-close pair: Prisma vs Prisma Fit (same vendor and field strength).
    prisma = [int(i) for i in np.flatnonzero(info.labels == names.index("Prisma"))[:2]]
    contrast = reports / f"{name}-attribution-contrast.png"
    plot_explanation(explain_file(fold_dir / "flow", test, prisma, class_name="Prisma", contrast="Prisma Fit",
                                  device="cpu"), contrast)
    return [per_class.name, contrast.name]


def _overrides(result: dict) -> str:
    """The recipe overrides of a run, as the report names them (none: the recipe as shipped)."""
    overrides = result.get("recipe_overrides") or []
    return (" with " + ", ".join(f"`{o}`" for o in overrides)) if overrides else ""


def _readout_setting(results: list[dict]) -> str:
    """How MedSymmFlow's rows read the images out: passes and integration steps (one setting for every fold)."""
    settings = {(r["symmflow"]["passes"], r["symmflow"]["steps"]) for r in results}
    passes, steps = settings.pop() if len(settings) == 1 else (None, None)
    if passes is None:
        return "MedSymmFlow's read-out settings differ between folds: " + ", ".join(
            f"fold {r['fold']}: {r['symmflow']['passes']} x {r['symmflow']['steps']} steps" for r in results) + "."
    times = "once" if passes == 1 else f"{passes} times (the distances averaged)"
    return (f"MedSymmFlow reads each image out {times} with {steps} Euler steps on its training times' grid "
            f"(`augflow classify --passes {passes} --steps {steps}`); its rows above use these.")


def write_report(work: Path, reports: Path, command: str, name: str = "classification", k_folds: int = 5) -> Path:
    """``reports/NAME.md`` and its figures ``NAME-*.png``; the hand-written reading (``classification-notes.md``)
    belongs to the main report only. When fewer than ``k_folds`` folds have run, the report says which did."""
    results = [json.loads(p.read_text()) for p in sorted(work.glob("fold-*/result.json"))]
    if not results:
        raise SystemExit(f"no fold results in {work}; run the 'run' stage first")
    symmflow = [work / f"fold-{r['fold']}" / "symmflow.json" for r in results]
    if all(p.exists() for p in symmflow):  # MedSymmFlow's row, when it ran on every fold
        for r, p in zip(results, symmflow, strict=True):
            run = json.loads(p.read_text())
            r.update(symmflow=run.pop("symmflow"), symmflow_nearest_colour=run.pop("symmflow_nearest_colour"),
                     symmflow_run=run)
    models = [key for key in MODELS if all(key in r for r in results)]  # rows every fold has
    main = [key for key in ("flow", "flow_shift", "cnn", "cnn_shift", "symmflow") if key in models]  # figure rows
    names = results[0]["class_names"]
    reports.mkdir(parents=True, exist_ok=True)
    _confusion_figure(results, main, reports / f"{name}-confusion.png")
    _selective_figure(results, main, reports / f"{name}-selective.png")
    figures = _attribution_figures(work, reports, results[0]["fold"], name)

    lines = [
        "# Likelihood classification of the 7 scanners: MAGIC-Flow vs ResNet-18"
        + (" (and MedSymmFlow's read-out)" if "symmflow" in models else ""),
        "",
        f"{k_folds}-fold subject-wise cross-validation (scikit-learn StratifiedGroupKFold, seed 0"
        + ("" if len(results) == k_folds else
           f"; folds {', '.join(str(r['fold']) for r in results)} of {k_folds} have run, and every mean below is over "
           "them only") + ") on the "
        f"built-in scanner data at {results[0]['image_size']} px (1352 slices, 338 subjects). Per fold the flow "
        f"(`recipes/scanner-classify.toml`{_overrides(results[0])}, {results[0]['flow_steps']} steps) trains on the "
        "training subjects, "
        + ("is scored with its last step's weights (`calibrate --weights last`, not the run's selection) and "
           if results[0].get("flow_weights") == "last" else "keeps its best-validation weights and ")
        + "fits its posterior temperature on a 10% subject-wise validation part; the ResNet-18 "
        "(augflow.audit.baseline: one input channel, from scratch, class-weighted cross-entropy) trains on all "
        "training subjects for the same CPU time the flow's training took, on one thread each. Both are scored on "
        "the held-out subjects.",
        "",
        "Commands (the folds ran as separate processes, one thread each):",
        "",
        "```",
        *sorted({r["command"] for r in results}),
        *sorted({r["calibrate_command"] for r in results if "calibrate_command" in r}),
        *sorted({r["symmflow_run"]["command"] for r in results if "symmflow_run" in r}),
        *sorted({r["symmflow_run"]["calibrate_command"] for r in results
                 if "calibrate_command" in r.get("symmflow_run", {})}),
        command,
        "```",
        "",
        "## Metrics on the held-out folds (mean ± std over folds)",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for key in models:
        label = MODELS[key]
        lines.append(f"| {label} | " + " | ".join(_mean_std([r[key][m] for r in results]) for m in METRICS) + " |")
    lines += [
        "",
        "Selective prediction (accuracy when the most uncertain images are rejected, by predictive entropy"
        + ("; MedSymmFlow by its mask's distance to the predicted colour, the paper's uncertainty"
           if "symmflow" in models else "") + "; area = mean over 0-95 %):",
        "",
        "| model | rejected 0 % | 10 % | 20 % | 50 % | area |",
        "|---|---|---|---|---|---|",
    ]
    grid = [round(v, 2) for v in REJECTION_GRID.tolist()]
    for key in main:
        cells = [_mean_std([r[key]["selective_prediction"]["accuracy"][grid.index(f)] for r in results])
                 for f in (0.0, 0.1, 0.2, 0.5)]
        area = _mean_std([r[key]["selective_prediction"]["area"] for r in results])
        lines.append(f"| {MODELS[key]} | " + " | ".join(cells) + f" | {area} |")
    lines += ["", "Per-class recall (mean over folds):", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in models:
        lines.append(f"| {MODELS[key]} | "
                     + " | ".join(f"{np.mean([r[key]['per_class_recall'][c] for r in results]):.2f}" for c in names)
                     + " |")
    if "decision_levers" in results[0]:
        lines += ["", "What the flow's decision levers give (test balanced accuracy, mean ± std over folds; the "
                  "scores averaged over the (2R + 1)^2 whole-pixel shifts within R pixels, `augflow classify "
                  "--shift-radius R`; the per-class offsets fitted on the validation part, or on the training and "
                  "validation parts together, `--offsets-on`; the temperature on the validation part in every row):",
                  "", "| shift radius R | offsets on the validation part | offsets on training + validation |",
                  "|---|---|---|"]
        levers = results[0]["decision_levers"]
        for radius in sorted({key.split(",")[0] for key in levers}):
            lines.append(f"| {radius.removeprefix('shift radius ')} | " + " | ".join(
                _mean_std([r["decision_levers"][f"{radius}, offsets on {part}"] for r in results])
                for part in ("val", "train+val")) + " |")
    lines += ["", "Calibration of the flow (expected calibration error, 15 bins, on the test folds): "
              f"{_mean_std([r['flow']['ece_uncalibrated'] for r in results])} with the raw posterior; "
              f"{_mean_std([r['flow']['ece'] for r in results])} with the temperature (fitted by the ordinary "
              "likelihood of the validation labels; temperatures "
              + ", ".join(f"{r['flow']['temperature']:.3g}" for r in results) + ")"
              + (", where a perfectly calibrated posterior would show "
                 f"{_mean_std([r['flow']['ece_floor'] for r in results])} on these test folds (labels drawn "
                 "from the posterior itself: the ECE's sampling floor)"
                 if "ece_floor" in results[0]["flow"] else "") + ". The per-class offsets (fitted by "
              "the class-balanced likelihood of the same labels) set the decisions only: the probabilities, their "
              "ECE and the entropy that ranks selective prediction are the temperature-scaled Bayes posterior's.",
              *(["", _readout_setting(results)] if "steps" in results[0].get("symmflow", {}) else []),
              *(["", "Calibration of MedSymmFlow's read-out (the same ECE): "
                 f"{_mean_std([r['symmflow']['ece_power_1'] for r in results])} for `softmax(-d / T)` of the mask's "
                 f"colour distances d; {_mean_std([r['symmflow']['ece'] for r in results])} with the posterior's "
                 "shape fitted too, `softmax(-(d^q - 1) / (q T))` with the power q chosen by the validation likelihood "
                 "(augflow.classify.metrics.power_scores; powers " + ", ".join(
                     f"{r['symmflow']['distance_power']:g}" for r in results) + ")."]
                if "ece_power_1" in results[0].get("symmflow", {}) else []),
              "", "Budget per fold (CPU seconds, one thread): " + ", ".join(
                  f"fold {r['fold']}: flow {r['flow_train_seconds']:.0f} s, CNN {r['cnn_train_seconds']:.0f} s"
                  + (f", MedSymmFlow {r['symmflow_run']['train_seconds']:.0f} s ({r['symmflow_run']['steps']} steps)"
                     if "symmflow_run" in r else "")
                  for r in results) + ". The CNN's time includes its BatchNorm re-estimation pass after the "
              "budget; the flow's includes its per-epoch validation.",
              "",
              f"![confusion matrices]({name}-confusion.png)",
              "",
              f"![selective prediction]({name}-selective.png)",
              "",
              "## Likelihood attribution maps (fold 0 test subjects)",
              "",
              f"![maps of one image per scanner]({figures[0]})",
              "",
              "H(x, ŷ) minus its brain mean: red pixels make the image more typical of the predicted scanner than "
              "its average pixel does.",
              "",
              f"![Prisma vs Prisma Fit]({figures[1]})",
              "",
              "H(x, Prisma) − H(x, Prisma Fit) for two Prisma slices: red where the image is more typical of Prisma "
              "than of the close Prisma Fit; the sum is the log-likelihood ratio of the two scanners.",
              ""]
    notes = reports / "classification-notes.md"  # the hand-written reading of the numbers, kept across reruns
    if name == "classification" and notes.exists():
        lines += ["## Reading", "", notes.read_text().strip(), ""]
    out = reports / f"{name}.md"
    out.write_text("\n".join(lines))
    return out


def seed_table(works: list[Path], k_folds: int = 5) -> str:
    """The flow's decision rules over training seeds: one work folder per seed (the same folds, ``run --train-seed``,
    ``--flow-only`` allowed), from each fold's ``flow_rows.json``; the ResNet-18's balanced accuracy too when every
    folder's folds ran it. Per rule: each seed's mean ± std over folds, all runs pooled, and the mean and largest
    change between seeds on one fold (the run-to-run noise of that rule)."""
    rows = [[json.loads((work / f"fold-{fold}" / "flow_rows.json").read_text()) for fold in range(k_folds)]
            for work in works]
    values = {lever: np.array([[fold["decision_levers"][lever] for fold in seed] for seed in rows])
              for lever in rows[0][0]["decision_levers"]}
    for metric in ("auc_macro", "ece"):
        values[f"{metric} of the temperature-scaled posterior"] = np.array(
            [[fold["flow"][metric] for fold in seed] for seed in rows])
    results = [[work / f"fold-{fold}" / "result.json" for fold in range(k_folds)] for work in works]
    if all(path.exists() for seed in results for path in seed):  # the CNN ran beside every seed's flow
        cnn = [[json.loads(path.read_text()) for path in seed] for seed in results]
        for key, name in (("cnn", "ResNet-18"), ("cnn_shift", "ResNet-18, 9 shifts")):
            values[name] = np.array([[fold[key]["balanced_accuracy"] for fold in seed] for seed in cnn])
    seeds = " | ".join(f"seed folder {i}" for i in range(len(works)))
    lines = [f"| test, {k_folds} folds | {seeds} | all runs | seed-to-seed change on a fold: mean / largest |",
             "|---|" + "---|" * (len(works) + 2)]
    for name, table in values.items():
        change = table.max(axis=0) - table.min(axis=0)
        cells = " | ".join(_mean_std(seed) for seed in table)
        lines.append(f"| {name} | {cells} | {_mean_std(table.ravel())} | {change.mean():.3f} / {change.max():.3f} |")
    return "\n".join(lines)
