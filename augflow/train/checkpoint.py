"""Checkpoints of ``augflow train``: what a resumed run must match, and the RNG states it continues.

The checkpoint (``checkpoint.pt``, see :mod:`augflow.runs`) holds the model, EMA, optimiser, scheduler, RNG states,
step, recipe, seed, data fingerprint and ``privacy`` (the ledger and the private session's state). A run resumes
only on the same data, recipe and seed; only its stopping point and logging may change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from augflow.errors import ConfigError
from augflow.runs import CHECKPOINT
from augflow.train.recipe import PrivacyConfig


def rng_states() -> dict:
    """The global RNG states of torch (CPU and CUDA)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _comparable(recipe: dict) -> dict:
    """The recipe without the keys a resumed run may change (its stopping point and logging)."""
    train = {k: v for k, v in recipe["train"].items() if k not in ("max_steps", "log_every", "epochs")}
    privacy = recipe.get("privacy") or dataclasses.asdict(PrivacyConfig())  # runs from before [privacy]
    return {**recipe, "train": train, "privacy": privacy}


def resume_state(out: Path, resume: bool, fingerprint: dict, recipe: dict, seed: int) -> dict | None:
    """The checkpoint a run continues (``resume``), or None for a new run.

    Arguments:
        out: The run folder.
        resume: Whether the run continues the one in ``out``.
        fingerprint: The data of this call.
        recipe: This call's recipe (``Recipe.to_dict()``).
        seed: This call's seed.

    Raises:
        ConfigError: For a new run in a folder that holds one, a resume without a checkpoint, or a resume whose
            data, recipe or seed differ from the run's.
    """
    path = out / CHECKPOINT
    if not resume:
        if path.exists():
            raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another "
                              f"folder")
        return None
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint in {out}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"--resume: the data differ from the run's ({state['fingerprint']} vs {fingerprint})")
    if _comparable(state["recipe"]) != _comparable(recipe) or state["seed"] != seed:
        raise ConfigError("--resume: the recipe or seed differ from the run's; only train.epochs, "
                          "train.max_steps and train.log_every may change")
    return state
