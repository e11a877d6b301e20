"""The training loop of ``augflow train``: any model family's objective, resumable exactly.

One loop for every use and family (:mod:`augflow.models`). Each step draws its randomness (batch order,
augmentation, dequantisation noise, dropout) from seeds derived from ``(seed, epoch)`` and ``(seed, step)``, so a
run killed and resumed from its last checkpoint continues with exactly the losses an uninterrupted run would have
produced.

Objective: the family's ``training_loss`` of uniformly dequantised images; for MAGIC-Flow the negative
log-likelihood in bits per dimension (Kingma & Dhariwal 2018, Glow, arXiv 1807.03039; MAGIC-Flow,
arXiv 2510.22070), optionally plus ``train.ce_weight`` times the Bayes posterior's cross-entropy.

How batches are drawn and steps taken is the run's session (:mod:`augflow.train.session`). With ``[privacy]
enabled`` it is a :class:`~augflow.train.privacy.session.PrivacySession` and the same loop runs DP-SGD:
Poisson-sampled batches, exact per-sample gradients clipped and noised by Opacus' DPOptimizer, an accountant
continued across resumes, public-only initialisation and mask, and the last weights released with their privacy
ledger. Every checkpoint and model records the ledger (``{"dp": False, ...}`` without DP: never a made-up epsilon).

A run may start from a trained model instead of a fresh initialisation (``train.init_from``, e.g. a model
pretrained on public data before a DP fine-tune; :mod:`augflow.train.init_from`); the ledger records it.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from augflow.atomic import atomic_save
from augflow.classify.likelihood import class_log_likelihoods, log_prior
from augflow.data.store import RowReader, read_info
from augflow.errors import ConfigError
from augflow.flows import dequantize, load_mask
from augflow.models import ModelFamily, family
from augflow.precision import autocast, resolve_amp
from augflow.runs import CHECKPOINT, METRICS, MODEL, derive_seed, resolve_device, start_run
from augflow.train.augment import augment
from augflow.train.checkpoint import mark_run, resume_state, rng_states, set_rng_states
from augflow.train.init_from import InitFrom, open_init
from augflow.train.optim import make_optimizer
from augflow.train.privacy.ledger import Ledger
from augflow.train.recipe import Recipe
from augflow.train.rows import TrainingRows
from augflow.train.session import PlainSession, Session
from augflow.version import __version__


@dataclass
class TrainResult:
    """What :func:`train` made."""

    run_dir: Path
    steps: int
    best_val_loss: float | None
    last_val_loss: float | None
    model_path: Path
    loss_name: str
    ledger: Ledger  # the privacy ledger stored with the model
    released_step: int | None = None  # the step of the weights in model.pt


def train(
    data: str | Path,
    out: str | Path,
    recipe: Recipe,
    val: str | Path | None = None,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train a class-conditional generative model (the recipe's family) on a dataset file; write a run folder.

    Arguments:
        data: Training file (augflow HDF5). Its image shape and classes define the model.
        out: Run folder (created; must be new or empty, or hold this run with ``resume``, or ``overwrite``).
        recipe: The training recipe; ``recipe.privacy.enabled`` trains with DP-SGD.
        val: Validation file; default: a subject-wise split of ``data`` (``train.val_fraction`` of subjects).
        resume: Continue the run in ``out`` from its last checkpoint (a run started with ``train.init_from`` too: the
            checkpoint holds its weights and the record of the init model).
        device: "auto", "cpu" or "cuda[:N]".
        seed: Seed of initialisation, batch order and noise (under DP the sampling and gradient noise come from a
            secret seed instead, see :mod:`augflow.train.privacy`).
        command: The command line, written to ``command.txt``.
        progress: Show a tqdm progress bar.
        overwrite: Start a new run in ``out`` even if it holds a run (whose model, checkpoint and logs are
            replaced) or other files.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: For unusable data, recipes, run folders, ``train.init_from`` models (another family, image
            shape or architecture; under DP not declared public) or privacy settings
            (:class:`~augflow.errors.PrivacyError`), all before the run writes anything.
    """
    out, cfg = Path(out), recipe.train
    _check_selection(recipe)
    device = resolve_device(device)
    rank, world = _distributed(device)
    rows = TrainingRows.open(data, val, cfg.val_fraction, seed)
    state = resume_state(out, resume, rows.fingerprint, recipe.to_dict(), seed, overwrite)
    init = open_init(recipe, rows, state)
    session = open_session(recipe, rows, seed, device, rank, world, state, init)
    total_steps = cfg.epochs * session.steps_per_epoch
    model = initial_model(recipe, rows, session, seed, device, resuming=state is not None, init=init)
    optimizer, scheduler, ema = make_optimizer(model, session.trainable(model), cfg, total_steps,
                                               session.steps_per_epoch)
    run = _Run(out, recipe, rows, session, model, optimizer, scheduler, ema, seed, device, init)
    if state is not None:
        run.restore(state)
    if rank == 0:  # everything is checked: only now the folder becomes this run's
        mark_run(out, recipe.to_dict(), rows.fingerprint, seed, state)
        start_run(out, recipe.to_dict(), command)
    ce_prior = torch.tensor(log_prior(session.class_counts), dtype=torch.float32, device=device) \
        if cfg.ce_prior == "train" else None
    session.attach(Objective(model, cfg.ce_weight, session.amp, ce_prior, cfg.label_smoothing), optimizer)
    end = session.last_step(total_steps if cfg.max_steps <= 0 else min(total_steps, cfg.max_steps))
    log = (out / METRICS).open("a") if rank == 0 else None
    bar = tqdm(total=end, initial=run.step, desc="train", unit="step", disable=not (progress and rank == 0),
               dynamic_ncols=True)
    if cfg.compile and run.step < end and not bar.disable:
        bar.write("train.compile: compiling the training step at its first full batch (minutes the first time for a "
                  "recipe and image shape, seconds once inductor's cache holds it)")
    model.train()
    while run.step < end:
        step = run.step
        x, y = rows.train.batch(session.positions(step))
        x, y = x.to(device), y.to(device)
        step_seed = derive_seed(seed, 2, step)
        torch.manual_seed(step_seed)  # dropout of the coupling networks
        generator = torch.Generator(device).manual_seed(step_seed)
        if len(x):
            # Noise is drawn for the whole batch on every process, so a run is the same at any world size.
            x = dequantize(augment(x, recipe.augment, generator), generator=generator)
            y = model.training_labels(y, generator)
        stats = session.step(x, y, step)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        run.step += 1
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss="-" if stats.loss is None else f"{stats.loss:.3f}", lr=f"{lr:.2e}")
        if stats.loss is not None and not math.isfinite(stats.loss):
            raise FloatingPointError(f"training diverged at step {run.step} (loss {stats.loss}); "
                                     f"lower train.lr or raise train.grad_clip")
        if rank == 0:  # validation, logs and checkpoints are the first process's
            record = {"step": run.step, "epoch": step // session.steps_per_epoch, "loss": stats.loss,
                      "grad_norm": stats.grad_norm, "lr": lr, **stats.extra}
            run.after_step(record, end, log)
    bar.close()
    if rank == 0:
        log.close()
        if not (out / MODEL).exists():
            run.save_model()
        _warn_if_released_early(cfg, run.released_step, end)
    if world > 1:
        dist.barrier()
    return TrainResult(out, run.step, run.best_val, run.last_val, out / MODEL, model.loss_name,
                       session.ledger(model), run.released_step)


def _warn_if_released_early(cfg, released_step: int | None, end: int) -> None:
    """Validation bits/dim ignores the hybrid cross-entropy and can be lowest in the first epochs of a classifier
    (measured: ``train.ce_weight = 50`` kept epoch 1 of 30): say so instead of releasing it silently."""
    if cfg.ce_weight and cfg.select_on == "loss" and released_step is not None and released_step < end / 2:
        warnings.warn(f"model.pt holds the weights of step {released_step} of {end}: train.select_on = 'loss' keeps "
                      f"the lowest validation bits/dim, which ignores the train.ce_weight = {cfg.ce_weight:g} "
                      f"cross-entropy; for a classifier use --set train.select_on=balanced_accuracy", stacklevel=3)


def _check_selection(recipe: Recipe) -> None:
    """``train.select_on = "balanced_accuracy"`` needs a likelihood classifier and a model chosen on validation."""
    if recipe.train.select_on != "balanced_accuracy":
        return
    if not family(recipe.family).model.has_likelihood:
        raise ConfigError(f"train.select_on = 'balanced_accuracy' needs a likelihood classifier (model.family "
                          f"'magic'), but the family is {recipe.family!r}; use train.select_on = 'loss'")
    if recipe.privacy.enabled:
        raise ConfigError("train.select_on = 'balanced_accuracy' cannot apply under --dp: a private run releases its "
                          "last weights, never a choice made on the validation data; use train.select_on = 'loss'")


def open_session(recipe: Recipe, rows: TrainingRows, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1, saved: dict | None = None, init: InitFrom | None = None) -> Session:
    """The session of a run: a :class:`~augflow.train.privacy.session.PrivacySession` under ``[privacy] enabled``,
    else a :class:`~augflow.train.session.PlainSession`.

    Arguments:
        recipe: The run's recipe.
        rows: The run's rows.
        seed: The run's seed.
        device: The training device.
        rank: This process's rank under torchrun.
        world: The number of processes.
        saved: The checkpoint being resumed, if any (a private session continues its state).
        init: The model the run starts from (``--init-from``), if any.

    Raises:
        PrivacyError: For DP settings or runs that cannot give the guarantee. ConfigError: For
            ``privacy.trainable`` without DP, ``train.compile`` with it.
    """
    if not recipe.privacy.enabled:
        if recipe.privacy.trainable != "all":
            raise ConfigError(f"privacy.trainable = {recipe.privacy.trainable!r} applies to DP training only (--dp); "
                              f"without --dp every parameter is trained: drop the setting or add --dp")
        return PlainSession(recipe.train, rows, seed, device, rank, world, init)
    if recipe.train.compile:
        raise ConfigError("train.compile applies to runs without --dp: DP-SGD's per-sample gradients (torch.func.vmap "
                          "over microbatches) run eagerly; drop the setting or --dp")
    from augflow.train.privacy.session import PrivacySession  # Opacus loads only for private runs

    return PrivacySession.open(recipe, rows, device, world, saved, init)


def initial_model(recipe: Recipe, rows: TrainingRows, session: Session, seed: int, device: torch.device,
                  resuming: bool = False, init: InitFrom | None = None) -> ModelFamily:
    """The recipe's model for the data, built from ``seed`` on ``device``.

    A new model is initialised by the session (from a fixed training batch, or under DP from public data only), or
    takes the weights of the ``--init-from`` model (``init``): then nothing data-dependent runs, and only the
    entries whose shape depends on the classes keep their fresh initialisation (when the class set differs).
    MAGIC-Flow's application-specific (brain) mask is the init model's, else the file ``train.app_mask`` (under DP:
    declared public), else the session's (Otsu on the training mean image, or under DP on the public template); a
    resumed model takes its mask, a buffer, from the checkpoint.
    """
    config = recipe.model_config(rows.info.image_shape, rows.info.num_classes)
    torch.manual_seed(seed)
    parts = {}
    if config.uses_app_mask and not resuming and init is None:
        height, width = rows.info.image_shape[1:]
        mask_file = recipe.train.app_mask
        parts["app_mask"] = load_mask(mask_file, height, width) if mask_file else session.app_mask(height, width)
    model = family(recipe.family).model(config, **parts).to(device)
    if resuming:
        return model
    if init is None:
        session.initialize(model)
    else:
        init.apply(model)
    return model


class Objective(torch.nn.Module):
    """The model's per-sample training loss as a module's forward, for DDP's gradient hooks (and DP-SGD's per-sample
    gradients); under ``amp`` the model's networks run in bf16 (:mod:`augflow.precision`), the loss in float32.
    ``log_prior``: the hybrid objective's class prior (``train.ce_prior``), None = uniform; under DP it comes from the
    released class counts, so the loss stays a function of one example. ``label_smoothing``: of that objective's
    cross-entropy target (``train.label_smoothing``)."""

    def __init__(self, model: ModelFamily, ce_weight: float, amp: bool = False, log_prior: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.ce_weight, self.amp, self.log_prior = model, ce_weight, amp, log_prior
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            return self.model.training_loss(x, y, ce_weight=self.ce_weight, log_prior=self.log_prior,
                                            label_smoothing=self.label_smoothing).float()


class _Run:
    """The state of a run between steps, and what the first process does after each: validate, log, save."""

    def __init__(self, out: Path, recipe: Recipe, rows: TrainingRows, session: Session, model: ModelFamily,
                 optimizer, scheduler, ema, seed: int, device: torch.device, init: InitFrom | None = None):
        self.out, self.recipe, self.rows, self.session, self.init = out, recipe, rows, session, init
        self.seed, self.device = seed, device
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.step, self.best_val, self.last_val = 0, None, None
        self.best_score = None  # the train.select_on figure of the released model, as a loss (lower is better)
        self.released_step = None
        self.started = time.perf_counter()  # moved back by the elapsed time of a resumed run

    @property
    def eval_model(self) -> ModelFamily:
        """The weights to validate and release: the EMA's when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_states(state["rng"])
        self.step, self.best_val, self.last_val = state["step"], state["best_val_loss"], state["last_val_loss"]
        self.best_score = state.get("best_score", self.best_val)  # checkpoints from before train.select_on
        self.released_step = state.get("released_step")
        self.started -= state.get("elapsed_s", 0.0)  # checkpoints from before elapsed_s restart the clock

    def after_step(self, record: dict, end: int, log) -> None:
        """Validate at the end of an epoch, log every ``train.log_every`` steps, checkpoint every
        ``train.checkpoint_every``; keep the model best by ``train.select_on`` (validation loss or balanced
        accuracy), or under DP the last one."""
        cfg, step, releases_validation = self.recipe.train, self.step, self.session.releases_validation
        if (step % self.session.steps_per_epoch == 0 or step == end) and len(self.rows.val):
            self.last_val = evaluate_loss(self.eval_model, self.rows.val, cfg.batch_size, self.device, self.seed,
                                          self.session.amp)
            record["val_loss"] = score = self.last_val
            if cfg.select_on == "balanced_accuracy":
                record["val_balanced_accuracy"] = evaluate_balanced_accuracy(
                    self.eval_model, self.rows.val, self.session.class_counts, cfg.batch_size, self.device,
                    self.session.amp)
                score = -record["val_balanced_accuracy"]
            self.model.train()
            if releases_validation and (self.best_score is None or score < self.best_score):
                self.best_val, self.best_score = self.last_val, score
                self.save_model()
        if step % cfg.log_every == 0 or "val_loss" in record:
            record["elapsed_s"] = round(time.perf_counter() - self.started, 2)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % cfg.checkpoint_every == 0 or step == end:
            if not releases_validation or (not len(self.rows.val) and step == end):
                self.save_model()
            self.save_checkpoint()

    def save_model(self) -> None:
        """Write ``model.pt`` with its metadata and privacy ledger."""
        recipe, session = self.recipe, self.session
        meta = {
            "class_names": self.rows.info.class_names, "class_counts": session.class_counts,
            "data_class_counts": session.data_class_counts,
            "recipe": recipe.to_dict(), "fingerprint": self.rows.fingerprint, "step": self.step,
            "val_loss": self.last_val if session.releases_validation else None,
            "loss_name": self.model.loss_name, "temperature": recipe.train.temperature,
            "augflow_version": __version__, "seed": self.seed, "privacy": session.ledger(self.model).to_dict(),
        }
        self.eval_model.save(self.out / MODEL, meta=meta)
        self.released_step = self.step

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt``: everything a resumed run needs, the session's private state included (under DP
        the secret seed of the noise: the file is then readable by its owner only)."""
        atomic_save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_states(), "step": self.step, "best_val_loss": self.best_val, "last_val_loss": self.last_val,
            "best_score": self.best_score, "released_step": self.released_step,
            "elapsed_s": time.perf_counter() - self.started,
            "recipe": self.recipe.to_dict(), "seed": self.seed, "fingerprint": self.rows.fingerprint,
            "privacy": {"ledger": self.session.ledger(self.model).to_dict(), "state": self.session.state()},
            "init": None if self.init is None else self.init.record(),
        }, self.out / CHECKPOINT, private=self.recipe.privacy.enabled)


def _distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``: under ``torchrun`` join the process group (NCCL on GPUs, Gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def evaluate_loss(model: ModelFamily, rows: RowReader, batch_size: int, device: torch.device, seed: int,
                  amp: bool = False) -> float:
    """Mean training loss (without the hybrid term) of dequantised images; the noise is fixed by ``seed``, so the
    value is comparable across epochs (bits/dim for MAGIC-Flow). ``amp``: the networks in bf16."""
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)  # families whose loss draws its own noise (flow matching's t and epsilon)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        x, y = rows.batch(np.arange(start, min(start + batch_size, len(rows))))
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            total += model.training_loss(dequantize(x, generator=generator), y).float().sum().item()
        count += len(x)
    return total / max(1, count)


@torch.no_grad()
def evaluate_balanced_accuracy(model: ModelFamily, rows: RowReader, class_counts: list[int], batch_size: int,
                               device: torch.device, amp: bool = False) -> float:
    """Balanced accuracy (mean recall over the classes present) of the Bayes classifier ``argmax_k log p(x | k) +
    log p(k)``, ``p(k)`` the training class frequencies, on the (not dequantised) images of ``rows``."""
    model.eval()
    prior = log_prior(class_counts)
    predicted = []
    for start in range(0, len(rows), batch_size):
        x, _ = rows.batch(np.arange(start, min(start + batch_size, len(rows))))
        with autocast(device, amp):
            scores = class_log_likelihoods(model, x.to(device), len(class_counts)).double().cpu().numpy()
        predicted.append((scores + prior).argmax(1))
    return float(balanced_accuracy_score(rows.labels, np.concatenate(predicted)))


def dataset_loss(model: ModelFamily, path: str | Path, batch_size: int = 64, device: str = "cpu",
                 seed: int = 0, amp: bool = False) -> float:
    """Mean training loss of every image of a dataset file (bits/dim for MAGIC-Flow; fixed noise)."""
    info = read_info(path, check_values=False)
    dev = resolve_device(device)
    return evaluate_loss(model, RowReader(path, np.arange(len(info)), info.labels), batch_size, dev, seed,
                         resolve_amp(amp, dev))
