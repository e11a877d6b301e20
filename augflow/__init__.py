"""augflow: privacy-preserving data augmentation for medical imaging with class-conditional flows."""

__version__ = "0.1.0"

from augflow.flows import MagicFlow, MagicFlowConfig  # noqa: E402
from augflow.models import load_model  # noqa: E402

__all__ = ["MagicFlow", "MagicFlowConfig", "__version__", "load_model"]
