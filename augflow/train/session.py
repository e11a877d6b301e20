"""How a run draws its batches, takes its steps and accounts for them: the session the training loop runs.

The loop (:mod:`augflow.train.loop`) is the same for every run; what differs between a plain run and a
differentially private one is a :class:`Session`: :class:`PlainSession` (shuffled or class-balanced epochs, DDP
under torchrun, gradient clipping, optional bfloat16 autocast) or
:class:`~augflow.train.privacy.session.PrivacySession` (Poisson sampling, clipped and noised per-sample gradients, an
accountant, public-only initialisation); the loop opens the one its recipe asks for.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from augflow.flows import brain_mask_from_images, dequantize
from augflow.models import ModelFamily
from augflow.precision import resolve_amp
from augflow.runs import derive_seed
from augflow.train.privacy.ledger import Ledger
from augflow.train.recipe import TrainConfig
from augflow.train.rows import TrainingRows

if TYPE_CHECKING:
    from augflow.train.init_from import InitFrom


class StepStats(NamedTuple):
    """What one optimisation step reports for ``metrics.jsonl``."""

    loss: float | None  # mean per-sample loss (None for an empty Poisson batch)
    grad_norm: float | None
    extra: dict  # logged after the learning rate (DP: the batch size and the fraction clipped)


class Session(Protocol):
    """What the loop asks of a run's session.

    Attributes:
        amp: Whether the networks run in bf16 (:mod:`augflow.precision`): ``train.amp`` where the device runs
            bf16 natively.
        steps_per_epoch: Steps of one pass over the training units.
        class_counts: The training class counts stored with the model (under DP: released with noise or declared
            public).
        data_class_counts: The class counts of the whole training file, which a synthetic top-up balances (also
            the part held out for validation when there is no ``--val``); under DP the released ``class_counts``.
        releases_validation: Whether the released model may depend on the validation data: kept best by
            validation loss, which is recorded with it (plain); or the last weights, without it (DP).
    """

    amp: bool
    steps_per_epoch: int
    class_counts: list[int]
    data_class_counts: list[int]
    releases_validation: bool

    def app_mask(self, height: int, width: int) -> Tensor:
        """The application (brain) mask when the recipe gives no mask file."""

    def initialize(self, model: ModelFamily) -> None:
        """Initialise a new model's data-dependent parts (MAGIC-Flow's ActNorm)."""

    def trainable(self, model: ModelFamily) -> list[nn.Parameter]:
        """The parameters the optimiser trains (refusing a model the session cannot train)."""

    def attach(self, objective: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take the per-sample objective and the optimiser the steps use."""

    def last_step(self, wanted: int) -> int:
        """The step the run ends at, at most ``wanted`` (DP: before the budget would be exceeded)."""

    def positions(self, step: int) -> np.ndarray:
        """The training positions of the batch of ``step``."""

    def step(self, x: Tensor, y: Tensor, step: int) -> StepStats:
        """One optimisation step on a dequantised, augmented batch."""

    def ledger(self, model: ModelFamily) -> Ledger:
        """The privacy ledger of the model after the steps taken."""

    def state(self) -> dict | None:
        """What a checkpoint keeps to continue the session exactly (None: nothing beyond the loop's state)."""


def epoch_order(n: int, labels: np.ndarray, num_classes: int, balanced: bool, seed: int, epoch: int) -> np.ndarray:
    """Positions of one epoch: a permutation, or class-balanced draws with replacement."""
    rng = np.random.default_rng(derive_seed(seed, 1, epoch))
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels, minlength=num_classes)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


# inductor options of train.compile: eager's random numbers (dropout, flow-matching noise), so a compiled run takes
# the steps an eager one takes
COMPILE_OPTIONS = {"fallback_random": True}


class PlainSession:
    """A run without DP: shuffled (or class-balanced) epochs, the mean loss's gradient clipped to
    ``train.grad_clip``; under torchrun each of the ``world`` processes takes every ``world``-th image of the global
    batch and DDP averages the gradients, so a run is the same at any world size. With ``train.compile`` the
    objective of full batches runs through ``torch.compile`` (inductor, with eager's random numbers).

    Arguments:
        cfg: The ``[train]`` settings.
        data: The run's rows.
        seed: The run's seed (batch order, initialisation batch).
        device: The training device (bf16 networks with ``train.amp`` where it runs bf16 natively).
        rank: This process's rank under torchrun (0 alone).
        world: The number of processes.
        init: The model the run started from (``--init-from``), recorded in the ledger, or None.
    """

    releases_validation = True

    def __init__(self, cfg: TrainConfig, data: TrainingRows, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1, init: InitFrom | None = None):
        self.cfg, self.data, self.seed, self.device, self.rank, self.world = cfg, data, seed, device, rank, world
        self.init = init
        self.amp = resolve_amp(cfg.amp, device)
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        self.class_counts = np.bincount(data.train.labels, minlength=data.info.num_classes).tolist()
        self.data_class_counts = np.bincount(data.info.labels, minlength=data.info.num_classes).tolist()
        self._order, self._order_epoch = np.zeros(0, dtype=np.int64), -1

    def app_mask(self, height: int, width: int) -> Tensor:
        """Otsu on the training mean image."""
        return brain_mask_from_images(torch.from_numpy(self.data.train.mean_image())[None])

    def initialize(self, model: ModelFamily) -> None:
        """The family's ``initialize`` on a fixed batch of the training data."""
        train = self.data.train
        init = np.random.default_rng(derive_seed(self.seed, 0)).permutation(len(train))[: max(64, self.cfg.batch_size)]
        x, y = train.batch(np.sort(init))
        with torch.no_grad():
            model.initialize(dequantize(x.to(self.device)), y.to(self.device))

    def trainable(self, model: ModelFamily) -> list[nn.Parameter]:
        return list(model.parameters())

    def attach(self, objective: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.objective, self.optimizer = objective, optimizer
        self.net = DistributedDataParallel(objective) if self.world > 1 else objective  # DDP's gradient hooks
        self.compiled = None
        if self.cfg.compile:
            self.compiled = torch.compile(self.net, options=COMPILE_OPTIONS)
            # torch 2.14's inductor calls its own deprecated helper; the warning is not the user's to act on
            warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated",
                                    category=FutureWarning)

    def last_step(self, wanted: int) -> int:
        return wanted

    def positions(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            train = self.data.train
            self._order = epoch_order(len(train), train.labels, self.data.info.num_classes,
                                      self.cfg.balanced_sampling, self.seed, epoch)
            self._order_epoch = epoch
        return self._order[within * self.cfg.batch_size:(within + 1) * self.cfg.batch_size]

    def step(self, x: Tensor, y: Tensor, step: int) -> StepStats:
        rank, world = self.rank, self.world
        loss = self._loss(x[rank::world], y[rank::world], full=len(x) == self.cfg.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        return StepStats(loss.item(), grad_norm, {})

    def _loss(self, x: Tensor, y: Tensor, full: bool) -> Tensor:
        """The mean loss through DDP's gradient hooks; compiled (``train.compile``) for full batches only: an epoch's
        short last batch runs eagerly instead of costing a second compilation for its shape."""
        if self.compiled is not None and full:
            from torch._dynamo.exc import BackendCompilerFailed  # loads with torch.compile only

            try:
                return self.compiled(x, y).mean()
            except BackendCompilerFailed as error:  # e.g. no C++ compiler for inductor's CPU kernels
                cause = error.inner_exception
                warnings.warn(f"train.compile: torch.compile failed ({type(cause).__name__}: "
                              f"{(str(cause).splitlines() or [''])[0]}); training without it", stacklevel=4)
                self.compiled = None
        return self.net(x, y).mean()

    def ledger(self, model: ModelFamily) -> Ledger:
        init = None if self.init is None else {**self.init.record(), "trainable": {"selection": "all"}}
        return Ledger.without_dp(self.data.fingerprint, init)

    def state(self) -> None:
        return None
