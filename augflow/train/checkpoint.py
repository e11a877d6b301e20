"""Atomic checkpoints and the run folder layout.

A run folder ``runs/NAME`` holds:

- ``checkpoint.pt``: everything needed to resume exactly (model, EMA, optimiser, scheduler, RNG states, step,
  config, data fingerprint, and ``privacy``: the ledger and, under DP, the private state — calibrated plan,
  accountant history, released class counts and the secret seed of sampling and noise), rewritten every
  ``train.checkpoint_every`` steps and at the end. It is private to the data holder: never release it;
- ``model.pt``: the model to use (EMA weights when enabled), best by validation bits/dim (under DP: the last
  weights), with its metadata (class names, training class counts, recipe, data fingerprint, and the privacy
  ledger ``meta["privacy"]``) — what ``augflow synthesize`` loads and copies into its provenance;
- ``config.json`` (the resolved recipe), ``command.txt`` (the command line) and ``metrics.jsonl``.

Every file is written to a temporary name in the same folder and renamed with ``os.replace``, so a killed run
never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from augflow.atomic import atomic_write_text

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


def write_json(obj, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def rng_states() -> dict:
    """The global RNG states of torch (CPU and CUDA)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
