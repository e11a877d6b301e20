"""The training loop of ``augflow train``: any model family's objective, resumable exactly.

One loop for every use and family (:mod:`augflow.models`). Each step draws its randomness (batch order,
augmentation, dequantisation noise, dropout) from seeds derived from ``(seed, epoch)`` and ``(seed, step)``, so a
run killed and resumed from its last checkpoint continues with exactly the losses an uninterrupted run would have
produced.

Objective: the family's ``training_loss`` of uniformly dequantised images; for MAGIC-Flow the negative
log-likelihood in bits per dimension (Kingma & Dhariwal 2018, Glow, arXiv 1807.03039; MAGIC-Flow,
arXiv 2510.22070), optionally plus ``train.ce_weight`` times the Bayes posterior's cross-entropy.

With ``[privacy] enabled`` the same loop runs DP-SGD (:mod:`augflow.train.privacy`): Poisson-sampled batches,
exact per-sample gradients clipped and noised by Opacus' DPOptimizer, an accountant continued across resumes,
public-only initialisation and mask, and the last weights released with their privacy ledger. Every checkpoint and
model records ``privacy`` (``{"dp": False, ...}`` without DP: never a made-up epsilon).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from augflow import __version__
from augflow.atomic import atomic_save, atomic_write_text
from augflow.config import PrivacyConfig, Recipe
from augflow.data.splits import subject_split
from augflow.data.store import read_info, read_rows, sha256_file
from augflow.errors import ConfigError
from augflow.flows import MagicFlow, brain_mask_from_images, dequantize, load_mask
from augflow.models import family
from augflow.precision import PrecisionWarning, autocast, resolve_amp
from augflow.train import privacy as dp
from augflow.train.augment import augment
from augflow.train.checkpoint import CHECKPOINT, MODEL, rng_states, set_rng_states, write_json

_MEAN_BLOCK = 512


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float | None
    last_val_loss: float | None
    model_path: Path
    loss_name: str
    privacy: dict | None = None  # the ledger stored with the model


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present (under torchrun: the process's ``LOCAL_RANK`` GPU), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], but is: {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def _distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``: under ``torchrun`` join the process group (NCCL on GPUs, Gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def derive_seed(seed: int, *parts: int) -> int:
    """An independent 32-bit seed for one purpose of a run (numpy SeedSequence of seed and parts)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


class _Rows:
    """Reads batches of rows of one HDF5 file (kept open) as float tensors."""

    def __init__(self, path: Path, rows: np.ndarray, labels: np.ndarray):
        self.path, self.rows, self.labels = path, rows, labels
        self._images = h5py.File(path, "r")["images"]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_rows(self._images, self.rows[positions])
        return torch.from_numpy(images), torch.from_numpy(self.labels[positions]).long()

    def mean_image(self) -> np.ndarray:
        total = np.zeros(self._images.shape[1:], dtype=np.float64)
        for start in range(0, len(self.rows), _MEAN_BLOCK):
            total += self.batch(np.arange(start, min(start + _MEAN_BLOCK, len(self.rows))))[0].sum(0).numpy()
        return (total / len(self.rows)).astype(np.float32)


def _epoch_order(n: int, labels: np.ndarray, num_classes: int, balanced: bool, seed: int, epoch: int) -> np.ndarray:
    """Positions of one epoch: a permutation, or class-balanced draws with replacement."""
    rng = np.random.default_rng(derive_seed(seed, 1, epoch))
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels, minlength=num_classes)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def _ema_with_warmup(decay: float):
    """EMA update with the decay warmed up as ``min(decay, (1 + n) / (10 + n))`` after n updates.

    Without the warm-up, a 0.999 average after 2,000 steps still holds 0.999**2000 = 13% of the first weights,
    which ruins a flow trained for a CPU budget (measured: validation 5.02 vs 3.55 bits/dim of the raw weights).
    """

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # flags and index buffers are copied, not averaged
            return current
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        return d * averaged + (1 - d) * current

    return update


def _lr_factor(step: int, total: int, warmup: int, start: float, min_ratio: float) -> float:
    """Linear warm-up from ``start`` to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return start + (1 - start) * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Objective(torch.nn.Module):
    """The model's per-sample training loss as a module's forward, for DDP's gradient hooks (and DP-SGD's per-sample
    gradients); under ``amp`` the model's networks run in bf16 (:mod:`augflow.precision`), the loss in float32."""

    def __init__(self, model: torch.nn.Module, ce_weight: float, amp: bool = False):
        super().__init__()
        self.model, self.ce_weight, self.amp = model, ce_weight, amp

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            return self.model.training_loss(x, y, ce_weight=self.ce_weight).float()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: _Rows, batch_size: int, device: torch.device, seed: int,
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


def dataset_loss(model: torch.nn.Module, path: str | Path, batch_size: int = 64, device: str = "cpu",
                 seed: int = 0, amp: bool = False) -> float:
    """Mean training loss of every image of a dataset file (bits/dim for MAGIC-Flow; fixed noise)."""
    info = read_info(path, check_values=False)
    dev = resolve_device(device)
    return evaluate_loss(model, _Rows(Path(path), np.arange(len(info)), info.labels), batch_size, dev, seed,
                         resolve_amp(amp, dev))


def _build_model(recipe: Recipe, info, train_set: _Rows, resuming: bool) -> torch.nn.Module:
    """The recipe's model for the data; MAGIC-Flow also needs its application-specific (brain) mask: a user file
    (``train.app_mask``), else Otsu on the training mean image, or under DP on the public template."""
    config = recipe.model_config(info.image_shape, info.num_classes)
    model_class = family(recipe.family).model
    if model_class is not MagicFlow:
        return model_class(config)
    if resuming:  # the mask is a buffer: the checkpoint's state overwrites this placeholder
        return MagicFlow(config)
    if recipe.train.app_mask:  # under DP the user declares the file public
        return MagicFlow(config, app_mask=load_mask(recipe.train.app_mask, *info.image_shape[1:]))
    if recipe.privacy.enabled:  # never the private images' mean
        return MagicFlow(config, app_mask=dp.template_mask(*info.image_shape[1:]))
    return MagicFlow(config, app_mask=brain_mask_from_images(torch.from_numpy(train_set.mean_image())[None]))


def _initial_model(recipe: Recipe, info, train_set: _Rows, seed: int, device: torch.device) -> torch.nn.Module:
    """The model before its first step: built from ``seed``, then initialised from a fixed batch of the training
    data (MAGIC-Flow's ActNorm), or under DP from public data only (:func:`augflow.train.privacy.public_initialize`).
    """
    torch.manual_seed(seed)
    model = _build_model(recipe, info, train_set, resuming=False).to(device)
    if recipe.privacy.enabled:
        dp.public_initialize(model, recipe.privacy.actnorm_init, info.image_shape, info.num_classes)
        return model
    init = np.random.default_rng(derive_seed(seed, 0)).permutation(len(train_set))[: max(64, recipe.train.batch_size)]
    x, y = train_set.batch(np.sort(init))
    with torch.no_grad():
        model.initialize(dequantize(x.to(device)), y.to(device))
    return model


def _public_inputs(recipe: Recipe, model: torch.nn.Module) -> dict:
    """What the DP model took from outside the private training data (for the ledger)."""
    uses_mask = isinstance(model, MagicFlow) and "application" in model.config.full_res_steps
    if not uses_mask:
        mask = "not used by this model"
    elif recipe.train.app_mask:
        mask = f"user file {recipe.train.app_mask} (declared public)"
    else:
        mask = "MNI152 ICBM 2009a template (nilearn), Otsu on its 11 central coronal slices"
    init = {"identity": "identity (no data)", "template": "MNI152 template slices (public)"}
    return {"app_mask": mask, "initialization": init[recipe.privacy.actnorm_init]}


def _fingerprint(data: Path, val: Path | None, train_rows: np.ndarray, val_rows: np.ndarray) -> dict:
    return {
        "data": str(data.resolve()), "data_sha256": sha256_file(data),
        "val": str(val.resolve()) if val else None, "val_sha256": sha256_file(val) if val else None,
        "train_rows": len(train_rows), "val_rows": len(val_rows),
    }


def _comparable(recipe_dict: dict) -> dict:
    """The recipe without the keys a resumed run may change (its stopping point and logging)."""
    train = {k: v for k, v in recipe_dict["train"].items() if k not in ("max_steps", "log_every", "epochs")}
    privacy = recipe_dict.get("privacy") or dataclasses.asdict(PrivacyConfig())  # runs from before [privacy]
    return {**recipe_dict, "train": train, "privacy": privacy}


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
) -> TrainResult:
    """Train a class-conditional generative model (the recipe's family) on a dataset file; write a run folder.

    Arguments:
        data: Training file (augflow HDF5). Its image shape and classes define the model.
        out: Run folder (created; must not hold a run unless ``resume``).
        recipe: The training recipe; ``recipe.privacy.enabled`` trains with DP-SGD.
        val: Validation file; default: a subject-wise split of ``data`` (``train.val_fraction`` of subjects).
        resume: Continue the run in ``out`` from its last checkpoint.
        device: "auto", "cpu" or "cuda[:N]".
        seed: Seed of initialisation, batch order and noise (under DP the sampling and gradient noise come from a
            secret seed instead, see :mod:`augflow.train.privacy`).
        command: The command line, written to ``command.txt``.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: For unusable data, recipes, run folders or privacy settings
            (:class:`~augflow.train.privacy.PrivacyError`).
    """
    data, out = Path(data), Path(out)
    device = resolve_device(device)
    amp = resolve_amp(recipe.train.amp, device)
    rank, world = _distributed(device)
    progress = progress and rank == 0
    cfg, pcfg = recipe.train, recipe.privacy
    private = pcfg.enabled
    info = read_info(data)
    if val is None:
        parts = subject_split(info.labels, info.subjects, val=cfg.val_fraction, test=0.0, seed=seed)
        train_rows, val_rows, val_path, val_labels = parts["train"], parts["val"], data, info.labels[parts["val"]]
    else:
        val = Path(val)
        val_info = read_info(val)
        if val_info.class_names != info.class_names or val_info.image_shape != info.image_shape:
            raise ConfigError(f"--val {val}: classes {val_info.class_names} and shape {val_info.image_shape} must "
                              f"match --data {data}: {info.class_names}, {info.image_shape}")
        train_rows, val_rows = np.arange(len(info)), np.arange(len(val_info))
        val_path, val_labels = val, val_info.labels
    if len(train_rows) == 0:
        raise ConfigError(f"--data {data}: no training images")
    train_set = _Rows(data, train_rows, info.labels[train_rows])
    val_set = _Rows(val_path, val_rows, val_labels)
    fingerprint = _fingerprint(data, val, train_rows, val_rows)
    recipe_dict = recipe.to_dict()

    units = None
    if private:
        dp.validate_config(pcfg)
        if world > 1:
            raise dp.PrivacyError("DP training runs in one process: under torchrun every process would need its "
                                  "share of one Poisson sample and of the noise, which augflow does not implement; "
                                  "run augflow train --dp without torchrun")
        if cfg.balanced_sampling:
            raise dp.PrivacyError("train.balanced_sampling cannot be combined with DP: the accountant's analysis "
                                  "needs uniform Poisson sampling, and class-weighted draws depend on the private "
                                  "labels; set train.balanced_sampling = false (synthesize --balance tops up classes)")
        if amp and device.type == "cpu":
            warnings.warn("train.amp is not used for DP training on a CPU: per-sample gradients under bf16 autocast "
                          "are exact but about 3x slower there (oneDNN's bf16 grouped convolutions, measured in "
                          "reports/benchmarks-dp.md); the run uses float32", PrecisionWarning, stacklevel=2)
            amp = False
        units = dp.make_units(pcfg.unit, info.subjects[train_rows])
        most = int(dp.make_units("subject", info.subjects[train_rows]).sizes.max())
        if pcfg.unit == "slice" and most > 1:
            warnings.warn(f"DP protects one slice, but subjects of {data} have up to {most} slices: a subject is "
                          f"protected only at the group-privacy level (about {most} x epsilon). Use --dp-unit "
                          f"subject for a per-subject guarantee.", dp.PrivacyWarning, stacklevel=2)
    population = units.count if private else len(train_set)
    steps_per_epoch = math.ceil(population / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    checkpoint_path = out / CHECKPOINT
    state = None
    if resume:
        if not checkpoint_path.is_file():
            raise ConfigError(f"--resume: no checkpoint in {out}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ConfigError(f"--resume: the data differ from the run's ({state['fingerprint']} vs {fingerprint})")
        if _comparable(state["recipe"]) != _comparable(recipe_dict) or state["seed"] != seed:
            raise ConfigError("--resume: the recipe or seed differ from the run's; only train.epochs, "
                              "train.max_steps and train.log_every may change")
    elif checkpoint_path.exists():
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")

    # The private state is fixed at the run's start; a resumed run continues it, whatever train.epochs says now.
    class_counts = np.bincount(train_set.labels, minlength=info.num_classes).tolist()
    plan = secret = accountant = counts_info = None
    if private and state is None:
        plan = dp.plan_privacy(pcfg, population, cfg.batch_size, total_steps)
        secret = dp.new_secret()
        class_counts, counts_info = dp.release_class_counts(train_set.labels, units, info.num_classes, pcfg,
                                                            plan.epsilon_counts, dp.secret_seed(secret, 0))
        accountant = dp.make_accountant(plan.accountant)
    elif private:
        saved = state["privacy"]["state"]
        plan, secret = dp.PrivacyPlan(**saved["plan"]), saved["secret"]
        class_counts, counts_info = saved["class_counts"], saved["counts_info"]
        accountant = dp.make_accountant(plan.accountant, saved["accountant"])

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(recipe_dict, out / "config.json")
        atomic_write_text((command or " ".join(sys.argv)) + "\n", out / "command.txt")

    if state is None:
        model = _initial_model(recipe, info, train_set, seed, device)
    else:
        torch.manual_seed(seed)
        model = _build_model(recipe, info, train_set, resuming=True).to(device)
    if private:
        dp.check_model(model)
    # DPOptimizer cannot clip a parameter without elements (the LU factors of a 1-channel 1x1 conv).
    params = [p for p in model.parameters() if p.numel() > 0 or not private]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, warmup, cfg.warmup_start, cfg.min_lr / cfg.lr))
    ema = AveragedModel(model, avg_fn=_ema_with_warmup(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None

    step, best_val, last_val = 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_states(state["rng"])
        step, best_val, last_val = state["step"], state["best_val_loss"], state["last_val_loss"]

    def ledger() -> dict:
        if not private:
            return dp.non_private_ledger(fingerprint)
        return dp.private_ledger(plan, accountant, counts_info, fingerprint, _public_inputs(recipe, model))

    def save_checkpoint():
        private_state = None if not private else {
            "plan": plan.to_dict(), "secret": secret, "accountant": [list(h) for h in accountant.history],
            "class_counts": class_counts, "counts_info": counts_info}
        atomic_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": rng_states(), "step": step,
            "best_val_loss": best_val, "last_val_loss": last_val, "recipe": recipe_dict, "seed": seed,
            "fingerprint": fingerprint, "privacy": {"ledger": ledger(), "state": private_state},
        }, checkpoint_path)

    def save_model(val_loss):
        eval_model = ema.module if ema is not None else model
        meta = {
            "class_names": info.class_names, "class_counts": class_counts,
            "recipe": recipe_dict, "fingerprint": fingerprint, "step": step,
            "val_loss": None if private else val_loss,  # a statistic of private validation data: not released
            "loss_name": model.loss_name, "temperature": cfg.temperature, "augflow_version": __version__,
            "seed": seed, "privacy": ledger(),
        }
        eval_model.save(out / MODEL, meta=meta)

    # Under torchrun each process takes every world-th image of the global batch; DDP averages the gradients.
    objective = _Objective(model, cfg.ce_weight, amp)
    net = DistributedDataParallel(objective) if world > 1 else objective
    private_step = dp.PrivateStep(objective, optimizer, plan, pcfg.microbatch) if private else None
    end = total_steps if cfg.max_steps <= 0 else min(total_steps, cfg.max_steps)
    allowed = plan.budget_steps(end) if private else end
    if allowed < end:
        warnings.warn(f"stopping after step {allowed} instead of {end}: one more step would exceed privacy.epsilon "
                      f"= {plan.target_epsilon} (the noise was calibrated for {plan.planned_steps} steps)",
                      dp.PrivacyWarning, stacklevel=2)
        end = allowed
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=end, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    order, order_epoch = None, -1
    started = time.perf_counter()
    model.train()
    while step < end:
        epoch, within = divmod(step, steps_per_epoch)
        if private:  # Poisson sampling from the secret seed: which units were drawn is never released
            positions = dp.poisson_sample(units, plan.sample_rate, dp.secret_seed(secret, 1, step))
        else:
            if order_epoch != epoch:
                order = _epoch_order(len(train_set), train_set.labels, info.num_classes, cfg.balanced_sampling,
                                     seed, epoch)
                order_epoch = epoch
            positions = order[within * cfg.batch_size:(within + 1) * cfg.batch_size]
        x, y = train_set.batch(positions)
        x, y = x.to(device), y.to(device)
        step_seed = derive_seed(seed, 2, step)
        torch.manual_seed(step_seed)  # dropout of the coupling networks
        generator = torch.Generator(device).manual_seed(step_seed)
        if len(x):
            # Noise is drawn for the whole batch on every process, so a run is the same at any world size.
            x = dequantize(augment(x, recipe.augment, generator), generator=generator)
        extra = {}
        if private:
            stats = private_step.step(x, y, dp.secret_seed(secret, 2, step))
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
            loss_value, grad_norm = stats["loss"], stats["grad_norm"]
            extra = {"batch": stats["batch"], "clipped": stats["clipped"]}
        else:
            loss = net(x[rank::world], y[rank::world]).mean()  # through DDP's gradient hooks
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            loss_value = loss.item()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        bar.update(1)
        bar.set_postfix(loss="-" if loss_value is None else f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        record = {"step": step, "epoch": epoch, "loss": loss_value, "grad_norm": grad_norm,
                  "lr": scheduler.get_last_lr()[0], **extra}
        if loss_value is not None and not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}); "
                                     f"lower train.lr or raise train.grad_clip")
        if rank != 0:
            continue  # validation, logs and checkpoints are the first process's
        epoch_end = step % steps_per_epoch == 0 or step == end
        if epoch_end and len(val_set):
            last_val = evaluate_loss(ema.module if ema is not None else model, val_set, cfg.batch_size,
                                     device, seed, amp)
            model.train()
            record["val_loss"] = last_val
            if not private and (best_val is None or last_val < best_val):  # DP releases the last weights
                best_val = last_val
                save_model(last_val)
        if step % cfg.log_every == 0 or "val_loss" in record:
            record["elapsed_s"] = round(time.perf_counter() - started, 2)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if step % cfg.checkpoint_every == 0 or step == end:
            if private or (not len(val_set) and step == end):
                save_model(last_val)
            save_checkpoint()
    bar.close()
    if rank == 0:
        metrics.close()
        if not (out / MODEL).exists():
            save_model(last_val)
    if world > 1:
        dist.barrier()
    return TrainResult(out, step, best_val, last_val, out / MODEL, model.loss_name, ledger())
