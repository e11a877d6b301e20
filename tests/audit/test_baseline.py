"""The baseline ResNet-18: determinism, learning a separable toy task, class weighting."""


import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from augflow.audit.baseline import build_resnet18, class_weights, features, predict_proba, train_cnn
from augflow.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(counts, size=16, seed=0, amp=0.5, noise=0.15):
    """Class k is noise plus a bright square in quadrant k: separable, and robust to the 1 px shifts."""
    rng = np.random.default_rng(seed)
    xs, ys, q = [], [], size // 2
    for k, n in enumerate(counts):
        x = rng.normal(0.3, noise, (n, 1, size, size))
        r, c = divmod(k, 2)
        x[:, :, r * q + 2:r * q + q - 2, c * q + 2:c * q + q - 2] += amp
        xs.append(x)
        ys.append(np.full(n, k))
    return np.clip(np.concatenate(xs), 0, 1).astype(np.float32), np.concatenate(ys)


def test_stem_depends_on_image_size():
    small, large = build_resnet18(3, 32), build_resnet18(3, 128)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2) and large.conv1.in_channels == 1
    assert not isinstance(large.maxpool, torch.nn.Identity)


def test_class_weights_are_inverse_frequency_with_mean_one():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 0)
    w = class_weights(labels, 3).numpy()
    assert w[2] == 0 and np.isclose(w[1] / w[0], 3)
    assert np.isclose(w[labels].mean(), 1)


def test_class_weights_count_the_images_weights():
    labels = np.array([0] * 6 + [1] * 2)
    w = class_weights(labels, 2, np.array([0.5] * 6 + [1] * 2)).numpy()  # class 0 counts as 3 images
    assert np.isclose(w[1] / w[0], 1.5) and np.isclose(w @ [3, 2] / 5, 1)


def test_a_zero_sample_weight_ignores_an_image_and_ones_change_nothing():
    x, y = toy([20, 20, 20])
    xt, yt = toy([30, 30, 30], seed=1)
    images, labels = np.concatenate([x, x]), np.concatenate([y, (y + 1) % 3])  # each image also under a wrong label
    ignore_wrong = np.r_[np.ones(60), np.zeros(60)]

    def mean_probability_of_the_true_class(**kwargs):
        proba = predict_proba(train_cnn(images, labels, 3, epochs=2, batch_size=16, **kwargs), xt)
        return proba[np.arange(len(yt)), yt].mean()

    # Unweighted, the wrong labels pull about half the probability away (argmax between the two is a coin flip).
    assert mean_probability_of_the_true_class(sample_weight=ignore_wrong) > 0.95
    assert mean_probability_of_the_true_class() < 0.75
    ones = train_cnn(x, y, 3, epochs=2, batch_size=8, sample_weight=np.ones(60))
    np.testing.assert_allclose(predict_proba(ones, x), predict_proba(train_cnn(x, y, 3, epochs=2, batch_size=8), x),
                               atol=1e-4)


def test_soft_targets_teach_their_distribution_and_one_hot_ones_change_nothing():
    x, y = toy([20, 20, 20])
    xt, yt = toy([30, 30, 30], seed=1)
    # Every label is wrong; soft targets that put their mass on the true class still teach it, one-hot targets of
    # the wrong labels teach the wrong class.
    images, labels = np.concatenate([x, x]), np.concatenate([(y + 1) % 3, (y + 1) % 3])
    true = np.eye(3)[np.concatenate([y, y])]

    def accuracy(targets):
        model = train_cnn(images, labels, 3, epochs=2, batch_size=16, soft_targets=targets)
        return (predict_proba(model, xt).argmax(1) == yt).mean()

    assert accuracy(0.85 * true + 0.05) > 0.9 and accuracy(np.eye(3)[labels]) < 0.2
    one_hot = train_cnn(x, y, 3, epochs=2, batch_size=8, soft_targets=np.eye(3)[y])
    np.testing.assert_allclose(predict_proba(one_hot, x), predict_proba(train_cnn(x, y, 3, epochs=2, batch_size=8), x),
                               atol=1e-4)


def test_same_seed_same_model_other_seed_other_model():
    x, y = toy([8, 8, 8])
    runs = [predict_proba(train_cnn(x, y, 3, epochs=2, batch_size=8, seed=s), x) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_steps_fix_the_number_of_updates_whatever_the_set_size(monkeypatch):
    x, y = toy([8, 8, 8])  # 24 images, 3 batches of 8 per epoch
    same = [predict_proba(train_cnn(x, y, 3, batch_size=8, **budget), x) for budget in ({"epochs": 2}, {"steps": 6})]
    np.testing.assert_array_equal(same[0], same[1])
    updates = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or step(self, *a, **k))
    train_cnn(x, y, 3, batch_size=8, steps=4)
    train_cnn(np.concatenate([x, x, x]), np.concatenate([y, y, y]), 3, batch_size=8, epochs=1, steps=4)
    assert len(updates) == 8  # 4 each: the first set's second pass and the larger set's only pass are cut short


def test_init_starts_from_the_given_model():
    x, y = toy([20, 20, 20])
    xt, yt = toy([30, 30, 30], seed=1)
    trained = train_cnn(x, y, 3, epochs=5, batch_size=16)
    # With a vanishing learning rate fine-tuning changes nothing (BatchNorm is recalibrated on the same batches) ...
    kept = train_cnn(x, y, 3, steps=2, batch_size=16, lr=1e-12, init=trained)
    np.testing.assert_allclose(predict_proba(kept, xt), predict_proba(trained, xt), atol=1e-4)
    # ... and without init the same steps leave an untrained network.
    fresh = train_cnn(x, y, 3, steps=2, batch_size=16, lr=1e-12)
    assert (predict_proba(trained, xt).argmax(1) == yt).mean() > 0.9
    assert (predict_proba(fresh, xt).argmax(1) == yt).mean() < 0.7


def test_batchnorm_keeps_the_statistics_of_bn_images():
    x, y = toy([8, 8])
    other = toy([8, 8], seed=2, amp=0.9)[0]  # 16 images: one recalibration batch, so its mean is the plain mean
    model = train_cnn(x, y, 2, steps=1, batch_size=16, bn_images=other)
    with torch.no_grad():
        stem = model.conv1(torch.from_numpy(other))
    np.testing.assert_allclose(model.bn1.running_mean.numpy(), stem.mean((0, 2, 3)).numpy(), atol=1e-5)
    default = train_cnn(x, y, 2, steps=1, batch_size=16)
    assert not np.allclose(default.bn1.running_mean.numpy(), model.bn1.running_mean.numpy(), atol=1e-3)


def test_learns_a_separable_toy_task():
    x, y = toy([20, 20, 20])
    xt, yt = toy([30, 30, 30], seed=1)
    model = train_cnn(x, y, 3, epochs=5, batch_size=16)
    assert not model.training
    p = predict_proba(model, xt)
    assert p.shape == (90, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == yt).mean() > 0.9  # chance is 1/3
    f = features(model, xt)
    assert f.shape == (90, 512) and np.isfinite(f).all()


def test_class_weighting_helps_the_minority():
    # 60:4, a faint minority signal: the plain loss predicts the majority only (balanced accuracy ~0.5).
    x, y = toy([60, 4], amp=0.2, noise=0.3)
    xt, yt = toy([100, 100], seed=1, amp=0.2, noise=0.3)
    scores = {w: balanced_accuracy_score(yt, predict_proba(train_cnn(x, y, 2, epochs=3, batch_size=16,
                                                                     weighted=w), xt).argmax(1))
              for w in (True, False)}
    assert scores[True] > scores[False] + 0.08, scores


def test_bad_inputs_are_named():
    x, y = toy([4, 4])
    with pytest.raises(DataError, match="labels must be in"):
        train_cnn(x, y + 5, 2, epochs=1)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        train_cnn(x[:, 0], y, 2, epochs=1)
    with pytest.raises(ConfigError, match="sample_weight must be 8 non-negative numbers"):
        train_cnn(x, y, 2, epochs=1, sample_weight=-np.ones(8))
    with pytest.raises(ConfigError, match="soft_targets must be 8 probability rows over 2 classes"):
        train_cnn(x, y, 2, epochs=1, soft_targets=np.ones((8, 2)))
    with pytest.raises(ConfigError, match="steps >= 1"):
        train_cnn(x, y, 2, steps=0)
    with pytest.raises(ConfigError, match=r"bn_images must be at least 2 images of shape \(1, 16, 16\)"):
        train_cnn(x, y, 2, steps=1, bn_images=x[:, :, :8])
