"""Differentially private training: DP-SGD with exact per-sample gradients, and the privacy ledger.

DP wraps the one training loop (:mod:`augflow.train.loop`), it does not fork it. Under ``privacy.enabled``:

- **Sampling.** Each step takes every unit of privacy independently with probability ``q = batch_size / N``
  (Poisson sampling, the setting of the accountants' analysis). A unit is one slice (``unit = "slice"``) or one
  subject (``unit = "subject"``: a sampled subject contributes one of its slices, drawn uniformly, so each step
  touches a subject at most once and ``q`` and ``N`` count subjects).
- **Per-sample gradients.** ``torch.func.vmap(torch.func.grad(...))`` of the model's per-sample objective through
  ``functional_call``, over the *whole model*: exact also for log-determinant terms of ActNorm and the LU 1x1
  convolution, which Opacus' hook and functorch modes silently drop (see the design notes). They are assigned to
  ``p.grad_sample`` and clipped, summed and noised by :class:`opacus.optimizers.DPOptimizer` (its "no_op" use: the
  optimizer only reads ``p.grad_sample``). A Poisson batch is processed in microbatches of ``privacy.microbatch``
  examples; each is a virtual step (``signal_skip_step``) that clips and accumulates, and the Gaussian noise
  ``N(0, sigma^2 C^2)`` is added once per Poisson batch, even an empty one.
- **Accounting.** The noise multiplier ``sigma`` is calibrated with
  :func:`opacus.accountants.utils.get_noise_multiplier` so that the planned number of steps (``train.epochs``
  passes over the units) spends exactly the DP-SGD part of the budget; an :class:`~opacus.accountants.RDPAccountant`
  or :class:`~opacus.accountants.PRVAccountant` is stepped once per step, saved in every checkpoint and continued
  on ``--resume``; training stops before the budget would be exceeded.
- **Nothing private outside the accounting.** The application mask and the ActNorm initialisation come from the
  public MNI152 template shipped with nilearn (or a mask file the user declares public); the training class
  counts stored with the model are declared public or released with the Laplace mechanism, whose epsilon is
  composed into the ledger (basic composition); the released model is the last one (no selection on private
  validation data); the sampling and noise are drawn from a secret seed (OS entropy) kept only in the private
  ``checkpoint.pt``, so a resumed run is exact while the released model does not reveal them.

The guarantee is (epsilon, delta)-DP of the released model (and everything made from it) with respect to adding or
removing one unit of the training file; the dataset size N is treated as public, as in Abadi et al. The run folder
itself (``checkpoint.pt``, ``metrics.jsonl`` with validation losses) is the data holder's and is not covered.

References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016, arXiv:1607.00133 (DP-SGD).
    Mironov, "Renyi Differential Privacy", 2017, arXiv:1702.07476 (RDP accountant).
    Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019,
    arXiv:1908.10530.
    Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy", 2021, arXiv:2106.02848 (PRV).
    Dwork, McSherry, Nissim & Smith, "Calibrating Noise to Sensitivity in Private Data Analysis", 2006
    (Laplace mechanism).
    Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021, arXiv:2109.12298.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from augflow.config import PrivacyConfig
from augflow.errors import ConfigError

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
UNITS = ("slice", "subject")
ACTNORM_INITS = ("template", "identity")
DELTA_RULE = "largest power of 10 at most 1/(10 N)"
# T1 values of the 11 central coronal MNI152 slices, the public images of the mask and of ActNorm's initialisation.
_TEMPLATE_KEY = "t1"
_REFERENCES = [
    "Abadi et al. 2016, arXiv:1607.00133 (DP-SGD)",
    "Mironov 2017, arXiv:1702.07476 (RDP)",
    "Gopi et al. 2021, arXiv:2106.02848 (PRV)",
]


class PrivacyError(ConfigError):
    """A differential-privacy setting or model cannot give the promised guarantee."""


class PrivacyWarning(UserWarning):
    """The guarantee holds, but may protect less than the user expects (e.g. per slice, not per subject)."""


# ------------------------------------------------------------------------------------------------ settings


def validate_config(cfg: PrivacyConfig) -> PrivacyConfig:
    """Check every ``[privacy]`` field; return ``cfg``.

    Raises:
        PrivacyError: Naming the key, the allowed values and the value received.
    """

    def bad(key: str, allowed: str, value: Any) -> PrivacyError:
        return PrivacyError(f"privacy.{key} must be {allowed}, but is: {value!r}")

    if not (isinstance(cfg.epsilon, int | float) and 0 < cfg.epsilon < math.inf):
        raise bad("epsilon", "a finite number > 0 under DP (--epsilon E)", cfg.epsilon)
    if not (isinstance(cfg.delta, int | float) and 0 <= cfg.delta < 1):
        raise bad("delta", "in [0, 1) (0: the default rule, " + DELTA_RULE + ")", cfg.delta)
    if not (isinstance(cfg.max_grad_norm, int | float) and 0 < cfg.max_grad_norm < math.inf):
        raise bad("max_grad_norm", "a finite number > 0", cfg.max_grad_norm)
    if cfg.accountant not in ACCOUNTANTS:
        raise bad("accountant", f"one of {sorted(ACCOUNTANTS)}", cfg.accountant)
    if cfg.unit not in UNITS:
        raise bad("unit", f"one of {list(UNITS)}", cfg.unit)
    if not (isinstance(cfg.microbatch, int) and cfg.microbatch >= 1):
        raise bad("microbatch", "an int >= 1", cfg.microbatch)
    if not (isinstance(cfg.count_epsilon_fraction, int | float) and 0 < cfg.count_epsilon_fraction < 1):
        raise bad("count_epsilon_fraction", "in (0, 1) (or set privacy.public_class_counts = true)",
                  cfg.count_epsilon_fraction)
    if not (isinstance(cfg.max_slices_per_subject, int) and cfg.max_slices_per_subject >= 1):
        raise bad("max_slices_per_subject", "an int >= 1", cfg.max_slices_per_subject)
    if cfg.actnorm_init not in ACTNORM_INITS:
        raise bad("actnorm_init", f"one of {list(ACTNORM_INITS)}", cfg.actnorm_init)
    return cfg


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


def check_model(model: nn.Module) -> None:
    """Refuse modules that break the per-sample DP-SGD analysis.

    Like Opacus' ``ModuleValidator``, but it names the module and also catches weight/spectral normalisation and
    frozen pretrained parameters (fitted outside the accounting, yet released with the model).

    Raises:
        PrivacyError: Naming the first incompatible module, its type and why.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    blocker = getattr(model, "dp_blocker", None)  # a family's own reason (MedSymmFlow's non-private autoencoder)
    if blocker:
        raise PrivacyError(f"--dp: {type(model).__name__}: {blocker}")
    for name, module in model.named_modules():
        reason = None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            reason = ("BatchNorm mixes the examples of a batch, so one example's gradient depends on the others and "
                      "clipping no longer bounds its influence; its running statistics are also computed from the "
                      "private data outside the clipped gradients. Use GroupNorm (or opacus ModuleValidator.fix)")
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            reason = "its running statistics are computed from the private data outside the clipped gradients"
        elif any(isinstance(h, WeightNorm | SpectralNorm) for h in module._forward_pre_hooks.values()):
            reason = ("weight_norm/spectral_norm hooks recompute the weight outside the parameters the per-sample "
                      "gradients are taken of; use plain layers")
        elif parametrize.is_parametrized(module) and any(
                type(p).__name__ in ("_WeightNorm", "_SpectralNorm")
                for plist in module.parametrizations.values() for p in plist):
            reason = "weight_norm/spectral_norm parametrisations are not supported by DP-SGD here; use plain layers"
        elif any(not p.requires_grad and p.numel() for p in module.parameters(recurse=False)):
            reason = ("it has frozen (pretrained) parameters, which are released with the model but were fitted "
                      "outside the DP accounting (e.g. an autoencoder trained on the private images); train in pixel "
                      "space under DP")
        if reason:
            raise PrivacyError(f"the model is not compatible with DP-SGD: module {name or '<root>'!r} "
                               f"({type(module).__name__}): {reason}")


# ------------------------------------------------------------------------------------------------ public data


def template_images(shape: tuple[int, int, int]) -> Tensor:
    """Public images: the 11 central coronal slices of the MNI152 T1 template shipped with nilearn.

    Oriented and framed as the built-in data and ``augflow prepare`` show slices (superior up, neurological,
    197 mm square field of view), resized with anti-aliasing and scaled so the 99.5th percentile of brain pixels
    is 1. Nothing of the training data enters them.

    Arguments:
        shape: ``(C, H, W)``; the gray image is repeated over the ``C`` channels.

    Returns:
        ``(11, C, H, W)`` float32 in ``[0, 1]``.
    """
    import nibabel as nib

    from augflow.data.phantom import _TEMPLATE_FILES, CENTRE_Y, MAX_OFFSET, _to_grid, template_dir

    channels, height, width = shape
    path = template_dir() / _TEMPLATE_FILES[_TEMPLATE_KEY]
    if not path.is_file():
        raise PrivacyError(f"the public template {path} is missing; reinstall nilearn (>= 0.10) or give a "
                           f"public mask with train.app_mask")
    slab = np.asarray(nib.load(path).dataobj[:, CENTRE_Y - MAX_OFFSET:CENTRE_Y + MAX_OFFSET + 1, :], np.float64)
    images = _to_grid(slab / 255.0, max(height, width))  # (11, S, S)
    brain = images > 0.02
    images = np.clip(images / np.percentile(images[brain], 99.5), 0, 1)
    x = torch.from_numpy(images).float()[:, None]  # (11, 1, S, S)
    if (height, width) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(height, width), mode="area").clamp(0, 1)
    return x.expand(-1, channels, -1, -1).contiguous()


def template_mask(height: int, width: int) -> Tensor:
    """The application mask from public data: Otsu on the mean of :func:`template_images` (as the non-private
    path does on the training mean image)."""
    from augflow.flows import brain_mask_from_images

    return brain_mask_from_images(template_images((1, height, width)))


@torch.no_grad()
def public_initialize(model: nn.Module, how: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """Initialise a model without private data: ``"identity"`` leaves ActNorm at the identity; ``"template"``
    runs the family's data-dependent ``initialize`` on :func:`template_images` (labels cycling over the classes;
    the couplings start as the identity, so the labels do not change ActNorm's statistics)."""
    if how == "identity":
        return
    ref = next(model.parameters())
    x = template_images(shape).to(ref.device, ref.dtype)
    y = torch.arange(len(x), device=ref.device) % num_classes
    model.initialize(x, y)


# ------------------------------------------------------------------------------------------------ sampling


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


# ------------------------------------------------------------------------------------------------ accounting


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
    """Check the settings and calibrate the noise multiplier of a run.

    Arguments:
        cfg: The ``[privacy]`` settings (``enabled``).
        population: Units of privacy in the training set.
        expected_batch_size: Expected Poisson batch (``train.batch_size``).
        planned_steps: The run's planned steps.

    Returns:
        The :class:`PrivacyPlan`.

    Raises:
        PrivacyError: For invalid settings, delta >= 1/N or a budget no noise level reaches.
    """
    validate_config(cfg)
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


# ------------------------------------------------------------------------------------------------ label counts


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


# ------------------------------------------------------------------------------------------------ DP-SGD


class PerSampleGradients:
    """Exact per-sample gradients of a per-sample objective: ``vmap(grad(loss of one example))`` over
    ``functional_call`` of the whole module, so every term (log-determinants included) is differentiated.

    Arguments:
        objective: A module whose ``forward(x, y)`` returns per-sample losses ``(B,)``.

    Call with ``(x, y)`` to get ``(grads, losses)``: a dict parameter name -> ``(B, *shape)`` and ``(B,)``.
    Randomness inside the objective (dropout) differs per example (``randomness="different"``).
    """

    def __init__(self, objective: nn.Module):
        self.objective = objective

        def loss(params: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return functional_call(objective, (params, fixed), (x[None], y[None]))[0]  # one example as a batch of 1

        self._fn = vmap(grad_and_value(loss), in_dims=(None, None, 0, 0), randomness="different")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        params = {n: p.detach() for n, p in self.objective.named_parameters() if p.requires_grad}
        fixed = {n: p.detach() for n, p in self.objective.named_parameters() if not p.requires_grad}
        fixed.update(self.objective.named_buffers())
        return self._fn(params, fixed, x, y)


class PrivateStep:
    """One DP-SGD step (Abadi et al. 2016) on a Poisson batch, with Opacus' DPOptimizer clipping and noising.

    Arguments:
        objective: Per-sample objective module (``forward(x, y) -> (B,)``).
        optimizer: The wrapped optimizer (AdamW), over the objective's non-empty trainable parameters.
        plan: The calibrated :class:`PrivacyPlan`.
        microbatch: Examples per vmap call, and per virtual step.
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, plan: PrivacyPlan, microbatch: int):
        self.grads = PerSampleGradients(objective)
        self.named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad and p.numel() > 0]
        self.microbatch = microbatch
        self.max_grad_norm = plan.max_grad_norm
        # loss_reduction="mean" divides the noisy sum by the *expected* batch size, as Poisson sampling requires.
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size,
                                     loss_reduction="mean")

    def step(self, x: Tensor, y: Tensor, noise_seed: int) -> dict[str, float | None]:
        """Clip, sum, noise and apply the gradients of a batch ``x, y`` (any size, 0 included).

        Returns:
            ``{"loss", "batch", "grad_norm", "clipped"}``: the mean per-sample loss (None for an empty batch), the
            batch size, the median per-sample gradient norm before clipping and the fraction clipped.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        opt.generator = torch.Generator(x.device).manual_seed(noise_seed)
        starts = list(range(0, len(x), self.microbatch)) or [0]
        losses, norms = [], []
        for i, start in enumerate(starts):
            xb, yb = x[start:start + self.microbatch], y[start:start + self.microbatch]
            if len(xb):
                grads, loss = self.grads(xb, yb)
            else:  # an empty Poisson batch still takes a (noise-only) step: the analysis counts every step
                grads, loss = {n: p.new_zeros((0, *p.shape)) for n, p in self.named}, x.new_zeros(0)
            squares = x.new_zeros(len(xb))
            for name, p in self.named:
                p.grad_sample = grads[name]
                squares = squares + grads[name].reshape(len(xb), -1).pow(2).sum(1)
            norms.append(squares.sqrt())
            losses.append(loss.detach())
            last = i == len(starts) - 1
            if not last:
                opt.signal_skip_step(True)  # a virtual step: clip and accumulate only
            opt.step()
            if not last:
                opt.zero_grad(set_to_none=True)  # frees this microbatch's per-sample gradients, keeps the sums
        norm, loss = torch.cat(norms), torch.cat(losses)
        return {"loss": loss.mean().item() if len(loss) else None, "batch": len(loss),
                "grad_norm": norm.median().item() if len(norm) else None,
                "clipped": (norm > self.max_grad_norm).float().mean().item() if len(norm) else None}


# ------------------------------------------------------------------------------------------------ ledger


def non_private_ledger(fingerprint: dict) -> dict:
    """The ledger of a model trained without DP: it says so, and states no epsilon."""
    return {"dp": False, "guarantee": "none: trained without differential privacy",
            "dataset_fingerprint": fingerprint}


def private_ledger(plan: PrivacyPlan, accountant: IAccountant, counts_info: dict, fingerprint: dict,
                   public_inputs: dict) -> dict:
    """The privacy ledger of a DP model after the steps in ``accountant``'s history.

    ``epsilon`` is the total: the accountant's DP-SGD epsilon at ``delta`` plus the label-count epsilon (basic
    composition of the Laplace release with the DP-SGD mechanism).
    """
    steps = sum(int(h[2]) for h in accountant.history)
    eps_sgd = spent_epsilon(accountant, plan.delta)
    subject = plan.unit == "subject"
    return {
        "dp": True,
        "epsilon": eps_sgd + counts_info["epsilon"],
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": steps,
        "max_grad_norm": plan.max_grad_norm,
        "unit": plan.unit,
        "epsilon_sgd": eps_sgd,
        "epsilon_class_counts": counts_info["epsilon"],
        "class_counts_release": counts_info,
        "target_epsilon": plan.target_epsilon,
        "planned_steps": plan.planned_steps,
        "delta_rule": plan.delta_rule,
        "population": plan.population,
        "expected_batch_size": plan.expected_batch_size,
        "sampling": ("Poisson over subjects, one uniformly drawn slice per sampled subject" if subject
                     else "Poisson over slices"),
        "protects": (f"adding or removing one {plan.unit} of the training file"
                     + ("" if subject else "; a subject with k slices is protected only at group-privacy level "
                        "(about k * epsilon): use --dp-unit subject for a per-subject guarantee")),
        "composition": "epsilon = epsilon_sgd (accountant) + epsilon_class_counts (basic composition)",
        "public_inputs": {**public_inputs, "dataset_size": "N treated as public"},
        "model_selection": "last weights (no selection on private validation data)",
        "randomness": "Poisson sampling and Gaussian noise from a secret OS-entropy seed kept only in checkpoint.pt",
        "dataset_fingerprint": fingerprint,
        "references": _REFERENCES,
    }


def model_summary(path: str | Path) -> dict:
    """What ``augflow info`` shows of a trained model (a run folder or a model file): classes, training step and
    the privacy ledger (``meta["privacy"]``; None for models from before the ledger existed).

    Raises:
        ConfigError: If there is no model at ``path``.
    """
    from augflow.models import load_model
    from augflow.synthesize import model_file

    file = model_file(path)
    model, meta = load_model(file, with_meta=True)
    return {"path": str(file), "family": getattr(model, "family", "magic"),
            "image_shape": list(model.config.image_shape), "class_names": meta.get("class_names"),
            "class_counts": meta.get("class_counts"), "step": meta.get("step"), "loss_name": meta.get("loss_name"),
            "privacy": meta.get("privacy")}
