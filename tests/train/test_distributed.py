"""`torchrun` with two CPU processes (Gloo) trains the same model as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ONE_STEP, TINY, make_dataset

from augflow.train.loop import train
from augflow.train.recipe import load_recipe

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_two_processes_match_one(tmp_path):
    data = make_dataset(tmp_path / "train.h5", n_subjects=16, slices=2)  # 32 images: 4 full batches of 8
    val = make_dataset(tmp_path / "val.h5", n_subjects=3, slices=2, seed=1)
    overrides = [*TINY, "train.epochs=1"]
    single = train(data, tmp_path / "one", load_recipe(None, overrides), val=val, progress=False)
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "augflow", "train", "--data", str(data),
               "--val", str(val), "--out", str(tmp_path / "two"), "--device", "cpu", "--threads", "1"]
    for text in overrides:
        command += ["--set", text]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "two")) == single.steps == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_two_compiled_processes_match_one_eager(tmp_path):
    """``train.compile`` under torchrun: DDP's gradient hooks through the compiled objective give one eager process's
    losses (one flow step, so that each process compiles quickly)."""
    data = make_dataset(tmp_path / "train.h5", n_subjects=16, slices=2)
    val = make_dataset(tmp_path / "val.h5", n_subjects=3, slices=2, seed=1)
    overrides = [*ONE_STEP, "train.epochs=1"]
    train(data, tmp_path / "one", load_recipe(None, overrides), val=val, progress=False)
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "augflow", "train", "--data", str(data),
               "--val", str(val), "--out", str(tmp_path / "two"), "--device", "cpu", "--threads", "1"]
    for text in [*overrides, "train.compile=true"]:
        command += ["--set", text]
    run = subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert "torch.compile failed" not in run.stderr  # compiled, not fallen back to eager

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
