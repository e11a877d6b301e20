"""Mixed precision: bfloat16 autocast where the hardware runs it natively, float32 elsewhere.

``amp`` in augflow means: the heavy networks (MAGIC-Flow's coupling networks, MedSymmFlow's U-Net, the audit's
ResNet-18) run under ``torch.autocast(dtype=torch.bfloat16)``; everything that enters a likelihood stays in float32
(the models cast their networks' outputs back and compute affine transforms, log-determinants and priors outside
autocast).

bf16 pays off only on hardware with native bf16 arithmetic: CUDA GPUs that report it, and CPUs with AMX-BF16
(Intel Sapphire Rapids and later: about 6x the float32 matmul rate) or AVX512-BF16 (Cooper Lake, AMD Zen 4), or
Arm's BF16 extension. Elsewhere PyTorch emulates bf16 and is slower than float32, so a request for amp there falls
back to float32 with a warning (recipes that turn amp on stay portable; the numbers differ from float32 only by
rounding).
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from functools import cache
from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 arithmetic, best first (x86 AMX and AVX-512, Arm's BF16 extension).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


class PrecisionWarning(UserWarning):
    """amp was requested on hardware without native bf16: running in float32."""


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where that file does not exist)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return frozenset()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :func:`platform.processor` says."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or "unknown CPU"


def bf16_support(device: torch.device) -> str | None:
    """How ``device`` runs bfloat16 natively: the CPU flag (``"amx_bf16"``, ``"avx512_bf16"``, ``"bf16"``),
    ``"cuda"``, or None when it does not."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        flags = cpu_flags()
        return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)
    return None


def resolve_amp(requested: bool, device: torch.device) -> bool:
    """Whether to run with bf16 autocast: ``requested`` and supported by ``device``.

    Raises:
        PrecisionWarning (as a warning): when amp was requested but the device has no native bf16.
    """
    if not requested:
        return False
    if bf16_support(device) is None:
        warnings.warn(f"amp (bfloat16) was requested, but {device} has no native bf16 arithmetic (CPU flags "
                      f"{', '.join(BF16_CPU_FLAGS)} or a bf16-capable GPU); running in float32 instead",
                      PrecisionWarning, stacklevel=2)
        return False
    return True


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` when ``enabled``, else a context that does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """A region where autocast is off, so a computation that enters a likelihood stays in its own dtype."""
    return torch.autocast(device_type, enabled=False)
