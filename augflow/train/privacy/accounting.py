"""Accounting: the noise calibrated to the budget, the accountants, and the noisy release of the class counts.

The noise multiplier ``sigma`` is calibrated with :func:`opacus.accountants.utils.get_noise_multiplier` so that the
planned number of steps (``train.epochs`` passes over the units) spends exactly the DP-SGD part of the budget; an
:class:`~opacus.accountants.RDPAccountant` or :class:`~opacus.accountants.PRVAccountant` is stepped once per step,
saved in every checkpoint and continued on ``--resume``. The class counts stored with the model are declared public
or released with the Laplace mechanism, whose epsilon is composed into the total (basic composition).

References:
    Mironov, "Renyi Differential Privacy", 2017, arXiv:1702.07476 (RDP accountant).
    Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy", 2021, arXiv:2106.02848 (PRV).
    Dwork, McSherry, Nissim & Smith, "Calibrating Noise to Sensitivity in Private Data Analysis", 2006
    (Laplace mechanism).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from augflow.errors import PrivacyError
from augflow.train.privacy.sampling import Units
from augflow.train.recipe import PrivacyConfig

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
DELTA_RULE = "largest power of 10 at most 1/(10 N)"


def default_delta(population: int) -> float:
    """The default delta: the largest power of 10 at most ``1 / (10 N)`` (N = 950 gives 1e-4)."""
    return 10.0 ** -math.ceil(math.log10(10 * population))


def check_delta(delta: float, population: int, unit: str) -> None:
    """Refuse ``delta >= 1/N``.

    Raises:
        PrivacyError: At ``delta >= 1/N`` the guarantee is void: the mechanism that publishes one randomly chosen
            record in full is (0, 1/N)-DP.
    """
    if not 0 < delta < 1 / population:
        raise PrivacyError(
            f"privacy.delta must be in (0, 1/N) = (0, {1 / population:.3g}) for N = {population} training "
            f"{unit}s, but is: {delta!r}. delta is the probability that the guarantee fails outright: at delta >= "
            f"1/N, publishing one randomly chosen {unit} in full would satisfy it. Use delta << 1/N (default: "
            f"{default_delta(population):g}, the {DELTA_RULE}).")


def make_accountant(name: str, history: list | None = None) -> IAccountant:
    """An Opacus accountant (``"rdp"`` or ``"prv"``) holding ``history`` = ``[(sigma, q, steps), ...]``."""
    accountant = ACCOUNTANTS[name]()
    accountant.history = [tuple(h) for h in history or []]
    return accountant


@contextmanager
def _quiet_accountants() -> Iterator[None]:
    """Silence two harmless accountant warnings: RDP's when its best order is the largest (the bound is then
    conservative, not wrong) and PRV's ``log(1 - q)`` at ``q = 1`` (no subsampling)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants")
        yield


def spent_epsilon(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent by an accountant's history at ``delta`` (0 before the first step)."""
    if not accountant.history:
        return 0.0
    with _quiet_accountants():
        return float(accountant.get_epsilon(delta=delta))


@dataclass
class PrivacyPlan:
    """The calibrated DP-SGD of one run (fixed at its start, stored in its checkpoint).

    Attributes:
        target_epsilon: Total budget, the label counts included.
        epsilon_counts: Part of the budget spent on the class counts (0 if declared public).
        delta: Delta of the guarantee.
        delta_rule: How delta was chosen.
        accountant: ``"rdp"`` or ``"prv"``.
        noise_multiplier: ``sigma``; the noise SD is ``sigma * max_grad_norm`` on the summed clipped gradients.
        sample_rate: Poisson sampling rate ``q = expected_batch_size / population``.
        planned_steps: Steps at which DP-SGD reaches ``target_epsilon - epsilon_counts``.
        max_grad_norm: Per-sample clipping norm ``C``.
        unit: ``"slice"`` or ``"subject"``.
        population: Number of units ``N`` of the training set (treated as public).
        expected_batch_size: ``train.batch_size``.
    """

    target_epsilon: float
    epsilon_counts: float
    delta: float
    delta_rule: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    max_grad_norm: float
    unit: str
    population: int
    expected_batch_size: int

    @property
    def epsilon_sgd_budget(self) -> float:
        return self.target_epsilon - self.epsilon_counts

    def epsilon_sgd(self, steps: int) -> float:
        """Epsilon of ``steps`` DP-SGD steps, from a fresh accountant."""
        return spent_epsilon(make_accountant(self.accountant, [(self.noise_multiplier, self.sample_rate, steps)]),
                             self.delta) if steps else 0.0

    def budget_steps(self, wanted: int) -> int:
        """The most steps, up to ``wanted``, whose epsilon stays within the DP-SGD budget (at least the plan's)."""
        if wanted <= self.planned_steps:
            return wanted
        def within(steps: int) -> bool:
            return self.epsilon_sgd(steps) <= self.epsilon_sgd_budget

        lo, hi = self.planned_steps, wanted  # within(lo) holds by calibration
        if within(hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if within(mid) else (lo, mid)
        return lo

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_privacy(cfg: PrivacyConfig, population: int, expected_batch_size: int, planned_steps: int) -> PrivacyPlan:
    """Calibrate the noise multiplier of a run.

    Arguments:
        cfg: The ``[privacy]`` settings (``enabled``; checked by :func:`~augflow.train.privacy.checks.validate_config`).
        population: Units of privacy in the training set.
        expected_batch_size: Expected Poisson batch (``train.batch_size``).
        planned_steps: The run's planned steps.

    Returns:
        The :class:`PrivacyPlan`.

    Raises:
        PrivacyError: For no planned step, delta >= 1/N or a budget no noise level reaches.
    """
    if planned_steps < 1:
        raise PrivacyError(f"DP training needs at least one planned step, but plans: {planned_steps}")
    delta = cfg.delta or default_delta(population)
    check_delta(delta, population, cfg.unit)
    epsilon_counts = 0.0 if cfg.public_class_counts else cfg.count_epsilon_fraction * cfg.epsilon
    sample_rate = min(1.0, expected_batch_size / population)
    budget = cfg.epsilon - epsilon_counts
    with _quiet_accountants():
        try:
            # The tolerance is what "exactly" means: the plan ends within 0.5% (at most 0.01) below the budget.
            sigma = get_noise_multiplier(target_epsilon=budget, target_delta=delta, sample_rate=sample_rate,
                                         steps=planned_steps, accountant=cfg.accountant,
                                         epsilon_tolerance=min(0.01, 0.005 * budget))
        except ValueError as e:
            raise PrivacyError(f"privacy.epsilon = {cfg.epsilon}: no noise level reaches it in {planned_steps} "
                               f"steps at q = {sample_rate:.3g} ({e})") from None
    return PrivacyPlan(
        target_epsilon=float(cfg.epsilon), epsilon_counts=epsilon_counts, delta=delta,
        delta_rule="user" if cfg.delta else DELTA_RULE, accountant=cfg.accountant, noise_multiplier=float(sigma),
        sample_rate=sample_rate, planned_steps=planned_steps, max_grad_norm=float(cfg.max_grad_norm), unit=cfg.unit,
        population=population, expected_batch_size=expected_batch_size)


def release_class_counts(labels: np.ndarray, units: Units, num_classes: int, cfg: PrivacyConfig, epsilon: float,
                         seed: int) -> tuple[list[int], dict]:
    """The training class counts to store with the model, and how they were released.

    Declared public: the exact counts. Otherwise the Laplace mechanism: adding or removing one slice changes one
    count by 1 (L1 sensitivity 1); under ``unit = "subject"`` each subject's class histogram is scaled to at most
    ``max_slices_per_subject`` slices (sensitivity ``max_slices_per_subject``). Noise ``Laplace(sensitivity /
    epsilon)`` per class gives epsilon-DP; rounding and clamping to >= 1 are post-processing.

    Returns:
        ``(counts, info)``: one count per class, and the release description for the ledger.
    """
    exact = np.bincount(labels, minlength=num_classes)
    if cfg.public_class_counts:
        return exact.tolist(), {"release": "public (declared by the user: privacy.public_class_counts = true)",
                                "epsilon": 0.0}
    if units.kind == "slice":
        histogram, sensitivity = exact.astype(np.float64), 1.0
    else:
        cap = cfg.max_slices_per_subject
        histogram = np.zeros(num_classes)
        for start, size in zip(units.starts, units.sizes, strict=True):
            own = np.bincount(labels[units.order[start:start + size]], minlength=num_classes).astype(np.float64)
            histogram += own * min(1.0, cap / own.sum())
        sensitivity = float(cap)
    noisy = histogram + np.random.default_rng(seed).laplace(0.0, sensitivity / epsilon, num_classes)
    counts = np.maximum(1, np.rint(noisy)).astype(np.int64)
    return counts.tolist(), {"release": "Laplace mechanism", "epsilon": epsilon, "l1_sensitivity": sensitivity,
                             "noise_scale": sensitivity / epsilon}
