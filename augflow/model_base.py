"""What every model family shares: the config dataclass mixin, and saving and loading a model.

Recipes (TOML) and checkpoints store tuples as lists; :class:`ModelConfig` turns them back into tuples, writes a
dict of primitives loadable with ``weights_only=True``, builds a config from such a dict with unknown keys as
errors, and checks the image shape. Each subclass implements ``validate()``.

:class:`SavedModule` writes a module as ``{header..., "config", "state_dict", "meta"}`` and rebuilds it from such a
payload; :class:`FamilyModel` is the base of every family's model and gives the defaults of the family protocol
(:class:`augflow.models.ModelFamily`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from augflow.atomic import atomic_save
from augflow.errors import ConfigError


def is_int(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class ModelConfig:
    """Mixin of a dataclass config: list fields become tuples, ``to_dict`` / ``from_dict``, the image-shape check."""

    kind: ClassVar[str] = "model config"  # named in errors
    uses_app_mask: ClassVar[bool] = False  # whether the model takes an application (brain) mask; see MagicFlowConfig

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # recipes and checkpoints store lists
                setattr(self, f.name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of primitives (tuples as lists), loadable with ``weights_only=True``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build a config from :meth:`to_dict` output or a recipe table; unknown keys are errors.

        Raises:
            ConfigError: For unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} keys {unknown}; allowed: {sorted(known)}")
        return cls(**data).validate()

    def check_image_shape(self, divisor: int = 1, reason: str = "") -> None:
        """Check that ``image_shape`` is ``(C, H, W)`` of positive ints, with H and W divisible by ``divisor``.

        Arguments:
            divisor: What H and W must be divisible by.
            reason: Why, named in the error (``"2 ** number of levels"``).

        Raises:
            ConfigError: Naming the rule and the shape received.
        """
        shape = self.image_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(is_int(v, 1) for v in shape)):
            raise ConfigError(f"image_shape must be (C, H, W) of positive ints, but is: {shape!r}")
        if shape[1] % divisor or shape[2] % divisor:
            raise ConfigError(f"image height and width must be divisible by {divisor} ({reason}), but image_shape "
                              f"is: {shape!r}")


class SavedModule(nn.Module):
    """A module that saves itself with its config and metadata, and loads back from that payload.

    Subclasses set :attr:`config_class` and :meth:`header` (the keys that say what the file holds), and may add
    entries with :meth:`parts` and read them back in :meth:`build`.
    """

    config_class: ClassVar[type]
    config: Any

    def header(self) -> dict[str, Any]:
        """The leading keys of the saved payload (what kind of file it is)."""
        raise NotImplementedError

    def parts(self) -> dict[str, Any]:
        """Extra entries of the saved payload (e.g. a sub-module's config); none by default."""
        return {}

    @classmethod
    def build(cls, payload: dict[str, Any]) -> SavedModule:
        """A fresh module of a payload's config (and parts), before its weights are loaded."""
        return cls(cls.config_class.from_dict(payload["config"]))

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{header..., "config", "state_dict", "meta", parts...}`` atomically (temp file + ``os.replace``).

        Arguments:
            path: Destination file; parent folders are created.
            meta: Optional metadata of primitives (dicts, lists, str, numbers, None), e.g. class names or the
                privacy ledger; read back with ``augflow.models.load_model(..., with_meta=True)``.
        """
        atomic_save({**self.header(), "config": self.config.to_dict(), "state_dict": self.state_dict(),
                     "meta": {} if meta is None else meta, **self.parts()}, path)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> SavedModule:
        """The module of a loaded :meth:`save` payload, on the device and in the dtype of its tensors."""
        state = payload["state_dict"]
        model = cls.build(payload)
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        model.to(device=next(iter(state.values())).device, dtype=dtype)
        model.load_state_dict(state)
        return model


class FamilyModel(SavedModule):
    """Base of every family's model: the defaults of :class:`augflow.models.ModelFamily`, and save / load."""

    family: ClassVar[str]
    loss_name: ClassVar[str]
    has_likelihood: ClassVar[bool] = False
    default_temperature: ClassVar[float] = 1.0

    @property
    def dp_blocker(self) -> str | None:
        """Why DP-SGD training of this model would not be private, or None."""
        return None

    def header(self) -> dict[str, Any]:
        return {"family": self.family}

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent initialisation before training; none by default."""

    def training_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The labels a training step uses; ``y`` itself by default (MAGIC-Flow drops some for guidance)."""
        return y

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameters for fine-tuning (``privacy.trainable``), as parameter-name glob patterns;
        none by default."""
        return {}

    def class_entries(self) -> list[str]:
        """Names of the state-dict entries whose shape depends on ``num_classes`` (label embeddings, per-class
        buffers): found by building the same architecture for another class count and comparing shapes, so no
        family has to list them by hand. The global RNG is left as it was.

        Returns:
            The names, in state-dict order (empty when no shape depends on the class count).
        """
        state = self.state_dict()
        for count in (self.config.num_classes + 1, self.config.num_classes - 1):
            try:
                other = dataclasses.replace(self.config, num_classes=count).validate()
            except ConfigError:  # a family's bound on the class count (MedSymmFlow: 2..64)
                continue
            with torch.random.fork_rng(devices=[]):
                twin = self.build({"config": other.to_dict(), **self.parts()}).state_dict()
            return [name for name, tensor in state.items() if tensor.shape != twin[name].shape]
        return []
