"""The downstream protocol: never a test subject in training, the top-up reaches the largest class; the audit's
input checks name the file and the problem."""

import numpy as np
import pytest
from audit_helpers import blobs, write_blobs

from augflow.audit import run_audit
from augflow.audit.downstream import (
    PROTOCOLS,
    balanced_synthetic_rows,
    check_subjects_disjoint,
    downstream,
    minority_classes,
    mixed_rows,
    oversample_rows,
    paired_difference,
    topup_rows,
    usefulness_sentence,
)
from augflow.data.store import write_dataset
from augflow.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_subjects_are_refused_before_training():
    x, y = blobs([4, 4, 4])
    subjects = np.array([f"s{i}" for i in range(12)])
    check_subjects_disjoint(subjects[:6], subjects[6:])
    with pytest.raises(DataError, match=r"share 1 subject\(s\) \(e.g. s5\)"):
        check_subjects_disjoint(subjects[:6], subjects[5:])
    with pytest.raises(DataError, match="never used for training"):
        downstream(x, y, x, y, x, y, ["a", "b", "c"], train_subjects=subjects, test_subjects=subjects[:1], seeds=1,
                   epochs=1)


def test_run_audit_refuses_a_test_subject_in_the_training_file(tiny_h5, tmp_path):
    # tests/conftest.py's tiny_h5 as both training and test file: every subject is shared
    with pytest.raises(DataError, match="--real .* and --train .* share 12 subject"):
        run_audit(tiny_h5, tiny_h5, tiny_h5, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_run_audit_names_mismatched_classes_and_shapes(tmp_path):
    real = write_blobs(tmp_path / "real.h5", [4, 4, 4], seed=1, prefix="test")
    train = write_blobs(tmp_path / "train.h5", [4, 4, 4], seed=0, prefix="train")
    x, y = blobs([4, 4, 4])
    other = write_dataset(tmp_path / "other.h5", x, y, ["x"] * 12, np.zeros(12), ["a", "b", "z"], source="synthetic")
    with pytest.raises(DataError, match=r"--synthetic .*other.h5: class names \['a', 'b', 'z'\] differ"):
        run_audit(real, train, other, tmp_path / "out", progress=False)
    big = write_dataset(tmp_path / "big.h5", np.zeros((2, 1, 8, 8)), [0, 1], ["x", "y"], [0, 0], ["a", "b", "c"])
    with pytest.raises(DataError, match=r"--synthetic .*big.h5: image shape \(1, 8, 8\) differs"):
        run_audit(real, train, big, tmp_path / "out", progress=False)


def test_topup_reaches_the_largest_real_class():
    train = np.repeat([0, 1, 2], [10, 4, 7])
    synthetic = np.repeat([1, 2], [8, 1])  # class 1 can be topped up fully, class 2 only by 1
    rows = topup_rows(train, synthetic, 3, seed=0)
    counts = np.bincount(train, minlength=3) + np.bincount(synthetic[rows], minlength=3)
    assert counts.tolist() == [10, 10, 8] and len(set(rows)) == len(rows)
    assert minority_classes(np.repeat([0, 1], [100, 20]), ["big", "small"]) == ["small"]


def test_protocol_metrics_have_stable_keys():
    x, y = blobs([12, 6, 4], seed=0)
    xs, ys = blobs([0, 6, 8], seed=1)
    xt, yt = blobs([6, 6, 6], seed=2)
    done = []
    out = downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=1, epochs=1, batch_size=16, progress=done.append)
    assert sum(done) == len(PROTOCOLS)  # a progress bar of every protocol's seeds ends full, the skipped one too
    assert list(out["protocols"]) == ["real", "real+oversampled", "real+synthetic", "real+duplicates+synthetic",
                                      "synthetic"]
    for name in ("real+synthetic", "real+oversampled", "real+duplicates+synthetic"):
        assert out["protocols"][name]["class_counts"] == {"a": 12, "b": 12, "c": 12}, name
    assert out["comparisons"]["real+synthetic vs real+oversampled"]["n"] == 1
    assert out["comparisons"]["real+duplicates+synthetic vs real+oversampled"]["n"] == 1
    assert out["duplicate_share"] == 0.5
    assert out["topup_counts"] == {"a": 0, "b": 6, "c": 8}
    # a top-up has no images of the largest class: no half-synthetic set can be formed from it
    assert "real+oversampled+synthetic" not in out["protocols"]
    assert "class 'a' has 0" in out["skipped"]["real+oversampled+synthetic"]
    assert "--per-class 12" in out["skipped"]["real+oversampled+synthetic"]
    summary = out["protocols"]["real"]["summary"]
    for key in ("accuracy", "balanced_accuracy", "auc_macro", "precision_macro", "recall_macro", "f1_macro"):
        assert 0 <= summary[key]["mean"] <= 1 and summary[key]["std"] == 0
    assert set(summary["per_class_recall"]) == {"a", "b", "c"}


def test_a_class_without_test_images_is_named_and_has_no_recall():
    from augflow.audit.report import _pm

    x, y = blobs([12, 6, 4], seed=0)
    xs, ys = blobs([0, 6, 8], seed=1)
    xt, yt = blobs([6, 6, 0], seed=2)
    out = downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=1, epochs=1, batch_size=16)
    assert out["classes_without_test_images"] == ["c"]
    recall = out["protocols"]["real"]["summary"]["per_class_recall"]
    assert np.isnan(recall["c"]["mean"]) and not np.isnan(recall["a"]["mean"])
    assert _pm(recall["c"], 1) == "n/a" and _pm(recall["a"], 1) != "n/a"


def test_the_steps_budget_gives_every_protocol_the_updates_of_the_real_set(monkeypatch):
    from augflow.audit import downstream as module

    budgets = []
    real_train = module.train_cnn
    monkeypatch.setattr(module, "train_cnn", lambda x, *a, **k: budgets.append((len(x), k["steps"])) or
                        real_train(x, *a, **k))
    x, y = blobs([12, 6, 4], seed=0)  # 22 real images: 2 batches of 16 per epoch
    xs, ys = blobs([0, 6, 8], seed=1)
    xt, yt = blobs([6, 6, 6], seed=2)
    out = downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=1, epochs=3, batch_size=16)
    assert budgets == [(22, 6), (36, 6), (36, 6), (36, 6), (14, 6)]  # real, oversampled, top-up, mixed, synthetic
    assert out["recipe"]["steps"] == 6 and out["recipe"]["epochs"] == 3
    budgets.clear()
    downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=1, epochs=1, batch_size=16, budget="epochs")
    assert budgets == [(22, None), (36, None), (36, None), (36, None), (14, None)]
    with pytest.raises(ConfigError, match="budget must be one of steps, epochs, but is: 'time'"):
        downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], budget="time")


def test_a_per_class_release_makes_every_class_half_real_and_half_synthetic():
    train = np.repeat([0, 1, 2], [5, 2, 3])
    synthetic = np.repeat([2, 0, 1, 0], [6, 7, 5, 1])  # class 1 has 5 of the 5 needed, classes 0 and 2 more
    rows, why = balanced_synthetic_rows(train, synthetic, ["a", "b", "c"])
    assert why == "" and np.bincount(synthetic[rows]).tolist() == [5, 5, 5] and len(set(rows)) == 15
    rows, why = balanced_synthetic_rows(train, np.repeat([2, 0, 1], [6, 8, 4]), ["a", "b", "c"])
    assert rows is None and "class 'b' has 4" in why
    x, y = blobs([12, 6, 4], seed=0)
    xs, ys = blobs([12, 13, 12], seed=1)
    xt, yt = blobs([6, 6, 6], seed=2)
    out = downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=1, epochs=1, batch_size=16,
                     protocols=("real+oversampled", "real+synthetic", "real+oversampled+synthetic"))
    assert out["skipped"] == {}
    assert out["protocols"]["real+oversampled+synthetic"]["class_counts"] == {"a": 24, "b": 24, "c": 24}
    assert out["comparisons"]["real+oversampled+synthetic vs real+oversampled"]["n"] == 1
    assert "Adding it to the oversampled real images, every class half real and half synthetic, could not be told " \
           "apart from oversampling" in usefulness_sentence(out)  # one seed: no interval


def test_oversampling_duplicates_exactly_the_minority_rows():
    labels = np.repeat([0, 1, 2], [10, 4, 3])
    rows = oversample_rows(labels, 3, seed=0)
    assert np.bincount(labels[rows], minlength=3).tolist() == [10, 10, 10]
    assert np.array_equal(rows[:17], np.arange(17))  # every real row once, first
    copies = np.bincount(rows, minlength=17)
    assert copies[:10].tolist() == [1] * 10  # the largest class is not touched
    assert sorted(copies[10:14].tolist()) == [2, 2, 3, 3]  # 6 extra for 4 rows: each once more, then 2 distinct
    assert sorted(copies[14:].tolist()) == [3, 3, 4]  # 7 extra for 3 rows: each twice more, then 1
    assert np.array_equal(oversample_rows(labels, 3, seed=0), rows)


def test_mixing_replaces_a_share_of_each_top_up_by_spread_duplicates():
    labels = np.repeat([0, 1, 2], [10, 4, 3])  # gaps 6 and 7
    synthetic = np.repeat([1, 2], [8, 9])
    topup = topup_rows(labels, synthetic, 3, seed=0)
    kept, duplicates = mixed_rows(labels, synthetic, topup, 0.5, seed=0)
    assert set(kept) <= set(topup) and len(set(kept)) == len(kept)
    assert np.bincount(synthetic[kept], minlength=3).tolist() == [0, 3, 3]  # 6 -> 3 kept; 7 -> round(3.5) = 4 dups
    assert np.bincount(labels[duplicates], minlength=3).tolist() == [0, 3, 4]
    copies = np.bincount(duplicates, minlength=17)
    assert sorted(copies[10:14].tolist()) == [0, 1, 1, 1] and sorted(copies[14:].tolist()) == [1, 1, 2]
    counts = np.bincount(np.r_[labels, labels[duplicates]], minlength=3) + np.bincount(synthetic[kept], minlength=3)
    assert counts.tolist() == [10, 10, 10]  # the class counts of real + top-up
    none_kept, everything = mixed_rows(labels, synthetic, topup, 1.0)
    assert len(none_kept) == 0 and np.bincount(labels[everything], minlength=3).tolist() == [0, 6, 7]
    all_kept, no_dups = mixed_rows(labels, synthetic, topup, 0.0)
    assert np.array_equal(all_kept, np.sort(topup)) and len(no_dups) == 0
    with pytest.raises(ConfigError, match=r"share of duplicates must be in \[0, 1\], but is: 1.5"):
        mixed_rows(labels, synthetic, topup, 1.5)


def test_paired_difference_on_a_hand_made_example():
    # differences 0.02, 0.04, 0.06: mean 0.04, sd 0.02, t(0.975, 2) = 4.303 -> half width 0.04969
    out = paired_difference([0.72, 0.74, 0.76], [0.70, 0.70, 0.70])
    assert out["mean"] == pytest.approx(0.04) and out["std"] == pytest.approx(0.02)
    assert out["low"] == pytest.approx(0.04 - 0.049690, abs=1e-5) and out["high"] == pytest.approx(0.089690, abs=1e-5)
    assert out["verdict"] == "not distinguishable"
    assert paired_difference([0.8, 0.81, 0.82], [0.7, 0.7, 0.71])["verdict"] == "helped"
    assert paired_difference([0.6, 0.61, 0.62], [0.7, 0.7, 0.71])["verdict"] == "hurt"
    single = paired_difference([0.8], [0.7])
    assert single["low"] is None and single["verdict"] == "not distinguishable"


def test_usefulness_sentence_says_hurt_in_plain_words():
    result = {"comparisons": {"real+synthetic vs real+oversampled": paired_difference([0.6, 0.61, 0.62],
                                                                                      [0.7, 0.7, 0.71])}}
    sentence = usefulness_sentence(result)
    assert sentence.startswith("The synthetic top-up hurt") and "Do not release" in sentence and "-0.093" in sentence
    result["comparisons"]["real+duplicates+synthetic vs real+oversampled"] = paired_difference([0.8, 0.81, 0.82],
                                                                                               [0.7, 0.7, 0.71])
    result["duplicate_share"] = 0.5
    sentence = usefulness_sentence(result)
    assert "Filling 50% of each class's gap with it and 50% with duplicates of the real images helped (+0.107" \
        in sentence
    assert "Do not release" not in sentence


def test_recognition_rates_count_each_class_own_argmax():
    from augflow.audit.recognition import recognition_rates

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
    rates = recognition_rates(probs, np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert rates == {"a": 1.0, "b": pytest.approx(1 / 3), "c": None}


def test_each_protocol_is_reported_at_the_budget_its_validation_images_chose(monkeypatch):
    from types import SimpleNamespace

    from augflow.audit import downstream as module

    x, y = blobs([12, 6, 4], seed=0)
    xs, ys = blobs([12, 13, 12], seed=1)
    xt, yt = blobs([6, 6, 6], seed=2)
    xv, yv = blobs([3, 3, 3], seed=3)
    trained = []
    monkeypatch.setattr(module, "train_cnn", lambda x, y, k, **kw: trained.append(kw["steps"]) or
                        SimpleNamespace(epochs=kw["epochs"], n=len(x)))

    def predict(model, images, **_):
        # Validation: right after 1 epoch for the 36-image sets, after 2 for the others; test: right only after 2
        # epochs, so a budget chosen on the test images would show as 1.0 everywhere.
        right = model.epochs == (1 if len(images) == len(xv) and model.n == 36 else 2)
        labels = yv if len(images) == len(xv) else yt
        return np.eye(3)[labels if right else np.zeros_like(labels)]

    monkeypatch.setattr(module, "predict_proba", predict)
    with pytest.raises(ConfigError, match=r"several downstream budgets \(1, 2 epochs\) need validation images"):
        downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=2, epochs=(2, 1), batch_size=16)
    done = []
    out = downstream(x, y, xs, ys, xt, yt, ["a", "b", "c"], seeds=2, epochs=(2, 1), batch_size=16,
                     val_images=xv, val_labels=yv, progress=done.append)
    assert sum(done) == len(trained) == len(PROTOCOLS) * 2 * 2
    assert sorted(set(trained)) == [2, 4]  # the steps of 1 and 2 epochs of the 22 real images (2 batches)
    chosen = {name: p["epochs"] for name, p in out["protocols"].items()}
    assert chosen == {"real": 2, "real+oversampled": 1, "real+synthetic": 1, "real+duplicates+synthetic": 1,
                      "real+oversampled+synthetic": 2, "synthetic": 2}
    test_accuracy = {name: p["summary"]["balanced_accuracy"]["mean"] for name, p in out["protocols"].items()}
    assert test_accuracy == pytest.approx({"real": 1, "real+oversampled": 1 / 3, "real+synthetic": 1 / 3,
                                           "real+duplicates+synthetic": 1 / 3, "real+oversampled+synthetic": 1,
                                           "synthetic": 1})
    assert out["protocols"]["real+oversampled"]["val_balanced_accuracy"] == pytest.approx({"1": 1, "2": 1 / 3})
    assert out["protocols"]["real+oversampled"]["steps"] == 2 and out["protocols"]["real"]["steps"] == 4
    assert out["recipe"]["epochs"] == [1, 2] and out["recipe"]["steps"] == [2, 4] and out["val_n"] == 9
    assert out["comparisons"]["real+synthetic vs real"]["mean"] == pytest.approx(1 / 3 - 1)


def test_choose_budget_takes_the_best_mean_and_the_smallest_of_equals():
    from augflow.audit.downstream import choose_budget

    assert choose_budget({10: [0.7, 0.9], 30: [0.75, 0.8]}) == 10
    assert choose_budget({30: [0.8, 0.8], 10: [0.8, 0.8], 20: [0.7, 0.9]}) == 10
    assert choose_budget({10: [0.5], 30: [0.6]}) == 30
