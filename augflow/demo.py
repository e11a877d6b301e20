"""``augflow demo``: the whole pipeline on the built-in brain-MRI data, end to end.

Generates the built-in scanner data at 32 px, splits it by subject, trains the ``quick`` recipe and writes a
balanced synthetic top-up of the under-represented scanners. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from augflow.config import load_recipe
from augflow.data.phantom import generate_demo_data
from augflow.data.splits import split_file
from augflow.data.store import read_info
from augflow.synthesize import balanced_counts, synthesize
from augflow.train.loop import train

DEMO_SIZE = 32


def run_demo(out_dir: str | Path, task: str = "scanner", seed: int = 0, echo: Callable = print,
             progress: bool = True) -> dict:
    """Run generate → split → train → synthesize in ``out_dir``; return the paths written, by name."""
    out_dir = Path(out_dir)
    echo(f"[1/4] generating the built-in {task} data at {DEMO_SIZE} px (MNI152 template, seed {seed})")
    full = generate_demo_data(task, out_dir / f"{task}.h5", size=DEMO_SIZE, seed=seed, progress=progress)
    echo("[2/4] splitting by subject (train 70% / val 10% / test 20%)")
    parts = split_file(full, out_dir / "data", seed=seed)
    for name, path in parts.items():
        info = read_info(path, check_values=False)
        counts = ", ".join(f"{k} {v}" for k, v in info.class_counts().items())
        echo(f"  {name:5s} {len(info):5d} images, {len(set(info.subjects)):4d} subjects: {counts}")

    echo("[3/4] training MAGIC-Flow with the quick recipe")
    run = out_dir / "runs" / "quick"
    result = train(parts["train"], run, load_recipe("quick"), val=parts["val"], seed=seed,
                   resume=(run / "checkpoint.pt").exists(), command="augflow demo", progress=progress)
    echo(f"  {result.steps} steps, best validation {result.best_val_loss:.3f} {result.loss_name} "
         f"-> {result.model_path}")

    echo("[4/4] synthesizing a balanced top-up of the under-represented classes")
    counts = balanced_counts(result.model_path)
    synthetic = synthesize(result.model_path, out_dir / "synthetic.h5", counts, seed=seed, progress=progress)
    echo(f"  wrote {sum(synthetic.counts.values())} images to {synthetic.out}: "
         + ", ".join(f"{k} {v}" for k, v in synthetic.counts.items() if v))
    return {"data": full, **parts, "run": run, "synthetic": synthetic.out}
