"""The release gate passes and fails on its thresholds and names what failed."""

import pytest

from augflow.audit.report import GateThresholds, release_gate
from augflow.errors import ConfigError


def metrics(copy_fraction=0.01, exact=0, auc=0.52):
    return {"memorization": {"copy_fraction": copy_fraction, "exact_copies": exact},
            "membership_inference": None if auc is None else {"auc": auc}}


def test_gate_passes_under_the_thresholds():
    gate = release_gate(metrics())
    assert gate["passed"] and gate["failed"] == []
    assert {c["status"] for c in gate["checks"].values()} == {"pass"}
    assert gate["thresholds"] == {"max_copy_fraction": 0.05, "max_mia_auc": 0.6, "max_exact_copies": 0}


@pytest.mark.parametrize(("kwargs", "failed"), [
    ({"copy_fraction": 0.2}, ["copy_fraction"]), ({"exact": 3}, ["exact_copies"]), ({"auc": 0.75}, ["mia_auc"]),
    ({"copy_fraction": 0.2, "auc": 0.75}, ["copy_fraction", "mia_auc"])])
def test_gate_fails_and_names_the_failed_thresholds(kwargs, failed):
    gate = release_gate(metrics(**kwargs))
    assert not gate["passed"] and gate["failed"] == failed
    for name in failed:
        assert gate["checks"][name]["status"] == "fail" and ">" in gate["checks"][name]["reason"]


def test_thresholds_are_configurable_and_checked():
    assert not release_gate(metrics(copy_fraction=0.03), GateThresholds(max_copy_fraction=0.01))["passed"]
    assert release_gate(metrics(auc=0.75), GateThresholds(max_mia_auc=0.8))["passed"]
    with pytest.raises(ConfigError, match=r"--max-mia-auc must be in range \[0.5, 1\], but is: 0.2"):
        GateThresholds(max_mia_auc=0.2)
    with pytest.raises(ConfigError, match="--max-copy-fraction"):
        GateThresholds(max_copy_fraction=1.5)


def test_membership_inference_without_a_model_is_not_evaluated():
    gate = release_gate(metrics(auc=None))
    assert gate["passed"] and gate["checks"]["mia_auc"]["status"] == "not evaluated"
    assert "needs --model" in gate["checks"]["mia_auc"]["reason"]
