"""Network architectures: our own implementation of NVIDIA EDM's U-Nets and preconditioners
(:mod:`bdia.networks.edm`), state-dict compatible with EDM's published snapshots; Stable Diffusion through
diffusers (:mod:`bdia.networks.sd`: :func:`load_sd`; tiny random ones: :mod:`bdia.testing`); flow-matching SD3 / FLUX
(:mod:`bdia.networks.flow`: :func:`load_flow`).

The preconditioned networks (``EDMPrecond`` ...) are denoisers in the protocol of :mod:`bdia.denoisers`:
``D(x, sigma, class_labels=None, **model_kwargs)`` with ``sigma_min``, ``sigma_max`` and ``round_sigma``.
"""

from .edm import (
    EDM_CLASSES,
    AttentionOp,
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    VEPrecond,
    VPPrecond,
    iDDPMPrecond,
    weight_init,
)
from .flow import FLOW_MODELS, FlowModel, load_flow
from .loader import SnapshotError, load_edm
from .sd import SD_MODELS, StableDiffusion, load_sd

__all__ = [
    "load_edm",
    "load_sd",
    "load_flow",
    "FlowModel",
    "FLOW_MODELS",
    "StableDiffusion",
    "SD_MODELS",
    "SnapshotError",
    "EDM_CLASSES",
    "AttentionOp",
    "Conv2d",
    "DhariwalUNet",
    "EDMPrecond",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "SongUNet",
    "UNetBlock",
    "VEPrecond",
    "VPPrecond",
    "iDDPMPrecond",
    "weight_init",
]
