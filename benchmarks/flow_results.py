"""Results of trained MAGIC-Flow runs on the built-in data: bits/dim, class-specificity, sample grids.

Writes reports/flow-results.md and, per run, reports/flow-samples-NAME.png and reports/flow-bpd-NAME.png.

    python benchmarks/flow_results.py --run runs/scanner:data/scanner --run runs/modality:data/modality

Each ``--run`` is ``RUN_FOLDER:DATA_FOLDER`` where the data folder holds the train/val/test.h5 that
``augflow split`` wrote. Class-specificity: a logistic regression on 16x16 thumbnails is
fitted on the real training images; its accuracy on real test images is the reference, its accuracy on synthetic
images (labelled with the class they were drawn for) says how class-specific the samples are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from augflow.data.store import read_images, read_info  # noqa: E402
from augflow.models import load_model  # noqa: E402
from augflow.train.loop import dataset_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"


def features(images: np.ndarray) -> np.ndarray:
    """16x16 thumbnails (local mean intensities): the tissue contrast that defines a class, not its noise.

    Not standardised per pixel: in skull-stripped MRI the background pixels are exactly 0 with ~0 variance, and
    standardising would turn the faint background of a sample into a huge feature value.
    """
    return F.adaptive_avg_pool2d(torch.from_numpy(images), 16).flatten(1).numpy()


@torch.inference_mode()
def draw(model, num_classes: int, per_class: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = [model.sample(labels[i:i + 64], temperature, generator).clamp(0, 1) for i in range(0, len(labels), 64)]
    return torch.cat(images).numpy(), labels.numpy()


def run_report(run: Path, data: Path, per_class: int, temperature: float, weights: str) -> tuple[str, dict]:
    name = run.name
    model, meta = load_model(run / "model.pt", with_meta=True)
    if weights == "final":  # the raw weights of the last step, from the resumable checkpoint
        model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    class_names = meta["class_names"]
    k = len(class_names)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["epoch"] + 1, r["val_loss"]) for r in records if "val_loss" in r]
    train_curve = [(r["step"], r["loss"]) for r in records]
    elapsed_min = records[-1]["elapsed_s"] / 60

    train_info, test_info = read_info(data / "train.h5"), read_info(data / "test.h5")
    train_x, test_x = read_images(data / "train.h5"), read_images(data / "test.h5")
    bpd_test = dataset_loss(model, data / "test.h5")
    bpd_val = dataset_loss(model, data / "val.h5")
    synth_x, synth_y = draw(model, k, per_class, temperature, seed=0)

    classifier = LogisticRegression(max_iter=3000)
    classifier.fit(features(train_x), train_info.labels)
    real_pred = classifier.predict(features(test_x))
    acc_real = balanced_accuracy_score(test_info.labels, real_pred)
    per_class_real = [(real_pred[test_info.labels == c] == c).mean() for c in range(k)]
    synth_pred = classifier.predict(features(synth_x))
    acc_synth = balanced_accuracy_score(synth_y, synth_pred)
    per_class_synth = [(synth_pred[synth_y == c] == c).mean() for c in range(k)]

    # Samples beside real test images, one row per class.
    shown = 5
    fig, axes = plt.subplots(k, 2 * shown, figsize=(2 * shown * 1.1, k * 1.15))
    for c in range(k):
        rows = np.flatnonzero(test_info.labels == c)
        _, first = np.unique(test_info.subjects[rows], return_index=True)  # one slice per subject
        real_rows = rows[np.sort(first)][:shown]
        for j in range(shown):
            real = test_x[real_rows[j]] if j < len(real_rows) else np.zeros_like(synth_x[0])
            for col, image in ((j, real), (shown + j, synth_x[c * per_class + j])):
                ax = axes[c, col]
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[c, 0].set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=8)
    axes[0, shown // 2].set_title("real (test)", fontsize=9)
    axes[0, shown + shown // 2].set_title(f"synthetic (T={temperature})", fontsize=9)
    fig.tight_layout(pad=0.2)
    samples_png = REPORTS / f"flow-samples-{name}.png"
    fig.savefig(samples_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(*zip(*train_curve, strict=True), lw=0.6, alpha=0.6, label="train (augmented)")
    steps_per_epoch = records[-1]["step"] / max(1, val[-1][0]) if val else 1
    ax.plot([e * steps_per_epoch for e, _ in val], [b for _, b in val], "o-", ms=3,
            label="validation (weights the run kept)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.set_ylim(min(b for _, b in val) - 0.3, min(b for _, b in val) + 2.0)
    ax.legend()
    fig.tight_layout()
    curve_png = REPORTS / f"flow-bpd-{name}.png"
    fig.savefig(curve_png, dpi=110)
    plt.close(fig)

    command = (run / "command.txt").read_text().strip()
    lines = [
        f"## {name}", "",
        f"Trained with `{command}`; evaluated: {'model.pt' if weights == 'model' else 'last-step weights'} "
        f"({records[-1]['step']} steps, {elapsed_min:.0f} min wall clock on this machine, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters).", "",
        "| bits/dim | value |", "| --- | --- |",
        f"| validation, evaluated weights | {bpd_val:.3f} |",
        f"| validation logged by the run, best epoch ({min(val, key=lambda v: v[1])[0]} of {val[-1][0]}) | "
        f"{min(b for _, b in val):.3f} |",
        f"| test (held-out subjects) | {bpd_test:.3f} |", "",
        f"Class-specificity (balanced accuracy of a logistic regression on 16x16 thumbnails fitted on real "
        f"training images; chance {1 / k:.2f}): real test images **{acc_real:.2f}**, synthetic images "
        f"({per_class} per class, T={temperature}) **{acc_synth:.2f}**.", "",
        "| class | " + " | ".join(class_names) + " |",
        "| --- |" + " --- |" * k,
        "| real test image recognised as its class | " + " | ".join(f"{a:.2f}" for a in per_class_real) + " |",
        "| synthetic recognised as its class | " + " | ".join(f"{a:.2f}" for a in per_class_synth) + " |", "",
        f"![samples]({samples_png.name})", "",
        f"![bits/dim]({curve_png.name})", "",
    ]
    numbers = {"name": name, "val": bpd_val, "val_logged_best": min(b for _, b in val), "test": bpd_test,
               "acc_real": acc_real, "acc_synth": acc_synth, "minutes": elapsed_min}
    return "\n".join(lines), numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="RUN_FOLDER:DATA_FOLDER")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--note-file", type=Path, default=None, help="a paragraph added under the header")
    parser.add_argument("--weights", choices=["model", "final"], default="model",
                        help="model.pt (best validation epoch), or the raw weights of the last step (checkpoint.pt)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sections = []
    for spec in args.run:
        run, data = spec.split(":")
        text, numbers = run_report(Path(run), Path(data), args.per_class, args.temperature, args.weights)
        print(json.dumps(numbers))
        sections.append(text)
    header = [
        "# MAGIC-Flow on the built-in data", "",
        "Made by `python benchmarks/flow_results.py " + " ".join(sys.argv[1:]) + "` from runs trained as stated "
        "in each section (data: `augflow demo-data --task T --out T.h5 --size 64 && augflow split T.h5 --out-dir T`, "
        "seed 0). Bits/dim use uniform dequantisation with 256 levels, as Glow (MNIST 1.05, CIFAR-10 3.35).", "",
        *([args.note_file.read_text().strip(), ""] if args.note_file else []),
    ]
    (REPORTS / "flow-results.md").write_text("\n".join(header + sections))


if __name__ == "__main__":
    main()
