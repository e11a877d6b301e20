"""One small end-to-end run: `augflow demo` generates, splits, trains the quick recipe and tops up classes."""

import json

import numpy as np
from click.testing import CliRunner

from augflow.cli import cli
from augflow.data.store import read_images, read_info


def test_demo_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out-dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    train = read_info(tmp_path / "data" / "train.h5")
    synthetic = read_info(tmp_path / "synthetic.h5")
    assert synthetic.source == "synthetic" and synthetic.class_names == train.class_names
    # Real + synthetic is balanced at the size of the largest training class.
    real = np.bincount(train.labels, minlength=7)
    synth = np.bincount(synthetic.labels, minlength=7)
    assert np.all(real + synth == real.max()) and synth[real.argmax()] == 0
    images = read_images(tmp_path / "synthetic.h5", np.arange(0, len(synthetic), 50))
    assert images.shape[1:] == (1, 32, 32) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    # Training improved the validation likelihood from its first to its best epoch.
    records = [json.loads(line) for line in (tmp_path / "runs" / "quick" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and min(val) < val[0] and np.isfinite(val).all()
    assert "best validation" in result.output and "wrote 1473 images" in result.output
