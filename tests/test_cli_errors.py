"""Never lose a file, never show a traceback (issue 19): every bad input through the CLI.

Each case of :data:`CASES` runs one command against a small shared folder (data, a tiny trained run, broken and
malicious model files) and checks: the exit code, one ``Error:`` line naming the file, option or value, no
traceback, and the folder unchanged (no partial output, no temporary file, no input overwritten). Two tests kill a
``synthesize`` mid-write (SIGKILL, SIGTERM) in a subprocess.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_dataset

from augflow.cli import cli
from augflow.data.splits import split_file
from augflow.data.store import DatasetWriter, read_info
from augflow.train.loop import train
from augflow.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


class _Malicious:
    """Unpickling this runs a shell command: augflow must refuse the file, never run it."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"augflow-pwned-{os.getpid()}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared folder: ``d.h5`` (8 px, 3 classes), its split, an empty file, 16 px files, a trained run, broken
    model files, a half-started run, a folder of notes and a NIfTI manifest."""
    w = tmp_path_factory.mktemp("world")
    data = make_dataset(w / "d.h5", n_subjects=12, slices=2)
    split_file(data, w / "parts", val=0.2, test=0.3)
    with DatasetWriter(w / "empty.h5", (1, 8, 8), ["class0", "class1", "class2"]):
        pass
    big = make_dataset(w / "big.h5", n_subjects=12, slices=2, shape=(1, 16, 16))
    split_file(big, w / "big", val=0.2, test=0.3)
    train(data, w / "run", load_recipe(None, [*TINY, "train.max_steps=1"]), progress=False)
    good = (w / "run" / "model.pt").read_bytes()
    (w / "models").mkdir()
    (w / "models" / "truncated.pt").write_bytes(good[: len(good) // 2])
    (w / "models" / "empty.pt").write_bytes(b"")
    (w / "models" / "garbage.pt").write_bytes(b"not a model\n" * 20)
    torch.save({"config": {}, "state_dict": {}, "x": _Malicious()}, w / "models" / "malicious.pt")
    payload = torch.load(w / "run" / "model.pt", weights_only=True)
    del payload["state_dict"]["app_mask"]
    torch.save(payload, w / "models" / "no-mask.pt")
    for name in ("truncated", "malicious"):  # run folders whose model or checkpoint is broken
        (w / f"bad-{name}").mkdir()
        for file in ("model.pt", "checkpoint.pt", "run.json"):
            source = w / "models" / f"{name}.pt" if file != "run.json" else w / "run" / "run.json"
            (w / f"bad-{name}" / file).write_bytes(source.read_bytes())
    (w / "half").mkdir()  # a run killed before its first checkpoint
    (w / "half" / "run.json").write_bytes((w / "run" / "run.json").read_bytes())
    (w / "half" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (w / "notes").mkdir()
    (w / "notes" / "notes.txt").write_text("mine")
    (w / "vols").mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((12, 14, 10)).astype(np.float32) + 1, np.eye(4)),
                 w / "vols" / f"s{i}.nii.gz")
    (w / "vols" / "scans.csv").write_text("path,label\ns0.nii.gz,T1\ns1.nii.gz,T2\n")
    return w


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file (by content) and folder under ``folder``, hidden temporary files included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _train(*args):
    return ["train", "--data", "{w}/d.h5", "--out", "{w}/new-run", "--device", "cpu", *args]


TINY_SETS = [arg for setting in TINY for arg in ("--set", setting)]
SYN = ["synthesize", "--model", "{w}/run", "--class", "class0", "--n", "2", "--device", "cpu"]
AUDIT = ["audit", "--real", "{w}/parts/test.h5", "--train", "{w}/parts/train.h5", "--synthetic", "{w}/parts/val.h5"]

# (id, arguments ({w}: the shared folder), exit code, what the message must name)
CASES = [
    # 1. Overwrites: never an input, an existing output only with --overwrite.
    ("synthesize over its own model", [*SYN, "--out", "{w}/run/model.pt", "--overwrite"], 1,
     ["--out", "model.pt", "also an input"]),
    ("synthesize over a file", [*SYN, "--out", "{w}/d.h5"], 1, ["--out", "d.h5", "already exists", "--overwrite"]),
    ("prepare over its own volume", ["prepare", "--manifest", "{w}/vols/scans.csv", "--out", "{w}/vols/s0.nii.gz",
                                     "--size", "16", "--slices-per-volume", "3", "--overwrite"], 1,
     ["s0.nii.gz", "also an input"]),
    ("prepare over a file", ["prepare", "--manifest", "{w}/vols/scans.csv", "--out", "{w}/d.h5"], 1,
     ["d.h5", "already exists"]),
    ("demo-data over a file", ["demo-data", "--out", "{w}/d.h5", "--size", "16", "--scale", "0.01"], 1,
     ["--out", "d.h5", "already exists", "--overwrite"]),
    ("split over existing parts", ["split", "{w}/d.h5", "--out-dir", "{w}/parts"], 1,
     ["--out-dir", "train.h5", "already exists"]),
    ("split over its own input", ["split", "{w}/parts/train.h5", "--out-dir", "{w}/parts", "--overwrite"], 1,
     ["train.h5", "also an input"]),
    ("classify --out over its data", ["classify", "--model", "{w}/run", "--data", "{w}/d.h5", "--out", "{w}/d.h5",
                                      "--overwrite"], 1, ["--out", "d.h5", "also an input"]),
    ("explain over a file", ["explain", "--model", "{w}/run", "--data", "{w}/d.h5", "--index", "0", "--out",
                             "{w}/vols/scans.csv"], 1, ["--out", "scans.csv", "already exists"]),
    ("audit into a non-empty folder", [*AUDIT, "--out", "{w}/notes"], 1, ["--out", "notes", "not empty"]),
    # 2. Run folders: a new run never mixes into another run or into other files.
    ("train into a half-started run", [*_train("--set", "train.lr=1e-3"), "--out", "{w}/half"], 1,
     ["--out", "half", "already holds a run", "--resume", "--overwrite"]),
    ("train into a folder of notes", [*_train(), "--out", "{w}/notes"], 1, ["notes", "not empty", "no augflow run"]),
    ("resume with other data", [*_train("--resume"), "--data", "{w}/parts/train.h5", "--out", "{w}/half"], 1,
     ["--resume", "data differ", "data_sha256", "(run) vs"]),
    ("resume with another recipe", [*_train("--resume", *TINY_SETS, "--set", "train.lr=1e-3"), "--out", "{w}/half"], 1,
     ["train.lr 0.0004 (run) vs 0.001 (now)"]),
    ("resume and overwrite", [*_train("--resume", "--overwrite"), "--out", "{w}/half"], 1, ["give one of them"]),
    ("resume without a run", _train("--resume"), 1, ["--resume", "no run in", "new-run"]),
    # 3. Broken, foreign and malicious model and checkpoint files.
    *[(f"{command} a {kind} model", [*args, "{w}/models/" + kind + ".pt"], 1, [f"{kind}.pt", reason])
      for kind, reason in (("truncated", "truncated"), ("empty", "empty"), ("garbage", "tensors and plain data"),
                           ("malicious", "tensors and plain data"), ("no-mask", "app_mask"))
      for command, args in (("info", ["info"]), ("synthesize", [*SYN[:1], *SYN[3:], "--out", "{w}/s.h5", "--model"]),
                            ("classify", ["classify", "--data", "{w}/d.h5", "--model"]))],
    ("resume a truncated checkpoint", [*_train("--resume"), "--out", "{w}/bad-truncated"], 1,
     ["checkpoint.pt", "not a readable augflow checkpoint", "truncated"]),
    ("resume a malicious checkpoint", [*_train("--resume"), "--out", "{w}/bad-malicious"], 1,
     ["checkpoint.pt", "tensors and plain data"]),
    # 4. Empty datasets.
    ("train on an empty file", [*_train(), "--data", "{w}/empty.h5"], 1, ["--data", "empty.h5", "no images"]),
    ("train with an empty --val", _train("--val", "{w}/empty.h5"), 1, ["--val", "empty.h5", "no images"]),
    ("split an empty file", ["split", "{w}/empty.h5", "--out-dir", "{w}/new-parts"], 1, ["empty.h5", "no images"]),
    ("classify an empty file", ["classify", "--model", "{w}/run", "--data", "{w}/empty.h5"], 1,
     ["--data", "empty.h5", "no images"]),
    # 5. Unwritable places fail before the work.
    ("synthesize into /proc", [*SYN, "--out", "/proc/augflow/s.h5"], 1, ["/proc/augflow"]),
    ("audit into /proc", [*AUDIT, "--out", "/proc/augflow"], 1, ["/proc/augflow"]),
    # 6. Recipe values out of range, named with the allowed values, before the run folder exists.
    *[(f"--set {setting}", _train("--set", setting), 1, [setting.split("=")[0], allowed, repr_value])
      for setting, allowed, repr_value in (
          ("train.checkpoint_every=0", "an integer >= 1", "0"), ("train.log_every=0", "an integer >= 1", "0"),
          ("train.batch_size=0", "an integer >= 1", "0"), ("train.lr=-1", "a number > 0", "-1"),
          ("train.lr=abc", "a number > 0", "'abc'"), ("train.epochs=0", "an integer >= 1", "0"),
          ("train.val_fraction=2", "in [0, 1)", "2"))],
    # 7. Messages that named the wrong thing.
    ("synthesize --n 0", [*SYN[:-4], "--n", "0", "--out", "{w}/s.h5"], 2, ["--n", "0", "x>=1"]),
    ("info of a folder", ["info", "{w}/notes"], 1, ["info", "notes", "no trained model"]),
    ("info /dev/null", ["info", "/dev/null"], 1, ["/dev/null", "not a regular file"]),
    ("audit with a model of another size", [*[a.replace("parts", "big") for a in AUDIT], "--model", "{w}/run",
                                            "--out", "{w}/audit"], 1,
     ["--model", "(1, 8, 8)", "(1, 16, 16)"]),
    # 8. --init-from and privacy.trainable (issue 18): refused before the run folder exists.
    ("train --init-from a model of another size", [*_train(*TINY_SETS, "--init-from", "{w}/run"), "--data",
                                                   "{w}/big.h5"], 1,
     ["--init-from", "run", "(1, 8, 8)", "big.h5", "(1, 16, 16)", "must match"]),
    ("train --init-from another architecture", _train("--init-from", "{w}/run"), 1,
     ["--init-from", "architecture differs", "model.hidden_channels", "(init model)", "(recipe)"]),
    ("train --dp --init-from undeclared", _train(*TINY_SETS, "--dp", "--epsilon", "8", "--init-from", "{w}/run"), 1,
     ["--init-from", "under --dp", "--init-from-public"]),
    ("train --dp --init-from a model of this data", _train(*TINY_SETS, "--dp", "--epsilon", "8", "--init-from",
                                                           "{w}/run", "--init-from-public"), 1,
     ["--init-from", "trained on a file of this run", "not public"]),
    ("train --init-from-public alone", _train("--init-from-public"), 1, ["--init-from-public", "no model is given"]),
    ("train --init-from nothing", _train("--init-from", "{w}/no-such-run"), 2, ["--init-from", "no-such-run"]),
    ("--set privacy.trainable=bogus", _train("--dp", "--epsilon", "8", "--set", "privacy.trainable=bogus"), 1,
     ["privacy.trainable", "'all', 'conditioning', 'top'", "'bogus'"]),
    ("privacy.trainable without --dp", _train("--set", "privacy.trainable=top"), 1,
     ["privacy.trainable = 'top'", "DP training only", "--dp"]),
    ("privacy.trainable under --dp without --init-from", _train(*TINY_SETS, "--dp", "--epsilon", "8", "--set",
                                                                  "privacy.trainable=conditioning"), 1,
     ["privacy.trainable = 'conditioning'", "--init-from MODEL --init-from-public"]),
]


@pytest.mark.parametrize(("args", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clean_line_and_changes_nothing(world, args, code, needles):
    before = _snapshot(world)
    result = CliRunner().invoke(cli, [a.replace("{w}", str(world)) for a in args])
    output = result.output.replace(str(world) + "/", "")
    assert result.exit_code == code, output
    assert "Traceback" not in output and isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    lines = output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and (code == 2 or len(lines) == 1), output
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    assert _snapshot(world) == before
    assert not MARKER.exists()  # the malicious pickle never ran


def test_debug_shows_the_traceback(world):
    args = ["info", str(world / "models" / "empty.pt")]
    for extra, env in (([], {"AUGFLOW_DEBUG": "1"}), (["--debug"], {})):
        result = CliRunner(env=env).invoke(cli, [*extra, *args])
        assert result.exit_code == 1 and "empty" in str(result.exception)
        assert type(result.exception).__name__ == "DataError" and result.exc_info[2] is not None
    quiet = CliRunner().invoke(cli, args)
    assert isinstance(quiet.exception, SystemExit) and quiet.output.startswith("Error: ")


def _start_synthesis(world: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "augflow", "synthesize", "--model", str(world / "run"), "--class",
                             "class0", "--n", "10000000", "--batch-size", "256", "--out", str(out), "--device", "cpu",
                             "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def _wait_for_temporary(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 60
    while not _temporaries(out) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert _temporaries(out), process.stderr.read().decode() if process.poll() is not None else "no temporary file"
    time.sleep(0.5)  # well inside the writing


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_killed_synthesis_leaves_no_output_and_at_most_a_temporary_file_the_next_run_removes(tmp_path, world,
                                                                                                   sig):
    out = tmp_path / "s.h5"
    process = _start_synthesis(world, out)
    _wait_for_temporary(process, out)
    process.send_signal(sig)
    stderr = process.communicate(timeout=60)[1].decode()
    assert not out.exists()
    if sig == signal.SIGTERM:  # unwinds like Ctrl-C: the temporary file is removed on the way out
        assert _temporaries(out) == [] and "Traceback" not in stderr and process.returncode != 0
        return
    assert len(_temporaries(out)) == 1
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(world / "run"), "--class", "class0", "--n", "3",
                                      "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert _temporaries(out) == [] and len(read_info(out)) == 3
    again = CliRunner().invoke(cli, ["synthesize", "--model", str(world / "run"), "--class", "class1", "--n", "2",
                                     "--out", str(out), "--device", "cpu", "--overwrite"])
    assert again.exit_code == 0 and read_info(out).class_counts()["class1"] == 2


def test_a_training_killed_with_kill_9_resumes_exactly_and_leaves_no_temporary_file(tmp_path):
    data = make_dataset(tmp_path / "d.h5", n_subjects=12, slices=3)
    recipe = [*TINY, "train.epochs=500"]  # far more steps than the test waits for
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sets = [arg for setting in recipe for arg in ("--set", setting)]
    process = subprocess.Popen([sys.executable, "-m", "augflow", "train", "--data", str(data), "--out", str(run),
                                "--device", "cpu", "--threads", "1", *sets], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)

    def logged() -> int:
        return len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0

    deadline = time.monotonic() + 60
    # Past the first checkpoint (step 3) with steps logged after it, which the resumed run must drop.
    while logged() < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.kill()
    stderr = process.communicate(timeout=60)[1].decode()
    assert (run / "checkpoint.pt").exists(), stderr
    assert len(list(run.glob(".*.tmp"))) <= 1
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    stop = f"train.max_steps={killed_at + 4}"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(run), "--device", "cpu", "--resume",
                                      *sets, "--set", stop])
    assert result.exit_code == 0, result.output
    full = train(data, tmp_path / "full", load_recipe(None, [*recipe, stop]), progress=False)
    assert list(run.glob(".*.tmp")) == []

    records = {name: [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
               for name, folder in (("resumed", run), ("full", tmp_path / "full"))}
    assert [r["step"] for r in records["resumed"]] == list(range(1, full.steps + 1))  # no step twice
    assert [r["loss"] for r in records["resumed"]] == pytest.approx([r["loss"] for r in records["full"]], rel=1e-6,
                                                                    abs=1e-7)
