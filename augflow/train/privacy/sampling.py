"""Sampling under DP: the units of privacy, Poisson-sampled batches and the secret seed of the private randomness.

Each step takes every unit independently with probability ``q = batch_size / N`` (Poisson sampling, the setting of
the accountants' analysis). A unit is one slice (``"slice"``) or one subject (``"subject"``: a sampled subject
contributes one of its slices, drawn uniformly, so each step touches a subject at most once). Which units were
drawn, and the Gaussian noise, come from a secret seed (OS entropy) kept only in the private checkpoint.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

UNITS = ("slice", "subject")


@dataclass(frozen=True)
class Units:
    """The units of privacy of a training set: unit ``u`` owns positions ``order[starts[u]:starts[u] + sizes[u]]``."""

    kind: str
    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    @property
    def count(self) -> int:
        return len(self.sizes)


def make_units(kind: str, subjects: np.ndarray) -> Units:
    """Units of a training set whose position ``i`` belongs to subject ``subjects[i]``."""
    n = len(subjects)
    if kind == "slice":
        return Units(kind, np.arange(n), np.arange(n), np.ones(n, dtype=np.int64))
    _, inverse = np.unique(np.asarray(subjects, dtype=str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    return Units(kind, order, np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)


def poisson_sample(units: Units, sample_rate: float, seed: int) -> np.ndarray:
    """Positions of one Poisson-sampled batch: each unit independently with probability ``sample_rate``; a sampled
    subject contributes one of its slices, drawn uniformly. The batch size is random (possibly 0)."""
    rng = np.random.default_rng(seed)
    chosen = np.flatnonzero(rng.random(units.count) < sample_rate)
    pick = np.minimum((rng.random(len(chosen)) * units.sizes[chosen]).astype(np.int64), units.sizes[chosen] - 1)
    return units.order[units.starts[chosen] + pick]


def new_secret() -> str:
    """128 bits of OS entropy: the seed of the private randomness (sampling, noise), never released."""
    return secrets.token_hex(16)


def secret_seed(secret: str, *parts: int) -> int:
    """A 64-bit seed for one purpose (``parts``) derived from the secret."""
    return int(np.random.SeedSequence([int(secret, 16), *parts]).generate_state(1, dtype=np.uint64)[0])
