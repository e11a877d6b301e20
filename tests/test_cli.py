"""The click layer: help with examples everywhere, clean errors, and the commands' output."""

import json

import pytest
from click.testing import CliRunner
from conftest import make_dataset

from augflow.cli import cli

COMMANDS = sorted(cli.commands)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and f"augflow {command}" in result.output


def test_info_json_and_text(tmp_path):
    path = make_dataset(tmp_path / "d.h5")
    result = invoke("info", path, "--json")
    summary = json.loads(result.output)
    assert summary["num_images"] == 36 and summary["class_counts"] == {"class0": 12, "class1": 12, "class2": 12}
    assert summary["schema_version"] == 1 and summary["provenance"] == {"test": True}
    text = invoke("info", path).output
    assert "36 real images" in text and "class1" in text


def test_library_errors_become_clean_cli_errors(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("not hdf5")
    result = CliRunner().invoke(cli, ["info", str(bogus)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "not a readable HDF5" in result.output
    assert "Traceback" not in result.output


def test_split_command(tmp_path):
    path = make_dataset(tmp_path / "d.h5", n_subjects=20)
    result = invoke("split", path, "--out-dir", tmp_path / "parts", "--val", 0.2, "--test", 0.2)
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["test.h5", "train.h5", "val.h5"]
    bad = CliRunner().invoke(cli, ["split", str(path), "--out-dir", str(tmp_path / "x"), "--val", "0.9"])
    assert bad.exit_code == 1 and "--val + --test must be below 1" in bad.output


def test_synthesize_argument_rules(tmp_path):
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 2 and "give one of --class NAME --n N, --balance" in result.output
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "s.h5"),
                                      "--balance", "--per-class", "3"])
    assert result.exit_code == 2 and "--per-class N" in result.output
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "s.h5"),
                                      "--per-class", "0"])
    assert result.exit_code == 2 and "--per-class" in result.output and "range" in result.output
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "s.h5"),
                                      "--class", "a", "--n", "3"])
    assert result.exit_code == 1 and "no trained model" in result.output


def test_prepare_and_demo_data_commands(tmp_path):
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        volume = rng.random((12, 14, 10)).astype(np.float32) + 1
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / f"{name}.nii.gz")
    (tmp_path / "scans.csv").write_text("path,label\na.nii.gz,T1\nb.nii.gz,T2\nmissing.nii.gz,T1\n")
    out = tmp_path / "scans.h5"
    args = ["prepare", "--manifest", tmp_path / "scans.csv", "--out", out, "--size", 16, "--slices-per-volume", 3]
    bad = CliRunner().invoke(cli, [str(a) for a in args])
    assert bad.exit_code == 1 and "line 4" in bad.output and "file not found" in bad.output and not out.exists()
    good = invoke(*args, "--skip-bad")
    assert good.exit_code == 0 and "skipped row 4" in good.output and "6 real images" in good.output
    result = invoke("demo-data", "--task", "modality", "--out", tmp_path / "m.h5", "--size", 16, "--scale", 0.01)
    assert result.exit_code == 0 and "FDG-PET" in result.output
