"""Shared fixtures: small dataset files written through the real HDF5 writer."""

import os

import numpy as np
import pytest
import torch

from augflow.data.store import write_dataset

# Under pytest-xdist each worker gets one of the cores: two 2-thread workers oversubscribe them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# A tiny MAGIC-Flow recipe (``load_recipe(None, TINY)``): two epochs of a 3-level flow on 8 px images.
TINY = [
    'model.full_res_steps=["application", "checkerboard"]', "model.channel_steps=1", "model.checker_steps=[1, 1, 1]",
    "model.hidden_channels=[8, 8, 8, 8]", "model.embed_dim=8", "model.dropout=0.0",
    "train.epochs=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=3", "train.val_fraction=0.25",
    "train.ema_decay=0.9",
]
# One flow step (a squeeze, one checkerboard coupling, the prior): 366 graph nodes instead of TINY's ~1,600, so the
# tests that compile it (train.compile) pay well under a minute of inductor per process on a cold cache.
ONE_STEP = [*TINY, "model.full_res_steps=[]", "model.channel_steps=0", "model.checker_steps=[1]",
            "model.hidden_channels=[8, 8]"]


def pytest_collection_modifyitems(items):
    """Start the ``slow`` tests first: under pytest-xdist the other worker runs the rest meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models gain
    nothing from threads, and a second busy process on 2 shared cores makes 2-thread training ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(path, n_subjects=12, slices=3, num_classes=3, shape=(1, 8, 8), seed=0):
    """A random dataset: ``n_subjects`` subjects with ``slices`` slices each, classes round-robin."""
    rng = np.random.default_rng(seed)
    n = n_subjects * slices
    subject_ids = np.repeat(np.arange(n_subjects), slices)
    labels = subject_ids % num_classes
    images = rng.random((n, *shape), dtype=np.float32)
    subjects = [f"sub-{s:03d}" for s in subject_ids]
    slice_index = np.tile(np.arange(slices) - slices // 2, n_subjects)
    names = [f"class{k}" for k in range(num_classes)]
    return write_dataset(path, images, labels, subjects, slice_index, names, provenance={"test": True})


@pytest.fixture
def tiny_h5(tmp_path):
    return make_dataset(tmp_path / "tiny.h5")
