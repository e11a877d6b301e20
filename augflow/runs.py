"""Run folders, and the plumbing every job shares: devices, seeds, file names, class names, the command line.

A run folder ``runs/NAME`` (``augflow train``) holds:

- ``checkpoint.pt`` (:data:`CHECKPOINT`): everything needed to resume exactly (model, EMA, optimiser, scheduler,
  RNG states, step, recipe, data fingerprint, and ``privacy``: the ledger and, under DP, the private state —
  calibrated plan, accountant history, released class counts and the secret seed of sampling and noise, and
  ``init``: the record of the ``--init-from`` model), rewritten
  every ``train.checkpoint_every`` steps and at the end. It is private to the data holder: never release it (under
  DP it holds the secret seed of the noise and is written with mode 0600, readable by its owner only);
- ``model.pt`` (:data:`MODEL`): the model to use (EMA weights when enabled), best by validation loss (under DP: the
  last weights), with its metadata (class names, training class counts, recipe, data fingerprint, sampling
  temperature and the privacy ledger ``meta["privacy"]``) — what every ``--model`` option loads;
- ``run.json`` (:data:`RUN`): written first, before any other file of the run: the recipe, seed and data
  fingerprint that make the folder this run's, so a new run never mixes into it and ``--resume`` can check it
  even before the first checkpoint exists;
- ``config.json`` (the resolved recipe), ``command.txt`` (the command line) and ``metrics.jsonl`` (one line per
  logged step; a resumed run drops the lines after its checkpoint's step, so no step is logged twice);
- ``calibration.json`` (:data:`CALIBRATION`): the posterior's calibration temperature, written by
  ``augflow classify --calibrate-on``.

An autoencoder folder (``augflow train-autoencoder``) holds ``autoencoder.pt`` and the same three log files. Every
file is written to a temporary name in its folder and renamed (:mod:`augflow.atomic`), so a killed run never leaves
a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from augflow.atomic import atomic_write_text
from augflow.errors import ConfigError, DataError

RUN = "run.json"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
COMMAND = "command.txt"
METRICS = "metrics.jsonl"
CALIBRATION = "calibration.json"
AUTOENCODER = "autoencoder.pt"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present (under torchrun: the process's ``LOCAL_RANK`` GPU), else the CPU.

    Raises:
        ConfigError: For an unknown device name, or CUDA asked for without a CUDA device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], but is: {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def derive_seed(seed: int, *parts: int) -> int:
    """An independent 32-bit seed for one purpose of a run (numpy SeedSequence of seed and parts)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def model_file(model: str | os.PathLike, option: str = "--model") -> Path:
    """The model file that ``--model`` names: a run folder's ``model.pt``, or a model file itself.

    Arguments:
        model: A run folder or a model file.
        option: What named it, for the message (``"--model"``, ``"info"``).

    Raises:
        ConfigError: If there is no model there.
    """
    path = Path(model)
    if path.is_dir():
        path = path / MODEL
    if not path.is_file():
        raise ConfigError(f"{option} {model}: no trained model at {path}: the file does not exist; give a run folder "
                          f"of augflow train or a model .pt file")
    return path


def load_file(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of an augflow file with ``weights_only=True``; every way it can be unreadable is a DataError.

    Arguments:
        path: The file.
        what: What it should be (``"model"``, ``"checkpoint"``), for the message.
        map_location: Where to put its tensors.

    Raises:
        DataError: If the file is empty, truncated, of another kind, or holds Python objects beyond tensors and
            plain data (which ``weights_only`` refuses to run: a malicious file is never executed).
    """
    def unreadable(reason: str) -> DataError:
        return DataError(f"{path}: not a readable augflow {what}: {reason}; use a {what} written by augflow (retrain, "
                         f"or copy the file again)")

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise unreadable("it holds something other than tensors and plain data (corrupt, another format, or code, "
                         "which is never run)") from e
    except EOFError as e:
        raise unreadable("the file is empty") from e
    except RuntimeError as e:
        raise unreadable(f"the file is truncated or not a torch file ({str(e).split('.')[0]})") from e


def calibration_file(model: str | os.PathLike) -> Path:
    """Where the calibration temperature of a model (run folder or model file) is stored: beside the model."""
    return model_file(model).parent / CALIBRATION


def autoencoder_file(path: str | os.PathLike) -> Path:
    """An autoencoder file, or the ``autoencoder.pt`` of a ``train-autoencoder`` folder (not checked to exist)."""
    path = Path(path)
    return path / AUTOENCODER if path.is_dir() else path


def resolve_class(name: str, class_names: list[str]) -> int:
    """Index of a class by case-insensitive name.

    Raises:
        ConfigError: For an unknown name, listing the valid ones.
    """
    matches = [i for i, c in enumerate(class_names) if c.casefold() == name.strip().casefold()]
    if not matches:
        raise ConfigError(f"--class: unknown class {name!r}; valid classes: {', '.join(class_names)}")
    return matches[0]


def check_classes(classes: list[str], model_classes: list[str], source: str) -> None:
    """Refuse a data file whose classes differ from the model's (the same names in the same label order).

    Arguments:
        classes: The file's class names.
        model_classes: The class names stored with the model.
        source: The option and file, named in the error (``"--data test.h5"``).

    Raises:
        DataError: If the two lists differ.
    """
    if list(classes) != list(model_classes):
        raise DataError(f"{source}: classes {list(classes)} differ from the model's {list(model_classes)}")


def stored_amp(meta: dict) -> bool:
    """Whether a model's recipe trained with amp (its ``meta``): the default for sampling and density evaluation
    too."""
    return bool((meta.get("recipe") or {}).get("train", {}).get("amp", False))


def command_line() -> str:
    """This process's command line as the user typed it (``augflow train ...``), for ``command.txt``."""
    return " ".join(["augflow", *sys.argv[1:]])


def write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def start_run(out: str | os.PathLike, config: dict, command: str | None = None) -> Path:
    """Create a run folder and write its ``config.json`` and ``command.txt``.

    Arguments:
        out: The run folder (created with its parents).
        config: The resolved settings of the run.
        command: The command line (default: this process's ``sys.argv``).

    Returns:
        The folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(config, out / CONFIG)
    atomic_write_text((command or " ".join(sys.argv)) + "\n", out / COMMAND)
    return out
