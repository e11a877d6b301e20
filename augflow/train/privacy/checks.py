"""The ``[privacy]`` settings and the model's compatibility with DP-SGD: refuse what cannot give the guarantee."""

from __future__ import annotations

import math
from collections.abc import Container
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from augflow.errors import PrivacyError
from augflow.train.privacy.accounting import ACCOUNTANTS, DELTA_RULE
from augflow.train.privacy.sampling import UNITS
from augflow.train.privacy.trainable import check_trainable
from augflow.train.recipe import PrivacyConfig

if TYPE_CHECKING:
    from augflow.models import ModelFamily

ACTNORM_INITS = ("template", "identity")


def validate_config(cfg: PrivacyConfig) -> PrivacyConfig:
    """Check every ``[privacy]`` field; return ``cfg``.

    Raises:
        PrivacyError: Naming the key, the allowed values and the value received.
    """

    def bad(key: str, allowed: str, value: Any) -> PrivacyError:
        return PrivacyError(f"privacy.{key} must be {allowed}, but is: {value!r}")

    if not (isinstance(cfg.epsilon, int | float) and 0 < cfg.epsilon < math.inf):
        raise bad("epsilon", "a finite number > 0 under DP (--epsilon E)", cfg.epsilon)
    if not (isinstance(cfg.delta, int | float) and 0 <= cfg.delta < 1):
        raise bad("delta", "in [0, 1) (0: the default rule, " + DELTA_RULE + ")", cfg.delta)
    if not (isinstance(cfg.max_grad_norm, int | float) and 0 < cfg.max_grad_norm < math.inf):
        raise bad("max_grad_norm", "a finite number > 0", cfg.max_grad_norm)
    if cfg.accountant not in ACCOUNTANTS:
        raise bad("accountant", f"one of {sorted(ACCOUNTANTS)}", cfg.accountant)
    if cfg.unit not in UNITS:
        raise bad("unit", f"one of {list(UNITS)}", cfg.unit)
    if not (isinstance(cfg.microbatch, int) and cfg.microbatch >= 1):
        raise bad("microbatch", "an int >= 1", cfg.microbatch)
    if not (isinstance(cfg.count_epsilon_fraction, int | float) and 0 < cfg.count_epsilon_fraction < 1):
        raise bad("count_epsilon_fraction", "in (0, 1) (or set privacy.public_class_counts = true)",
                  cfg.count_epsilon_fraction)
    if not (isinstance(cfg.max_slices_per_subject, int) and cfg.max_slices_per_subject >= 1):
        raise bad("max_slices_per_subject", "an int >= 1", cfg.max_slices_per_subject)
    if cfg.actnorm_init not in ACTNORM_INITS:
        raise bad("actnorm_init", f"one of {list(ACTNORM_INITS)}", cfg.actnorm_init)
    check_trainable(cfg.trainable)
    return cfg


def check_model(model: ModelFamily, public: Container[str] = ()) -> None:
    """Refuse a family's model that DP-SGD cannot train privately: the family's own reason
    (:attr:`~augflow.models.ModelFamily.dp_blocker`, e.g. MedSymmFlow's non-private autoencoder), or a module
    :func:`check_modules` refuses.

    Arguments:
        model: The model.
        public: Names of the parameters loaded from a model declared public (``--init-from-public``), which may
            be frozen.

    Raises:
        PrivacyError: Naming the reason.
    """
    if model.dp_blocker:
        raise PrivacyError(f"--dp: {type(model).__name__}: {model.dp_blocker}")
    check_modules(model, public)


def check_modules(model: nn.Module, public: Container[str] = ()) -> None:
    """Refuse modules that break the per-sample DP-SGD analysis.

    Like Opacus' ``ModuleValidator``, but it names the module and also catches weight/spectral normalisation and
    frozen pretrained parameters (fitted outside the accounting, yet released with the model) — except those named
    in ``public``: weights of a model the user declared trained on public data (``--init-from-public``).

    Raises:
        PrivacyError: Naming the first incompatible module, its type and why.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        reason = None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            reason = ("BatchNorm mixes the examples of a batch, so one example's gradient depends on the others and "
                      "clipping no longer bounds its influence; its running statistics are also computed from the "
                      "private data outside the clipped gradients. Use GroupNorm (or opacus ModuleValidator.fix)")
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            reason = "its running statistics are computed from the private data outside the clipped gradients"
        elif any(isinstance(h, WeightNorm | SpectralNorm) for h in module._forward_pre_hooks.values()):
            reason = ("weight_norm/spectral_norm hooks recompute the weight outside the parameters the per-sample "
                      "gradients are taken of; use plain layers")
        elif parametrize.is_parametrized(module) and any(
                type(p).__name__ in ("_WeightNorm", "_SpectralNorm")
                for plist in module.parametrizations.values() for p in plist):
            reason = "weight_norm/spectral_norm parametrisations are not supported by DP-SGD here; use plain layers"
        elif any(not p.requires_grad and p.numel() and prefix + n not in public
                 for n, p in module.named_parameters(recurse=False)):
            reason = ("it has frozen (pretrained) parameters, which are released with the model but were fitted "
                      "outside the DP accounting (e.g. an autoencoder trained on the private images); frozen "
                      "parameters are allowed only when loaded from a model declared public (--init-from MODEL "
                      "--init-from-public); otherwise train every parameter under DP (privacy.trainable = \"all\"; "
                      "MedSymmFlow: in pixel space)")
        if reason:
            raise PrivacyError(f"the model is not compatible with DP-SGD: module {name or '<root>'!r} "
                               f"({type(module).__name__}): {reason}")
