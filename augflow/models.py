"""Model families behind the same commands: the protocol their models follow, the registry, and loading.

A recipe picks a family with ``[model] family = "magic"`` (MAGIC-Flow, the default) or ``"symmflow"``
(MedSymmFlow); the other keys of ``[model]`` are the fields of that family's config dataclass. Jobs ask a model
what it can do through :class:`ModelFamily` (its likelihood, its default temperature, whether DP-SGD can train it),
never by its class or family name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from augflow.errors import AugflowError, ConfigError, DataError
from augflow.flows import MagicFlow, MagicFlowConfig
from augflow.runs import load_file, model_file
from augflow.symmflow import SymmFlow, SymmFlowConfig

DEFAULT_FAMILY = "magic"


class ModelFamily(Protocol):
    """What every family's model is (an ``nn.Module``; :class:`augflow.model_base.FamilyModel` gives the defaults).

    Attributes:
        family: The name it is registered under (``"magic"``, ``"symmflow"``).
        loss_name: What :meth:`training_loss` measures (``"bits/dim"``), for logs.
        has_likelihood: Whether it has an exact ``log_prob(x, y)`` (with ``attribution(x, y)``, its per-pixel
            split, ``class_log_probs(x)``, every class's at once, and the inverse ``encode`` / ``decode`` with the
            latent prior ``prior(y)``, its means and log standard deviations): the likelihood classifier,
            attribution maps and exact membership scores need it. A family without one classifies by
            its own read-out (MedSymmFlow: ``classify(x, passes, generator)``).
        default_temperature: Sampling temperature when the model's metadata names none.
        config: Its config dataclass (``image_shape``, ``num_classes``, ``uses_app_mask``, ``to_dict()``).
        dp_blocker: Why DP-SGD training would not be private (e.g. a non-private pretrained part), or None.
    """

    family: ClassVar[str]
    loss_name: ClassVar[str]
    has_likelihood: ClassVar[bool]
    default_temperature: ClassVar[float]
    config: Any

    @property
    def dp_blocker(self) -> str | None: ...

    def training_loss(self, x: Tensor, y: Tensor, ce_weight: float = 0.0, log_prior: Tensor | None = None,
                      label_smoothing: float = 0.0) -> Tensor:
        """Per-sample objective ``(B,)`` of dequantised images in ``[0, 1]`` (per sample, so DP-SGD can clip it);
        ``ce_weight``, ``log_prior`` (``(K,)``, None = uniform) and ``label_smoothing`` weigh, condition and smooth
        a hybrid objective's cross-entropy where the family has one."""

    def initialize(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent initialisation before training (a no-op where there is none)."""

    def training_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The labels a training step uses: ``y``, or (label dropout) some replaced by a null label."""

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named parameter groups a DP fine-tune may train alone (``"conditioning"``, ``"top"``), as parameter-name
        glob patterns; empty where the family defines none."""

    def class_entries(self) -> list[str]:
        """Names of the state-dict entries whose shape depends on ``num_classes`` (re-initialised by
        ``--init-from`` when the class set differs)."""

    def sample(self, y: Tensor, temperature: float | Sequence[float] = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Class-conditional images ``(B, C, H, W)``, nominally in ``[0, 1]`` (a sequence: one temperature per latent
        part, where the family has parts)."""

    def sample_near(self, x: Tensor, c: Tensor, y: Tensor, strength: float,
                    temperature: float | Sequence[float] = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Images of classes ``y`` derived from real images ``x`` of classes ``c``: ``strength`` in (0, 1] is how far
        they move from ``x`` (``-> 0``: ``x`` itself; 1: an ordinary :meth:`sample`)."""

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{"family", "config", "state_dict", "meta"}`` for :func:`load_model`."""


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
    """The family registered under ``name``.

    Raises:
        ConfigError: For an unknown name, listing the valid ones.
    """
    if name not in FAMILIES:
        raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, but is: {name!r}")
    return FAMILIES[name]


def model_config(model_table: dict, image_shape, num_classes: int):
    """The config of ``model_table`` (a recipe's ``[model]`` table) for data of the given shape and classes."""
    table = dict(model_table)
    config_class = family(table.pop("family", DEFAULT_FAMILY)).config
    return config_class.from_dict({**table, "image_shape": tuple(image_shape), "num_classes": int(num_classes)})


def load_model(path: str | Path, map_location: str | torch.device = "cpu", with_meta: bool = False,
               option: str = "--model"):
    """Load a model written by any family's ``save`` (``weights_only=True``), in eval mode.

    Arguments:
        path: A run folder (its ``model.pt``) or a model file: what every ``--model`` option accepts.
        map_location: Where to put its tensors.
        with_meta: Also return its metadata.
        option: What named ``path``, for the message when there is no model.

    Returns:
        The model, or ``(model, meta)`` when ``with_meta`` is true.

    Raises:
        ConfigError: If there is no model. DataError: If the file is unreadable, not an augflow model, incomplete
            (a missing weight or key) or names an unknown family.
    """
    path = model_file(path, option)
    payload: Any = load_file(path, "model", map_location)
    if not (isinstance(payload, dict) and {"config", "state_dict"} <= set(payload)):
        raise DataError(f"{path}: not an augflow model (needs the keys 'config' and 'state_dict'); use a model.pt "
                        f"written by augflow train")
    try:
        model = family(payload.get("family", DEFAULT_FAMILY)).model.from_checkpoint(payload)
    except AugflowError as e:
        raise DataError(f"{path}: not a usable augflow model: {e}") from None
    except (KeyError, RuntimeError, TypeError, AttributeError, StopIteration) as e:
        # A hand-edited or foreign file: weights or config keys missing or of the wrong shape.
        reason = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{path}: an incomplete augflow model ({reason}); use a model.pt written by augflow "
                        f"train") from None
    model.eval()
    return (model, payload.get("meta") or {}) if with_meta else model


def model_summary(path: str | Path) -> dict:
    """What ``augflow info`` shows of a trained model (a run folder or a model file): family, image shape, classes,
    training step, the architecture (``config``) and the privacy ledger (``meta["privacy"]``; None for models from
    before the ledger existed).

    Raises:
        ConfigError: If there is no model at ``path``. DataError: If it cannot be loaded.
    """
    model, meta = load_model(path, with_meta=True, option="info")
    return {"path": str(model_file(path)), "family": model.family, "image_shape": list(model.config.image_shape),
            "class_names": meta.get("class_names"), "class_counts": meta.get("class_counts"),
            "step": meta.get("step"), "loss_name": meta.get("loss_name"), "config": model.config.to_dict(),
            "privacy": meta.get("privacy")}
