"""One small end-to-end run: `augflow demo` generates, splits, trains the quick recipe, tops up classes and audits."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from augflow.cli import cli
from augflow.data.store import read_images, read_info
from augflow.demo import run_demo


def test_cli_passes_its_options_to_the_demo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("augflow.demo.run_demo", lambda out_dir, **kwargs: calls.append((out_dir, kwargs)))
    result = CliRunner().invoke(cli, ["demo", "--out-dir", str(tmp_path), "--seeds", "2", "--epochs", "4"])
    assert result.exit_code == 0, result.output
    (out_dir, kwargs), = calls
    assert out_dir == tmp_path and kwargs["audit_seeds"] == 2 and kwargs["audit_epochs"] == 4
    assert kwargs["task"] == "scanner" and kwargs["seed"] == 0


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    # The demo's pipeline on half the built-in data, with a shorter generator training (3 epochs) and a lighter
    # audit (one seed of 2 epochs per CNN, a 1-epoch domain encoder) to keep the suite fast; `augflow demo` itself
    # uses all the data, trains 20 epochs and audits with 3 seeds of 2 epochs and a 2-epoch encoder.
    lines = []
    run_demo(tmp_path, echo=lines.append, progress=False, audit_seeds=1, audit_epochs=2, encoder_epochs=1,
             bootstraps=10, train_epochs=3, scale=0.5)
    output = "\n".join(lines)
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
    assert "best validation" in output and "wrote 750 images" in output

    # The audit: report files, stable keys, sane values.
    audit = tmp_path / "audit"
    assert f"report: {audit / 'report.html'}" in output
    metrics = json.loads((audit / "metrics.json").read_text())
    assert {"inputs", "privacy", "feature_space", "fidelity", "diversity", "memorization", "membership_inference",
            "likelihood_classifier", "downstream", "gate"} <= set(metrics)
    overall = metrics["fidelity"]["overall"]
    assert overall["synthetic"]["fid"] > 0 and overall["real"]["fid"] > 0
    assert 0 <= overall["synthetic"]["precision"] <= 1 and 0 <= overall["synthetic"]["coverage"] <= 1
    assert metrics["diversity"]["settings"] == {"method": "ms-ssim", "win_size": 3, "scales": 3,
                                                "weights": metrics["diversity"]["settings"]["weights"]}
    assert 0 < metrics["diversity"]["synthetic"]["intra"] < 1
    assert metrics["memorization"]["exact_copies"] == 0 and 0 <= metrics["memorization"]["copy_fraction"] <= 1
    mia = metrics["membership_inference"]
    assert mia["n_members"] == len(train) and 0.3 < mia["auc"] < 0.7  # 3 epochs of a tiny flow: little leakage
    assert metrics["privacy"]["differentially_private"] is False
    real_only = metrics["downstream"]["protocols"]["real"]["summary"]["balanced_accuracy"]["mean"]
    assert real_only > 1 / 7  # above chance
    assert isinstance(metrics["gate"]["passed"], bool)
    assert metrics["likelihood_classifier"]["calibration"].startswith("fitted on the 66 images of --val")
    html = (audit / "report.html").read_text()
    assert "Data card" in html and "not differentially private" in html and "data:image/png;base64," in html
    # The verdict first, with the usefulness word; no path of this machine (the demo's files are absolute here).
    word = metrics["verdict"]["usefulness"]["word"]
    assert html.index('<div class="verdict"') < html.index("<table>") and f">{word}</span>" in html
    for name in ("report.html", "report.md"):
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", (audit / name).read_text())
        assert str(tmp_path) not in text, name
