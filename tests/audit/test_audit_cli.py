"""``augflow audit`` end to end in tmp_path: report files with stable keys, the data card, the gate's exit code."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from audit_helpers import blobs, tiny_flow, write_blobs
from click.testing import CliRunner

from augflow.audit.downstream import best_verdict
from augflow.cli import cli

TOP_LEVEL = {"schema", "command", "inputs", "privacy", "feature_space", "fidelity", "diversity", "memorization",
             "membership_inference", "likelihood_classifier", "downstream", "settings", "gate", "timings_s",
             "recognition", "detectability"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_audit_help_has_an_example():
    result = CliRunner().invoke(cli, ["audit", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--gate" in result.output


@pytest.mark.parametrize("command, option, value", [("audit", "--seeds", "0"), ("audit", "--epochs", "0"),
                                                     ("audit", "--bootstraps", "-1"), ("audit", "--duplicates", "1.5"),
                                                     ("demo", "--seeds", "0"),
                                                     ("demo", "--epochs", "-5")])
def test_counts_and_budgets_out_of_range_are_refused_before_any_work(tmp_path, command, option, value):
    data = write_blobs(tmp_path / "d.h5", [4, 4, 4], seed=0, prefix="d")
    files = ["--real", str(data), "--train", str(data), "--synthetic", str(data)] if command == "audit" else []
    result = CliRunner().invoke(cli, [command, *files, "--out" if command == "audit" else "--out-dir",
                                      str(tmp_path / "out"), option, value])
    assert result.exit_code == 2 and option in result.output and "range" in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def audited(tmp_path_factory, one_thread):
    """One audit of tiny files through the CLI, with a command line and a provenance full of absolute paths
    (the synthetic file names its model, recipe mask and training data as ``synthesize`` does)."""
    tmp_path = tmp_path_factory.mktemp("audit")
    real = write_blobs(tmp_path / "test.h5", [8, 8, 8], seed=1, prefix="test")
    train = write_blobs(tmp_path / "train.h5", [16, 10, 6], seed=0, prefix="train")
    model = tiny_flow(tmp_path / "model.pt", [16, 10, 6])
    fingerprint = {"data": str(train.resolve()), "data_sha256": "ab" * 32, "train_rows": 32}
    synthetic = write_blobs(tmp_path / "synth.h5", [0, 6, 10], seed=2, prefix="synthetic", source="synthetic",
                            provenance={"model": str(model.resolve()), "model_sha256": "cd" * 32,
                                        "training_fingerprint": fingerprint,
                                        "recipe": {"name": "tiny", "train": {"lr": 0.001,
                                                                            "app_mask": str(tmp_path / "mask.npy")}},
                                        "privacy": {"dp": False, "guarantee": "none: trained without differential "
                                                    "privacy", "dataset_fingerprint": fingerprint},
                                        "selection": {"method": "classifier", "min_confidence": 0.4}})
    common = ["--real", str(real), "--train", str(train), "--model", str(model), "--cache-dir", str(tmp_path / "c"),
              "--encoder-epochs", "1", "--bootstraps", "10", "--threads", "1"]
    out = tmp_path / "report"
    args = ["audit", *common, "--synthetic", str(synthetic), f"--out={out}", "--seeds", "1", "--epochs", "1",
            "--json"]
    with pytest.MonkeyPatch.context() as mp:  # the command line recorded in the report, as a shell would pass it
        mp.setattr(sys, "argv", ["/usr/local/bin/augflow", *args])
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return {"result": result, "out": out, "tmp": tmp_path, "common": common,
            "inputs": {"real": real, "train": train, "synthetic": synthetic, "model": model}}


def _text(path):
    """A report file without its embedded images (base64 could spell anything)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,", path.read_text())


def test_audit_end_to_end(audited):
    result, out, tmp_path = audited["result"], audited["out"], audited["tmp"]
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
    assert list(metrics["downstream"]["protocols"]) == ["real", "real+oversampled", "real+synthetic",
                                                        "real+duplicates+synthetic", "synthetic"]
    assert set(metrics["downstream"]["comparisons"]) == {"real+synthetic vs real+oversampled", "real+synthetic vs real",
                                                         "real+duplicates+synthetic vs real+oversampled"}
    # the fixture's release has no images of class a: the half-synthetic protocol is named as not run, and why
    assert "--per-class" in metrics["downstream"]["skipped"]["real+oversampled+synthetic"]
    assert "Not run: `real+oversampled+synthetic` needs" in (out / "report.md").read_text()
    assert 0 <= metrics["likelihood_classifier"]["accuracy"] <= 1
    assert metrics["likelihood_classifier"]["calibration"].startswith("none")
    rec = metrics["recognition"]
    assert rec["synthetic"]["a"] is None and 0 <= rec["synthetic"]["c"] <= 1 and 0 <= rec["real_mean"] <= 1
    # the release says it was selected by a classifier: its recognition is named as such and not counted
    assert rec["selected_by"] == "classifier" and "not counted" in metrics["verdict"]["fidelity"]["text"]
    assert "high by construction" in (out / "report.md").read_text()
    det = metrics["detectability"]
    assert set(det) == {"n", "features", "pixels"} and det["n"] > 0
    assert all(auc is None or 0 <= auc <= 1 for space in ("features", "pixels") for auc in det[space].values())
    assert "Detectability (classifier two-sample test" in (out / "report.md").read_text()
    assert metrics["inputs"]["synthetic"]["provenance"]["generator"] == "test"
    assert list(metrics["verdict"]) == ["privacy", "usefulness", "fidelity", "gate"]
    assert metrics["verdict"]["usefulness"]["word"] == best_verdict(metrics["downstream"])
    html = (out / "report.html").read_text()
    assert "Data card" in html and "data:image/png;base64," in html and "not differentially private" in html
    assert "<details><summary>Raw privacy ledger (JSON)</summary>" in html and "<details open" not in html
    assert "Intended uses" in (out / "report.md").read_text()
    for name in ("closest_pairs", "samples", "dcr", "roc", "prdc", "recall"):
        assert (out / "figures" / f"{name}.png").is_file(), name
    assert list((tmp_path / "c").glob("*.pt"))  # the encoder was cached
    # metrics.json is the data holder's: it keeps the full paths.
    assert metrics["inputs"]["real"]["path"] == str(audited["inputs"]["real"])


def test_report_names_no_absolute_path(audited):
    """No absolute path of the inputs, of the model or of the tmp dir in report.html / report.md; base names and
    SHA-256 instead, also on the command line and in the provenance, ledger and recipe."""
    out, tmp = audited["out"], audited["tmp"]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("report.html", "report.md"):
        text = _text(out / name)
        assert str(tmp) not in text and str(tmp.parent) not in text and "/usr/local/bin" not in text, name
        for path in audited["inputs"].values():
            assert str(path) not in text and str(path.resolve()) not in text, (name, path)
            assert path.name in text, (name, path)
        assert "mask.npy" in text and metrics["inputs"]["train"]["sha256"] in text
        assert re.search(r"augflow audit --real test\.h5 --train train\.h5 .*--out=report ", text), name


def test_verdict_comes_before_the_first_table(audited):
    out = audited["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    word = metrics["verdict"]["usefulness"]["word"]
    assert word in ("helped", "hurt", "not distinguishable")
    html = (out / "report.html").read_text()
    start, end = html.index('<div class="verdict"'), html.index("</div>")
    assert end < html.index("<table>") and start < html.index("Data card")
    block = html[start:end]
    for label in ("Privacy", "Usefulness", "Fidelity", "Release gate"):
        assert f"<b>{label}</b>" in block
    assert f">{word}</span>" in block and 'class="badge ' in block
    md = (out / "report.md").read_text()
    assert md.index(f"- **Usefulness: {word}**") < md.index("## Data card") < md.index("| class |")


CHROME = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                                         "chrome") if shutil.which(b)), None)


@pytest.mark.skipif(CHROME is None, reason="no chromium / chrome on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(audited, tmp_path):
    """The browser loads report.html without error, and its rendered DOM has the verdict above the first table."""
    out = audited["out"]
    result = subprocess.run([CHROME, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                             "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'id="verdict"' in dom and "Usefulness" in dom
    assert dom.index('id="verdict"') < dom.index("<table")
    assert dom.count("<img") == (out / "report.html").read_text().count("<img") >= 6


def test_gate_fails_on_planted_copies_and_reports_a_dp_ledger(audited):
    """Planted exact copies of training images: the gate fails and names the failed thresholds."""
    tmp_path, common = audited["tmp"], audited["common"]
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
    v = metrics["verdict"]
    assert v["privacy"]["status"] == "bad" and v["privacy"]["word"] == "differentially private (ε = 8)"
    assert v["gate"]["word"] == "failed" and v["usefulness"]["word"] == "not evaluated"
    assert "- **Release gate: failed** — Do not release: copy_fraction = 1 > 0.05" in report
    assert "- **Privacy: differentially private (ε = 8)** — ε = 8, δ = 1e-06 per subject" in report
    assert "COPIES TRAINING IMAGES" in report and "- **Usefulness: not evaluated**" in report


def test_data_card_says_when_the_images_derive_from_real_ones(audited):
    from augflow.audit.report import build_document

    metrics = json.loads((audited["out"] / "metrics.json").read_text())
    plain = build_document(metrics, {}).markdown()
    assert "they show no real subject" in plain and "derived from a real image" not in plain
    metrics["inputs"]["synthetic"]["provenance"]["near"] = {"real": "train.h5", "strength": 0.3}
    near = build_document(metrics, {}).markdown()
    assert "they show no real subject" not in near
    assert "each was derived from a real image of train.h5 (its latent mixed with noise of strength 0.3)" in near
    assert "not for sharing" in near
    assert "declared public" not in plain
    metrics["inputs"]["synthetic"]["provenance"]["selection"] = {
        "method": "classifier", "declared_public": True, "trained_on": "public.h5", "trained_on_sha256": "ab" * 32}
    assert "with a classifier trained on public.h5 (SHA-256 abababababababab...), which the user declared public" in \
        build_document(metrics, {}).markdown()
    del metrics["inputs"]["synthetic"]["provenance"]["selection"]
    assert "classifier-free guidance" not in plain  # guidance 1 (none): no row
    metrics["inputs"]["synthetic"]["provenance"]["guidance"] = 3.0
    assert "| classifier-free guidance | 3 |" in build_document(metrics, {}).markdown()


def test_downstream_section_states_the_budget(audited):
    from augflow.audit.report import build_document

    metrics = json.loads((audited["out"] / "metrics.json").read_text())
    assert metrics["downstream"]["recipe"]["steps"] == 1  # 32 training images: 1 batch of 64
    assert "(1 steps each, the steps of 1 epochs over the real training images," in \
        build_document(metrics, {}).markdown()
    metrics["downstream"]["recipe"]["steps"] = None  # --budget epochs
    assert "ResNet-18 from scratch (1 epochs," in build_document(metrics, {}).markdown()


def test_several_budgets_need_a_validation_file_of_other_subjects(audited):
    tmp, inputs = audited["tmp"], audited["inputs"]
    base = ["audit", "--real", str(inputs["real"]), "--train", str(inputs["train"]), "--synthetic",
            str(inputs["synthetic"]), "--out", str(tmp / "budgets")]
    result = CliRunner().invoke(cli, [*base, "--epochs", "10,30"])
    assert result.exit_code != 0 and "several downstream budgets need --val FILE" in result.output
    result = CliRunner().invoke(cli, [*base, "--epochs", "10,x"])
    assert result.exit_code == 2 and "'10,x' is out of range" in result.output
    result = CliRunner().invoke(cli, [*base, "--epochs", "10,30", "--val", str(inputs["real"])])
    assert result.exit_code != 0 and re.search(r"--real .*test.h5 and --val .*test.h5 share 12 subject",
                                               result.output)
    assert not (tmp / "budgets").exists()


def test_downstream_budgets_chosen_on_val_reach_the_report(audited):
    from augflow.audit.report import build_document

    tmp = audited["tmp"]
    val = write_blobs(tmp / "val.h5", [4, 4, 4], seed=3, prefix="val")
    out = tmp / "report-val"
    result = CliRunner().invoke(cli, ["audit", *audited["common"], "--synthetic", str(audited["inputs"]["synthetic"]),
                                      "--out", str(out), "--seeds", "1", "--epochs", "2,1", "--val", str(val)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    ds = metrics["downstream"]
    assert ds["recipe"]["epochs"] == [1, 2] and ds["val_n"] == 12
    assert metrics["inputs"]["val"]["n"] == 12
    for name, protocol in ds["protocols"].items():
        scores = protocol["val_balanced_accuracy"]
        assert set(scores) == {"1", "2"} and protocol["epochs"] == max((1, 2), key=lambda e: (scores[str(e)], -e)), name
    text = build_document(metrics, {}).markdown()
    assert "each protocol trained for 1 and 2 epochs of the real training images' steps and reported at the budget " \
           "with its best mean balanced accuracy on the 12 validation images of --val" in text
    assert "| epochs (chosen on --val) |" in text and "| val balanced accuracy, 2 epochs |" in text
    # without a stored calibration, --val calibrates the likelihood classifier (offsets too: it has every class)
    assert metrics["likelihood_classifier"]["calibration"] == "fitted on the 12 images of --val"
    assert metrics["likelihood_classifier"]["calibrated"] is True
    assert "likelihood classifier on the same test images, calibration fitted on the 12 images of --val" in text
