"""The verdict lines read from hand-made metrics, and the report's path scrubbing."""

import pytest

from augflow.audit.report import base_name, public_command, public_paths, release_gate, scrub_paths
from augflow.audit.verdict import verdict


def metrics(verdict_word="hurt", dp=False, copy_fraction=0.01, exact=0, auc=0.5, downstream=True,
            syn=(0.9, 0.9, 0.9), ref=(1.0, 1.0, 1.0)):
    """Just the keys the verdict reads; ``syn`` / ``ref``: recognition, precision, coverage."""
    m = {"privacy": {"differentially_private": dp, "epsilon": 8.0 if dp else None, "delta": 1e-5 if dp else None,
                     "ledger": {"dp": dp, "unit": "subject"}},
         "memorization": {"copy_fraction": copy_fraction, "exact_copies": exact, "near_copies": 0},
         "membership_inference": None if auc is None else {"auc": auc},
         "recognition": {"synthetic_mean": syn[0], "real_mean": ref[0]},
         "fidelity": {"overall": {"synthetic": {"precision": syn[1], "coverage": syn[2], "fid": 10.0},
                                  "real": {"precision": ref[1], "coverage": ref[2], "fid": 2.0}}},
         "downstream": None}
    if downstream:
        low, high = {"helped": (0.01, 0.05), "hurt": (-0.3, -0.2), "not distinguishable": (-0.02, 0.03)}[verdict_word]
        arm = {"summary": {"balanced_accuracy": {"mean": 0.5, "std": 0.0}}}
        m["downstream"] = {"protocols": {"real": arm, "real+oversampled": arm, "real+synthetic": arm},
                           "comparisons": {"real+synthetic vs real+oversampled": {
                               "mean": (low + high) / 2, "low": low, "high": high, "n": 3, "confidence": 0.95,
                               "verdict": verdict_word}}}
    m["gate"] = release_gate(m)
    return m


def test_a_passed_gate_over_a_top_up_that_hurt_says_so_in_words():
    v = verdict(metrics("hurt"))
    assert list(v) == ["privacy", "usefulness", "fidelity", "gate"]
    assert v["usefulness"]["word"] == "hurt" and v["usefulness"]["status"] == "bad"
    assert "-0.250" in v["usefulness"]["text"] and "-0.300 to -0.200" in v["usefulness"]["text"]
    assert v["gate"]["word"] == "passed" and v["gate"]["status"] == "warn"
    assert "worse than duplicating the real images" in v["gate"]["text"]


def test_a_top_up_that_helps_beside_duplicates_is_useful():
    m = metrics("hurt")
    m["downstream"]["comparisons"]["real+duplicates+synthetic vs real+oversampled"] = {
        "mean": 0.03, "low": 0.01, "high": 0.05, "n": 3, "confidence": 0.95, "verdict": "helped"}
    v = verdict(m)
    assert (v["usefulness"]["word"], v["usefulness"]["status"]) == ("helped", "good")
    assert "with duplicates of the real images helped (+0.030" in v["usefulness"]["text"]
    assert v["gate"]["status"] == "good" and "worse" not in v["gate"]["text"]


@pytest.mark.parametrize(("word", "status"), [("helped", "good"), ("not distinguishable", "warn")])
def test_usefulness_word_and_colour(word, status):
    v = verdict(metrics(word))
    assert (v["usefulness"]["word"], v["usefulness"]["status"]) == (word, status)
    assert v["gate"]["status"] == "good" and "worse" not in v["gate"]["text"]


def test_one_seed_is_not_distinguishable_and_says_why():
    m = metrics("not distinguishable")
    m["downstream"]["comparisons"]["real+synthetic vs real+oversampled"].update(low=None, high=None, n=1)
    v = verdict(m)["usefulness"]
    assert v["word"] == "not distinguishable" and "--seeds 3" in v["text"]
    assert "--seeds" not in verdict(metrics("not distinguishable"))["usefulness"]["text"]


def test_without_downstream_usefulness_is_not_evaluated():
    v = verdict(metrics(downstream=False))
    assert v["usefulness"]["word"] == "not evaluated" and v["usefulness"]["status"] == "none"
    assert "--no-downstream" in v["usefulness"]["text"] and "not evaluated" in v["gate"]["text"]


def test_privacy_line():
    v = verdict(metrics(dp=True))["privacy"]
    assert v["status"] == "good" and v["word"] == "differentially private (ε = 8)" and "per subject" in v["text"]
    m = metrics(dp=True)
    m["inputs"] = {"synthetic": {"provenance": {"selection": {"method": "classifier", "declared_public": True}}}}
    assert "samples selected by a classifier of data declared public" in verdict(m)["privacy"]["text"]
    v = verdict(metrics())["privacy"]
    assert v["status"] == "warn" and v["word"] == "not differentially private" and "AUC 0.5" in v["text"]
    v = verdict(metrics(exact=3, auc=None))
    assert v["privacy"]["status"] == "bad" and "COPIES TRAINING IMAGES" in v["privacy"]["text"]
    assert "not evaluated (needs --model)" in v["privacy"]["text"]
    assert v["gate"]["word"] == "failed" and "exact_copies = 3 > 0" in v["gate"]["text"]


@pytest.mark.parametrize(("syn", "word"), [((0.9, 0.9, 0.85), "close to real"), ((0.9, 0.6, 0.9), "below real"),
                                           ((0.2, 0.9, 0.9), "far from real")])
def test_fidelity_is_the_worst_ratio_to_the_real_reference(syn, word):
    assert verdict(metrics(syn=syn))["fidelity"]["word"] == word


def test_fidelity_without_recognition_uses_precision_and_coverage():
    m = metrics(syn=(None, 0.9, 0.9))
    del m["recognition"]
    v = verdict(m)["fidelity"]
    assert v["word"] == "close to real" and "recognises" not in v["text"] and v["text"].startswith("Precision 0.9")


def test_the_recognition_of_selected_samples_is_named_and_not_counted():
    m = metrics(syn=(0.2, 0.9, 0.9))  # recognised at 0.2 of the real rate: far from real ...
    assert verdict(m)["fidelity"]["word"] == "far from real"
    m["recognition"]["selected_by"] = "classifier"  # ... unless a classifier chose the samples: then not counted
    v = verdict(m)["fidelity"]
    assert v["word"] == "close to real" and "not counted: they were selected by `--select classifier`" in v["text"]


def test_fidelity_names_the_detectability_beside_real_vs_real():
    m = metrics()
    assert "linear classifier" not in verdict(m)["fidelity"]["text"]  # not measured: not mentioned
    m["detectability"] = {"n": 120, "features": {"synthetic": 0.912, "real": 0.55}}
    assert ("tells the synthetic from held-out real images with ROC AUC 0.91 in the audit's features (real training "
            "vs held-out real images: 0.55" in verdict(m)["fidelity"]["text"])


@pytest.mark.parametrize(("text", "expected"), [
    ("/tmp/democwd/augflow-demo/data/train.h5", "train.h5"),
    ('"data": "/work/results/scanner/train.h5",', '"data": "train.h5",'),
    ("see ~/x/model.pt, or C:\\Users\\me\\f.h5 (here)", "see model.pt, or f.h5 (here)"),
    ("--out=/tmp/r/report", "--out=report"),
    ("1/(10 N), 5.6 bits/dim, a / b, https://arxiv.org/abs/1807.03039", "1/(10 N), 5.6 bits/dim, a / b, "
     "https://arxiv.org/abs/1807.03039"),
])
def test_scrub_paths(text, expected):
    assert scrub_paths(text) == expected


def test_command_and_structured_paths_as_base_names():
    assert public_command("augflow audit --real scanner/test.h5 --model runs/scanner-dp/ --out=/tmp/r --seeds 3") \
        == "augflow audit --real test.h5 --model scanner-dp --out=r --seeds 3"
    fingerprint = {"data": "data/train.h5", "data_sha256": "ab", "note": "from /home/me/x.h5", "rows": 3}
    assert public_paths({"fp": fingerprint, "list": ["/a/b.txt"]}) == {
        "fp": {"data": "train.h5", "data_sha256": "ab", "note": "from x.h5", "rows": 3}, "list": ["b.txt"]}
    assert base_name("/") == "/" and base_name("runs/quick/") == "quick"
