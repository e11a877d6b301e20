"""augflow synthesize: class resolution, balancing, provenance, determinism and atomic output."""

import numpy as np
import pytest
from conftest import TINY, make_dataset

from augflow.data.store import read_images, read_info, sha256_file
from augflow.errors import ConfigError
from augflow.synthesize import balance_counts, synthesize
from augflow.train.loop import train
from augflow.train.recipe import load_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    # Imbalanced: 3 classes with 6, 3, 3 subjects.
    data = make_dataset(tmp / "d.h5", n_subjects=12, slices=2, num_classes=4)
    result = train(data, tmp / "run", load_recipe(None, [*TINY, "train.max_steps=2"]), progress=False)
    return result.run_dir


def test_class_by_name_case_insensitive(run, tmp_path):
    out = tmp_path / "s.h5"
    result = synthesize(run, out, {"CLASS1": 5}, seed=1, batch_size=2, progress=False)
    info = read_info(out)
    assert result.counts["class1"] == 5 and len(info) == 5 and info.source == "synthetic"
    assert set(info.labels) == {1} and all(s.startswith("synthetic-class1-") for s in info.subjects)
    prov = info.provenance
    assert prov["model_sha256"] == sha256_file(run / "model.pt")
    assert prov["seed"] == 1 and prov["temperature"] == 0.8 and prov["counts"]["class1"] == 5
    assert prov["rejected_nonfinite"] == 0 and prov["recipe"]["train"]["batch_size"] == 8
    images = read_images(out)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_same_seed_same_images(run, tmp_path):
    a = synthesize(run, tmp_path / "a.h5", {"class0": 3, "class2": 2}, seed=7, progress=False).out
    b = synthesize(run, tmp_path / "b.h5", {"class0": 3, "class2": 2}, seed=7, progress=False).out
    c = synthesize(run, tmp_path / "c.h5", {"class0": 3, "class2": 2}, seed=8, progress=False).out
    assert np.array_equal(read_images(a), read_images(b))
    assert not np.array_equal(read_images(a), read_images(c))


def test_cli_per_class_equals_the_api(run, tmp_path):
    from click.testing import CliRunner

    from augflow.cli import cli

    result = CliRunner().invoke(cli, ["synthesize", "--model", str(run), "--per-class", "2", "--seed", "3", "--out",
                                      str(tmp_path / "cli.h5")])
    assert result.exit_code == 0, result.output
    api = synthesize(run, tmp_path / "api.h5", {f"class{k}": 2 for k in range(4)}, seed=3, progress=False).out
    assert list(np.bincount(read_info(tmp_path / "cli.h5").labels)) == [2, 2, 2, 2]
    assert np.array_equal(read_images(tmp_path / "cli.h5"), read_images(api))


def test_unknown_class_lists_valid_names_and_writes_nothing(run, tmp_path):
    with pytest.raises(ConfigError, match="unknown class 'Prism'; valid classes: class0, class1, class2, class3"):
        synthesize(run, tmp_path / "x.h5", {"Prism": 3}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_balance_counts():
    assert balance_counts({"a": 10, "b": 4, "c": 7}) == {"a": 0, "b": 6, "c": 3}
    assert balance_counts({"a": 10, "b": 4, "c": 7}, target=8) == {"a": 0, "b": 4, "c": 1}
    with pytest.raises(ConfigError):
        balance_counts({"a": 1, "b": 2}, target=0)


def test_non_finite_samples_are_redrawn_and_counted(run, tmp_path, monkeypatch):
    import torch

    from augflow.flows import MagicFlow

    original = MagicFlow.sample
    calls = []

    def sometimes_nan(self, y, temperature=1.0, generator=None):
        x = original(self, y, temperature, generator)
        calls.append(len(y))
        if len(calls) == 1:
            x[0] = float("nan")  # the first draw of the first batch is broken
        return x

    monkeypatch.setattr(MagicFlow, "sample", sometimes_nan)
    out = tmp_path / "s.h5"
    result = synthesize(run, out, {"class0": 4}, progress=False)
    assert result.rejected_nonfinite == 1 and calls == [4, 1]
    assert read_info(out).provenance["rejected_nonfinite"] == 1
    assert torch.isfinite(torch.from_numpy(read_images(out))).all()
