"""What a DP fine-tune trains: ``privacy.trainable``, the parameters DP-SGD updates; the others stay frozen.

``"all"`` trains every parameter. ``"conditioning"`` and ``"top"`` are groups the model family defines
(:meth:`~augflow.models.ModelFamily.parameter_groups`; for MAGIC-Flow the class conditioning and the coarsest scale,
see :meth:`augflow.flows.MagicFlow.parameter_groups`). A list holds parameter-name glob patterns (``fnmatch``, e.g.
``["*.embed.*", "layers.13.*"]``, matched against names such as ``layers.13.coupling.net_a.embed.0.weight``) and
may name the groups too. Fewer trained coordinates share the same clipped gradient norm, so each gets more signal
against the same per-coordinate noise.

A frozen parameter is released with the model without passing through the accounting, so under DP anything but
``"all"`` needs the frozen weights to come from a model declared public (``--init-from MODEL --init-from-public``);
:func:`~augflow.train.privacy.checks.check_modules` refuses every other frozen parameter. Parameters the init
re-initialised (their shape depends on the classes) are always trained: frozen at their random start they would be
useless.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from augflow.errors import PrivacyError

if TYPE_CHECKING:
    from augflow.models import ModelFamily

GROUPS = ("all", "conditioning", "top")
ALLOWED = f'one of {", ".join(repr(g) for g in GROUPS)}, or a non-empty list of parameter-name patterns'


def check_trainable(value: Any) -> None:
    """Refuse a ``privacy.trainable`` that is neither a group name nor a non-empty list of non-empty strings.

    Raises:
        PrivacyError: Naming the key, the allowed values and the value received.
    """
    if isinstance(value, str) and value in GROUPS:
        return
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return
    raise PrivacyError(f"privacy.trainable must be {ALLOWED} (e.g. [\"*.embed.*\", \"layers.13.*\"]), but is: "
                       f"{value!r}")


def _items(model: ModelFamily, value: str | list[str]) -> list[tuple[str, list[str]]]:
    """``(item, its glob patterns)`` for each item of ``value``, the family's groups expanded."""
    groups = {"all": ["*"], **model.parameter_groups()}
    items = []
    for item in [value] if isinstance(value, str) else value:
        if item in GROUPS and item not in groups:
            raise PrivacyError(f"privacy.trainable = {item!r}: the {model.family} family defines no such group "
                               f"(its groups: {', '.join(sorted(groups))}); give \"all\" or a list of parameter-name "
                               f"patterns")
        items.append((item, groups.get(item, [item])))
    return items


def select_trainable(model: ModelFamily, value: str | list[str],
                     always: Iterable[str] = ()) -> tuple[set[str], dict]:
    """The names of the parameters ``privacy.trainable`` trains, and its description for the ledger.

    Arguments:
        model: The model.
        value: ``privacy.trainable`` (checked by :func:`check_trainable`).
        always: Parameters trained whatever ``value`` says (those ``--init-from`` re-initialised).

    Returns:
        ``(names, info)``: the trained parameter names; ``{"selection", "patterns", "trained_tensors",
        "trained_elements", "frozen_elements", "plus_reinitialized"}`` (the last: how many of ``always`` were
        added).

    Raises:
        PrivacyError: For a group the family does not define, or a pattern that matches no parameter.
    """
    named = dict(model.named_parameters())
    patterns = []
    for item, globs in _items(model, value):
        if not any(fnmatchcase(name, g) for name in named for g in globs):
            example = next((n for n in named if ".embed." in n), next(iter(named), ""))
            raise PrivacyError(f"privacy.trainable: {item!r} matches no parameter of the model; names look like "
                               f"{example!r} (fnmatch patterns such as '*.embed.*' or 'layers.3.*')")
        patterns += globs
    always = [n for n in always if n in named]
    names = {n for n in named if any(fnmatchcase(n, p) for p in patterns)} | set(always)
    trained = sum(named[n].numel() for n in names)
    info = {"selection": value, "patterns": patterns,
            "trained_tensors": sum(1 for n in names if named[n].numel()), "trained_elements": trained,
            "frozen_elements": sum(p.numel() for p in named.values()) - trained, "plus_reinitialized": len(always)}
    return names, info
