"""MAGIC-Flow: class-conditional multiscale normalizing flows (generation and classification).

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
"""

from augflow.flows.coupling import AffineCoupling, make_coupling_net
from augflow.flows.layers import (
    ActNorm,
    FlowStep,
    InvertibleConv1x1,
    InvertibleLayer,
    Split,
    Squeeze,
)
from augflow.flows.magic import MagicFlow, MagicFlowConfig, dequantize
from augflow.flows.masks import (
    brain_mask_from_images,
    channel_mask,
    checkerboard_mask,
    ellipse_mask,
    load_mask,
    make_mask,
)
from augflow.flows.nets import ClassificationNet, GenerationNet

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ClassificationNet",
    "FlowStep",
    "GenerationNet",
    "InvertibleConv1x1",
    "InvertibleLayer",
    "MagicFlow",
    "MagicFlowConfig",
    "Split",
    "Squeeze",
    "brain_mask_from_images",
    "channel_mask",
    "checkerboard_mask",
    "dequantize",
    "ellipse_mask",
    "load_mask",
    "make_coupling_net",
    "make_mask",
]
