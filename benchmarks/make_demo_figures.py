"""Draw the demo datasets of :mod:`augflow.data.phantom`: one column per class, one row per subject.

Writes ``reports/demo-data-scanner.png`` and ``reports/demo-data-modality.png``. Each panel is the
slice nearest the centre of a subject, exactly as :func:`augflow.data.phantom.generate_demo_data`
writes it for the same seed and size, shown on a fixed [0, 1] grey scale.

Usage::

    python benchmarks/make_demo_figures.py                 # 64 px, seed 0, 3 subjects per class
    python benchmarks/make_demo_figures.py --size 128 --subjects 2 --out-dir /tmp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from augflow.data.phantom import TASKS, simulate_subject  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def draw(task: str, out: Path, size: int, seed: int, subjects: int) -> Path:
    """Draw one task's classes (columns) for the first ``subjects`` subjects (rows); save a PNG."""
    names = TASKS[task]
    fig, axes = plt.subplots(
        subjects, len(names), figsize=(1.9 * len(names), 2.05 * subjects + 0.5), squeeze=False
    )
    for c, name in enumerate(names):
        for j in range(subjects):
            images, offsets = simulate_subject(task, c, j, seed=seed, size=size)
            k = int(np.argmin(np.abs(offsets)))
            ax = axes[j, c]
            ax.imshow(images[k, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(name, fontsize=10)
            ax.set_xlabel(f"subject {j}, y{offsets[k]:+d} mm", fontsize=7)
    fig.suptitle(
        f"augflow demo data, task '{task}' ({size} px, seed {seed}; coronal, superior up, "
        f"neurological); python benchmarks/make_demo_figures.py --size {size} --seed {seed}",
        fontsize=8,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument(
        "--subjects", type=int, default=3, help="rows: subjects per class (default 3)"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports", help="default: reports/")
    args = parser.parse_args(argv)
    for task in TASKS:
        path = draw(
            task, args.out_dir / f"demo-data-{task}.png", args.size, args.seed, args.subjects
        )
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
