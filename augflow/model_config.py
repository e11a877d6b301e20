"""The shared behaviour of the architecture dataclasses (MAGIC-Flow, MedSymmFlow, its autoencoder).

Recipes (TOML) and checkpoints store tuples as lists; :class:`ModelConfig` turns them back into tuples, writes
a dict of primitives loadable with ``weights_only=True``, and builds a config from such a dict with unknown keys
as errors. Each subclass implements ``validate()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from augflow.errors import ConfigError


def is_int(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class ModelConfig:
    """Mixin of a dataclass config: list fields become tuples, ``to_dict`` / ``from_dict``."""

    kind = "model config"  # named in errors

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
