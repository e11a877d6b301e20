"""MedSymmFlow: symmetrical flow matching for class-conditional generation and classification.

References:
    Caetano, Abdi, Viviers, Valiuddin & van der Sommen, "MedSymmFlow", 2025, arXiv:2507.19098.
    Lipman et al., "Flow Matching for Generative Modeling", 2023, arXiv:2210.02747.
"""

from augflow.symmflow.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder
from augflow.symmflow.model import SymmFlow, SymmFlowConfig, Uncertainty, interpolate, velocity_targets
from augflow.symmflow.palette import class_colours, palette, palette_indices

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "SymmFlow",
    "SymmFlowConfig",
    "Uncertainty",
    "class_colours",
    "interpolate",
    "load_autoencoder",
    "palette",
    "palette_indices",
    "velocity_targets",
]
