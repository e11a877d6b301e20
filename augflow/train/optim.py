"""The optimiser of ``augflow train``: AdamW, its learning-rate schedule, and the EMA of the weights.

The schedule is a linear warm-up from ``train.warmup_start * lr`` over ``train.warmup_epochs``, then cosine decay to
``train.min_lr``, as in the reference training of MAGIC-Flow (arXiv 2510.22070).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from augflow.train.recipe import TrainConfig


def lr_factor(step: int, total: int, warmup: int, start: float, min_ratio: float) -> float:
    """Linear warm-up from ``start`` to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return start + (1 - start) * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_with_warmup(decay: float):
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


def make_optimizer(model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, total_steps: int,
                   steps_per_epoch: int):
    """AdamW over ``params``, its schedule over ``total_steps``, and the EMA of ``model`` (None without EMA).

    Returns:
        ``(optimizer, scheduler, ema)``.
    """
    # fused: one kernel for all 1,236 parameter tensors of the scanner model instead of a loop over them (AdamW's
    # step 56 -> 19 ms on one CPU thread); the same update.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.warmup_start, cfg.min_lr / cfg.lr))
    ema = AveragedModel(model, avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    return optimizer, scheduler, ema
