"""augflow: privacy-preserving data augmentation for medical imaging with class-conditional flows.

The public names are imported on first use (PEP 562), so ``import augflow.data.store`` — which every job and the
data layer do — does not pull in every model family.
"""

from augflow.version import __version__

__all__ = ["MagicFlow", "MagicFlowConfig", "__version__", "load_model"]

_LAZY = {"MagicFlow": "augflow.flows", "MagicFlowConfig": "augflow.flows", "load_model": "augflow.models"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'augflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
