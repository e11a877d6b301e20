"""The private session of a training run: DP-SGD as one object that the one training loop runs.

Like Opacus' ``PrivacyEngine``, a :class:`PrivacySession` owns everything DP adds to a run — the units of privacy,
the calibrated plan, the secret seed of sampling and noise, the accountant, the released class counts — and
answers the loop's questions (:class:`augflow.train.session.Session`): which batch to take, how to take a step,
when to stop, what to store in a checkpoint and which ledger to write. The private state is fixed at the run's
start and continued exactly on ``--resume``, whatever ``train.epochs`` says then.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from augflow.errors import PrivacyError, PrivacyWarning
from augflow.models import ModelFamily
from augflow.precision import PrecisionWarning, resolve_amp
from augflow.train.privacy.accounting import (
    PrivacyPlan,
    make_accountant,
    plan_privacy,
    release_class_counts,
    spent_epsilon,
)
from augflow.train.privacy.checks import check_model, validate_config
from augflow.train.privacy.gradients import PrivateStep
from augflow.train.privacy.ledger import Ledger
from augflow.train.privacy.public import public_initialize, template_mask
from augflow.train.privacy.sampling import Units, make_units, new_secret, poisson_sample, secret_seed
from augflow.train.privacy.trainable import select_trainable
from augflow.train.recipe import Recipe
from augflow.train.rows import TrainingRows
from augflow.train.session import StepStats

if TYPE_CHECKING:
    from augflow.train.init_from import InitFrom

_INITIALIZATION = {"identity": "identity (no data)", "template": "MNI152 template slices (public)"}


class PrivacySession:
    """A differentially private run (DP-SGD with Poisson sampling); open one with :meth:`open`.

    Arguments:
        recipe: The run's recipe (``[privacy]`` validated).
        data: The run's rows.
        units: The units of privacy of the training rows.
        plan: The calibrated plan.
        secret: The secret seed (hex) of the private randomness.
        accountant: The Opacus accountant, holding the steps taken.
        class_counts: The released training class counts.
        counts_info: How they were released.
        amp: Whether the networks run in bf16 (never on a CPU under DP: per-sample gradients are slower there).
        init: The declared-public model the run started from (``--init-from``), or None.
    """

    releases_validation = False  # the last weights, without a statistic of the private validation data

    def __init__(self, recipe: Recipe, data: TrainingRows, units: Units, plan: PrivacyPlan, secret: str, accountant,
                 class_counts: list[int], counts_info: dict, amp: bool = False, init: InitFrom | None = None):
        self.cfg, self.data, self.units, self.plan, self.amp = recipe.privacy, data, units, plan, amp
        self.init, self.trained = init, None  # trained: what privacy.trainable selected (set by trainable())
        self.mask_file = recipe.train.app_mask
        self.secret, self.accountant = secret, accountant
        self.class_counts, self.counts_info = class_counts, counts_info
        self.data_class_counts = class_counts  # the whole file's counts are private: a top-up balances the released
        self.steps_per_epoch = math.ceil(units.count / recipe.train.batch_size)

    @classmethod
    def open(cls, recipe: Recipe, data: TrainingRows, device: torch.device, world: int = 1,
             saved: dict | None = None, init: InitFrom | None = None) -> PrivacySession:
        """Check a run's DP settings, then plan it (a new run) or continue its saved state (``--resume``).

        Arguments:
            recipe: The run's recipe (``[privacy] enabled``).
            data: The run's rows.
            device: The training device.
            world: Processes under torchrun (must be 1).
            saved: The checkpoint being resumed, or None.
            init: The model the run starts from (``--init-from``, checked to be declared public), or None.

        Raises:
            PrivacyError: For invalid settings, torchrun, class-balanced sampling, delta >= 1/N, a budget no
                noise level reaches, or frozen parameters (``privacy.trainable``) without a declared-public init.
        """
        pcfg, cfg = validate_config(recipe.privacy), recipe.train
        if pcfg.trainable != "all" and not (init is not None and init.declared_public):
            raise PrivacyError(f"privacy.trainable = {pcfg.trainable!r} freezes the other parameters, which under DP "
                               f"is allowed only for weights loaded from a model trained on public data: their values "
                               f"are released without being covered by the accounting; give --init-from MODEL "
                               f"--init-from-public, or set privacy.trainable = \"all\"")
        amp = resolve_amp(cfg.amp, device)
        if world > 1:
            raise PrivacyError("DP training runs in one process: under torchrun every process would need its "
                               "share of one Poisson sample and of the noise, which augflow does not implement; "
                               "run augflow train --dp without torchrun")
        if cfg.balanced_sampling:
            raise PrivacyError("train.balanced_sampling cannot be combined with DP: the accountant's analysis "
                               "needs uniform Poisson sampling, and class-weighted draws depend on the private "
                               "labels; set train.balanced_sampling = false (synthesize --balance tops up classes)")
        if amp and device.type == "cpu":
            warnings.warn("train.amp is not used for DP training on a CPU: per-sample gradients under bf16 autocast "
                          "are exact but about 3x slower there (oneDNN's bf16 grouped convolutions, measured in "
                          "reports/benchmarks-dp.md); the run uses float32", PrecisionWarning, stacklevel=4)
            amp = False
        units = make_units(pcfg.unit, data.subjects)
        most = int(make_units("subject", data.subjects).sizes.max())
        if pcfg.unit == "slice" and most > 1:
            warnings.warn(f"DP protects one slice, but subjects of {data.info.path} have up to {most} slices: a "
                          f"subject is protected only at the group-privacy level (about {most} x epsilon). Use "
                          f"--dp-unit subject for a per-subject guarantee.", PrivacyWarning, stacklevel=4)
        if saved is not None:
            state = saved["privacy"]["state"]
            plan = PrivacyPlan(**state["plan"])
            accountant = make_accountant(plan.accountant, state["accountant"])
            return cls(recipe, data, units, plan, state["secret"], accountant, state["class_counts"],
                       state["counts_info"], amp, init)
        planned = cfg.epochs * math.ceil(units.count / cfg.batch_size)
        plan = plan_privacy(pcfg, units.count, cfg.batch_size, planned)
        secret = new_secret()
        counts, counts_info = release_class_counts(data.train.labels, units, data.info.num_classes, pcfg,
                                                   plan.epsilon_counts, secret_seed(secret, 0))
        return cls(recipe, data, units, plan, secret, make_accountant(plan.accountant), counts, counts_info, amp,
                   init)

    def app_mask(self, height: int, width: int) -> Tensor:
        """Never the private images' mean: Otsu on the public template."""
        return template_mask(height, width)

    def initialize(self, model: ModelFamily) -> None:
        """From public data only (``privacy.actnorm_init``)."""
        public_initialize(model, self.cfg.actnorm_init)

    def trainable(self, model: ModelFamily) -> list[nn.Parameter]:
        """Freeze what ``privacy.trainable`` leaves out (the re-initialised entries are always trained), refuse a
        model DP-SGD cannot train privately (frozen parameters only from a declared-public init); return the
        trained parameters with elements (DPOptimizer cannot clip an empty one, such as the LU factors of a
        1-channel 1x1 convolution). Per-sample gradients and the DPOptimizer then see only these."""
        init = self.init
        names, self.trained = select_trainable(model, self.cfg.trainable, init.reinitialized if init else ())
        for name, p in model.named_parameters():
            if name not in names:
                p.requires_grad_(False)  # never the reverse: a family's own frozen part stays frozen (and refused)
        check_model(model, {n for n, _ in model.named_parameters() if init is not None and init.is_public(n)})
        return [p for p in model.parameters() if p.requires_grad and p.numel() > 0]

    def attach(self, objective: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.private_step = PrivateStep(objective, optimizer, self.plan, self.cfg.microbatch)

    def last_step(self, wanted: int) -> int:
        """``wanted``, or the last step before one more would exceed ``privacy.epsilon`` (with a warning)."""
        allowed = self.plan.budget_steps(wanted)
        if allowed < wanted:
            warnings.warn(f"stopping after step {allowed} instead of {wanted}: one more step would exceed "
                          f"privacy.epsilon = {self.plan.target_epsilon} (the noise was calibrated for "
                          f"{self.plan.planned_steps} steps)", PrivacyWarning, stacklevel=3)
        return allowed

    def positions(self, step: int) -> np.ndarray:
        """Poisson sampling from the secret seed: which units were drawn is never released."""
        return poisson_sample(self.units, self.plan.sample_rate, secret_seed(self.secret, 1, step))

    def step(self, x: Tensor, y: Tensor, step: int) -> StepStats:
        """Clip, sum and noise the per-sample gradients of the batch, apply them and account for the step."""
        stats = self.private_step.step(x, y, secret_seed(self.secret, 2, step))
        self.accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        return StepStats(stats["loss"], stats["grad_norm"], {"batch": stats["batch"], "clipped": stats["clipped"]})

    def ledger(self, model: ModelFamily) -> Ledger:
        """The ledger after the steps in the accountant's history."""
        steps = sum(int(h[2]) for h in self.accountant.history)
        init = None if self.init is None else {**self.init.record(), "trainable": self.trained}
        return Ledger.with_dp(self.plan, spent_epsilon(self.accountant, self.plan.delta), steps, self.counts_info,
                              self.data.fingerprint, self._public_inputs(model), init)

    def state(self) -> dict:
        """The private state a checkpoint keeps (never released: it holds the secret seed)."""
        return {"plan": self.plan.to_dict(), "secret": self.secret,
                "accountant": [list(h) for h in self.accountant.history], "class_counts": self.class_counts,
                "counts_info": self.counts_info}

    def _public_inputs(self, model: ModelFamily) -> dict:
        """What the model took from outside the private training data."""
        if self.init is not None:
            loaded = f"the --init-from model {self.init.model} (declared public), loaded with its weights"
            return {"app_mask": loaded if model.config.uses_app_mask else "not used by this model",
                    "initialization": f"{loaded}; see init_from"}
        if not model.config.uses_app_mask:
            mask = "not used by this model"
        elif self.mask_file:
            mask = f"user file {self.mask_file} (declared public)"
        else:
            mask = "MNI152 ICBM 2009a template (nilearn), Otsu on its 11 central coronal slices"
        return {"app_mask": mask, "initialization": _INITIALIZATION[self.cfg.actnorm_init]}
