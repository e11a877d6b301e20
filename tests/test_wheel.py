"""The wheel: it holds every module and the shipped recipes, and an installed (non-editable) copy trains with
``augflow train --recipe quick`` from outside the source tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_installed_wheel_ships_the_recipes_and_trains(tmp_path):
    # Build from a copy, so the build leaves nothing in the source tree.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "augflow", source / "augflow", ignore=ignore)
    shutil.copytree(ROOT / "recipes", source / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         source)
    (wheel,) = (tmp_path / "dist").glob("augflow-*.whl")
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", site, wheel)

    installed = {p.relative_to(site).as_posix() for p in (site / "augflow").rglob("*") if p.suffix in (".py", ".toml")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "augflow").rglob("*.py")}
    expected |= {f"augflow/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.toml")}
    assert installed == expected  # a subpackage missing from pyproject's list would be missing here

    work = tmp_path / "work"  # outside the source tree: only the installed copy can be imported
    work.mkdir()
    data = make_dataset(work / "d.h5", n_subjects=8, slices=2, shape=(1, 32, 32))
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = _run(sys.executable, "-c", "import augflow.train.recipe as r; print(r.__file__); print(r.recipes_dir())",
                 cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    result = _run(site / "bin" / "augflow", "train", "--data", data, "--recipe", "quick", "--out", work / "run",
                  "--set", "train.max_steps=2", "--device", "cpu", "--threads", "1", cwd=work, env=env)
    assert "trained 2 steps" in result.stdout and (work / "run" / "model.pt").is_file()
