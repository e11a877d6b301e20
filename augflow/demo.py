"""``augflow demo``: the whole pipeline on the built-in brain-MRI data, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from augflow.data.phantom import generate_demo_data
from augflow.data.splits import split_file
from augflow.data.store import read_info


def run_demo(out_dir: str | Path, task: str = "scanner", seed: int = 0, echo: Callable = print) -> dict:
    """Generate the built-in data, split it subject-wise and summarise every part.

    Returns:
        Paths of the files written, by name.
    """
    out_dir = Path(out_dir)
    echo(f"[1/2] generating the built-in {task} data (MNI152 template, seed {seed})")
    full = generate_demo_data(task, out_dir / f"{task}.h5", size=64, seed=seed)
    echo("[2/2] splitting by subject (train 70% / val 10% / test 20%)")
    parts = split_file(full, out_dir / "data", seed=seed)
    for name, path in parts.items():
        info = read_info(path, check_values=False)
        counts = ", ".join(f"{k} {v}" for k, v in info.class_counts().items())
        echo(f"  {name:5s} {len(info):5d} images, {len(set(info.subjects)):4d} subjects: {counts}")
    return {"data": full, **parts}
