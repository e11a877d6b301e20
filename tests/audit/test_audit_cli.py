"""``augflow audit`` end to end in tmp_path: report files with stable keys, the data card, the gate's exit code."""

import json

import numpy as np
import pytest
from audit_helpers import blobs, tiny_flow, write_blobs
from click.testing import CliRunner

from augflow.cli import cli

TOP_LEVEL = {"schema", "command", "inputs", "privacy", "feature_space", "fidelity", "diversity", "memorization",
             "membership_inference", "likelihood_classifier", "downstream", "settings", "gate", "timings_s",
             "recognition"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_audit_help_has_an_example():
    result = CliRunner().invoke(cli, ["audit", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--gate" in result.output


@pytest.mark.parametrize("command, option, value", [("audit", "--seeds", "0"), ("audit", "--epochs", "0"),
                                                     ("audit", "--bootstraps", "-1"), ("demo", "--seeds", "0"),
                                                     ("demo", "--epochs", "-5")])
def test_counts_and_budgets_out_of_range_are_refused_before_any_work(tmp_path, command, option, value):
    data = write_blobs(tmp_path / "d.h5", [4, 4, 4], seed=0, prefix="d")
    files = ["--real", str(data), "--train", str(data), "--synthetic", str(data)] if command == "audit" else []
    result = CliRunner().invoke(cli, [command, *files, "--out" if command == "audit" else "--out-dir",
                                      str(tmp_path / "out"), option, value])
    assert result.exit_code == 2 and option in result.output and "range" in result.output
    assert not (tmp_path / "out").exists()


def test_audit_end_to_end_and_gate(tmp_path):
    real = write_blobs(tmp_path / "test.h5", [8, 8, 8], seed=1, prefix="test")
    train = write_blobs(tmp_path / "train.h5", [16, 10, 6], seed=0, prefix="train")
    synthetic = write_blobs(tmp_path / "synth.h5", [0, 6, 10], seed=2, prefix="synthetic", source="synthetic")
    model = tiny_flow(tmp_path / "model.pt", [16, 10, 6])
    common = ["--real", str(real), "--train", str(train), "--model", str(model), "--cache-dir", str(tmp_path / "c"),
              "--encoder-epochs", "1", "--bootstraps", "10", "--threads", "1"]
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["audit", *common, "--synthetic", str(synthetic), "--out", str(out), "--seeds",
                                      "1", "--epochs", "1", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert TOP_LEVEL <= set(metrics) and metrics["schema"] == "augflow-audit/1"
    assert json.loads(result.output[result.output.index("{"):])["gate"] == metrics["gate"]
    fo = metrics["fidelity"]["overall"]
    assert fo["synthetic"]["fid"] >= 0 and fo["synthetic"]["fid"] == \
        pytest.approx(fo["synthetic"]["fid_from_features"], rel=1e-3)
    assert set(metrics["fidelity"]["per_class"]) == {"a", "b", "c"}
    assert 0 <= metrics["memorization"]["copy_fraction"] <= 1 and metrics["memorization"]["exact_copies"] == 0
    assert 0 <= metrics["membership_inference"]["auc"] <= 1
    assert metrics["privacy"]["differentially_private"] is False
    assert list(metrics["downstream"]["protocols"]) == ["real", "real+oversampled", "real+synthetic", "synthetic"]
    assert set(metrics["downstream"]["comparisons"]) == {"real+synthetic vs real+oversampled", "real+synthetic vs real"}
    assert 0 <= metrics["likelihood_classifier"]["accuracy"] <= 1
    rec = metrics["recognition"]
    assert rec["synthetic"]["a"] is None and 0 <= rec["synthetic"]["c"] <= 1 and 0 <= rec["real_mean"] <= 1
    assert metrics["inputs"]["synthetic"]["provenance"]["generator"] == "test"
    html = (out / "report.html").read_text()
    assert "Data card" in html and "data:image/png;base64," in html and "not differentially private" in html
    assert "Intended uses" in (out / "report.md").read_text() and (out / "figures" / "closest_pairs.png").is_file()
    assert list((tmp_path / "c").glob("*.pt"))  # the encoder was cached

    # Planted exact copies of training images: the gate fails and names the failed thresholds.
    x, y = blobs([16, 10, 6], seed=0)
    copies = write_blobs(tmp_path / "copies.h5", None, seed=0, prefix="synthetic", source="synthetic",
                         images=x[::2], labels=y[::2])
    # ... and a model with a DP ledger: its epsilon is reported, and its delta used for the empirical bound.
    dp_model = tiny_flow(tmp_path / "dp.pt", [16, 10, 6], privacy={"dp": True, "epsilon": 8.0, "delta": 1e-6,
                                                                         "unit": "subject"})
    result = CliRunner().invoke(cli, ["audit", *common, "--model", str(dp_model), "--synthetic", str(copies), "--out",
                                      str(tmp_path / "r2"), "--no-downstream", "--gate"])
    assert result.exit_code == 1
    assert "release gate failed" in result.output and "exact_copies = 16 > 0" in result.output
    assert "copy_fraction" in result.output
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["privacy"]["differentially_private"] and metrics["privacy"]["epsilon"] == 8.0
    assert metrics["membership_inference"]["delta"] == 1e-6 and metrics["downstream"] is None
    report = (tmp_path / "r2" / "report.md").read_text()
    assert "epsilon = 8" in report and "any single training subject" in report
    gate = metrics["gate"]
    assert gate["failed"] == ["copy_fraction", "exact_copies"] and np.isclose(
        gate["checks"]["copy_fraction"]["value"], 1.0)
