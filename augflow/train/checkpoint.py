"""Run folders of ``augflow train``: whose they are, what a resumed run must match, and the RNG states it continues.

A run marks its folder first with ``run.json`` (recipe, seed and data fingerprint, see :mod:`augflow.runs`): a new
run refuses a folder that holds a run (``--resume`` continues it, ``--overwrite`` starts over) or anything else. The
checkpoint (``checkpoint.pt``) holds the model, EMA, optimiser, scheduler, RNG states, step, elapsed time, recipe,
seed, data fingerprint, ``privacy`` (the ledger and the private session's state) and ``init`` (the record of the
``--init-from`` model, so a resumed run needs not the file). A run resumes only on the same
data, recipe and seed; only its stopping point and logging may change. A run marked but killed before its first
checkpoint resumes by starting cleanly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from augflow.atomic import atomic_write_text, sweep_stale_temporaries
from augflow.errors import ConfigError, DataError
from augflow.runs import CALIBRATION, CHECKPOINT, COMMAND, CONFIG, METRICS, MODEL, RUN, load_file, write_json
from augflow.train.recipe import PrivacyConfig
from augflow.version import __version__

# What a new run (--overwrite) removes of the run it replaces; the logs and config are rewritten anyway.
_RUN_FILES = (MODEL, CHECKPOINT, CALIBRATION)
# The keys a checkpoint must hold to be resumed.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "ema", "rng", "step", "best_val_loss", "last_val_loss",
                    "recipe", "seed", "fingerprint")


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


def resume_state(out: Path, resume: bool, fingerprint: dict, recipe: dict, seed: int,
                 overwrite: bool = False) -> dict | None:
    """The checkpoint a run continues, or None for a run that starts from step 0.

    Arguments:
        out: The run folder.
        resume: Whether the run continues the one in ``out`` (``--resume``).
        fingerprint: The data of this call.
        recipe: This call's recipe (``Recipe.to_dict()``).
        seed: This call's seed.
        overwrite: Whether a new run may replace the run, or the other files, in ``out`` (``--overwrite``).

    Raises:
        ConfigError: For a new run in a folder that holds a run or other files (without ``overwrite``), a resume
            without a run, or a resume whose data, recipe or seed differ from the run's. DataError: For an
            unreadable checkpoint or ``run.json``.
    """
    marker, checkpoint = out / RUN, out / CHECKPOINT
    has_run = marker.is_file() or checkpoint.is_file()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, but a run is a folder; choose a folder name")
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them")
    if not resume:
        if has_run and not overwrite:
            raise ConfigError(f"--out {out}: the folder already holds a run; pass --resume to continue it, "
                              f"--overwrite to start over, or choose another folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--out {out}: the folder is not empty and holds no augflow run; choose a new or empty "
                              f"folder, or pass --overwrite to write the run among its files")
        return None
    if not has_run:
        raise ConfigError(f"--resume: no run in {out} (no {RUN} or {CHECKPOINT}); drop --resume to start one")
    state = load_file(checkpoint, "checkpoint") if checkpoint.is_file() else _read_marker(marker)
    missing = [k for k in (_CHECKPOINT_KEYS if checkpoint.is_file() else ("recipe", "seed", "fingerprint"))
               if not (isinstance(state, dict) and k in state)]
    if missing:
        raise DataError(f"{checkpoint if checkpoint.is_file() else marker}: an incomplete run file (missing "
                        f"{', '.join(missing)}); start the run again in a new folder or with --overwrite")
    data_diff = _differences(state["fingerprint"], fingerprint)
    if data_diff:
        raise ConfigError(f"--resume: the data differ from the run's: {data_diff}; resume with the run's --data and "
                          f"--val, or start a new run")
    recipe_diff = _differences(_flat(_comparable(state["recipe"])), _flat(_comparable(recipe)))
    if state["seed"] != seed:
        recipe_diff = "; ".join(filter(None, [recipe_diff, f"--seed {state['seed']} (run) vs {seed} (now)"]))
    if recipe_diff:
        raise ConfigError(f"--resume: the recipe or seed differ from the run's: {recipe_diff}; only train.epochs, "
                          f"train.max_steps and train.log_every may change")
    return state if checkpoint.is_file() else None


def mark_run(out: Path, recipe: dict, fingerprint: dict, seed: int, state: dict | None) -> None:
    """Make ``out`` this run's folder, before any other file of it is written.

    Writes ``run.json`` first. A run that starts from step 0 removes what a replaced run left (its model,
    checkpoint, calibration and log lines); a resumed run keeps the log lines up to its checkpoint's step, so no
    step is logged twice. Temporary files of a killed run are removed, whichever file it was writing.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in (RUN, CONFIG, COMMAND, METRICS, *_RUN_FILES):
        sweep_stale_temporaries(out / name)
    write_json({"recipe": recipe, "seed": seed, "fingerprint": fingerprint, "augflow_version": __version__},
               out / RUN)
    if state is None:
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    truncate_metrics(out / METRICS, 0 if state is None else state["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of a ``metrics.jsonl`` up to ``step`` (atomically); a line cut by a kill ends the log."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("step", 0) > step:
            break
        kept.append(line + "\n")
    atomic_write_text("".join(kept), path)


def _read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); start the run again in a new folder or with "
                        f"--overwrite") from None


def _flat(tables: dict) -> dict:
    """``{"train": {"lr": 1}}`` as ``{"train.lr": 1}``."""
    return {f"{table}.{key}" if isinstance(values, dict) else table: value
            for table, values in tables.items()
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}


def _differences(saved: dict, now: dict) -> str:
    """The keys whose values differ, one readable line (keys only one side has are not compared: runs from before
    stored the data's paths too)."""
    def short(value):
        return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)  # a SHA-256

    return "; ".join(f"{key} {short(saved[key])} (run) vs {short(now[key])} (now)"
                     for key in now if key in saved and saved[key] != now[key])
