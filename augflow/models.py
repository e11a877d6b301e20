"""Model families behind the same commands: the registry, configs from recipes, and loading saved models.

A recipe picks a family with ``[model] family = "magic"`` (MAGIC-Flow, the default) or ``"symmflow"``
(MedSymmFlow); the other keys of ``[model]`` are the fields of that family's config dataclass. Every family's
model is an ``nn.Module`` with:

- ``config`` (``image_shape``, ``num_classes``, ``to_dict()``; the class has ``from_dict``),
- ``training_loss(x, y, ce_weight=0.0) -> (B,)``: the per-sample training objective of dequantised images in
  ``[0, 1]`` (its mean is what the loop minimises; per-sample so DP-SGD can clip it), with ``loss_name``,
- ``initialize(x, y)``: data-dependent initialisation before training (a no-op where there is none),
- ``sample(y, temperature=..., generator=...) -> (B, C, H, W)`` in ``[0, 1]``,
- ``save(path, meta)``, writing ``{"family", "config", "state_dict", "meta"}`` for :func:`load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from augflow.errors import ConfigError
from augflow.flows import MagicFlow, MagicFlowConfig
from augflow.symmflow import SymmFlow, SymmFlowConfig

DEFAULT_FAMILY = "magic"


@dataclass(frozen=True)
class Family:
    """A model family: its config dataclass and its model class."""

    config: type
    model: type


FAMILIES: dict[str, Family] = {
    "magic": Family(MagicFlowConfig, MagicFlow),
    "symmflow": Family(SymmFlowConfig, SymmFlow),
}


def family(name: str) -> Family:
    """The family registered under ``name``, or a ConfigError listing the valid ones."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, but is: {name!r}")
    return FAMILIES[name]


def model_config(model_table: dict, image_shape, num_classes: int):
    """The config of ``model_table`` (a recipe's ``[model]`` table) for data of the given shape and classes."""
    table = dict(model_table)
    config_class = family(table.pop("family", DEFAULT_FAMILY)).config
    return config_class.from_dict({**table, "image_shape": tuple(image_shape), "num_classes": int(num_classes)})


def load_model(path: str | Path, map_location: str | torch.device = "cpu", with_meta: bool = False):
    """Load a model written by any family's ``save`` (``weights_only=True``), in eval mode.

    Returns:
        The model, or ``(model, meta)`` when ``with_meta`` is true.

    Raises:
        ConfigError: If the file is missing, is not an augflow model, or names an unknown family.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    ckpt: Any = torch.load(path, map_location=map_location, weights_only=True)
    if not (isinstance(ckpt, dict) and {"config", "state_dict"} <= set(ckpt)):
        raise ConfigError(f"{str(path)!r} is not an augflow model (needs keys 'config' and 'state_dict')")
    fam = family(ckpt.get("family", DEFAULT_FAMILY))
    model = fam.model.from_checkpoint(ckpt)
    model.eval()
    return (model, ckpt.get("meta") or {}) if with_meta else model
