"""bdia: exact, invertible diffusion solvers (BDIA-DDIM, BDIA-EDM) beside DDIM and EDM.

    import bdia
    sigmas = bdia.karras_sigmas(num_steps=18)
    x0 = bdia.sample(denoiser, latents * sigmas[0], sigmas, solver="bdia_edm", gamma=0.5)
    pair = bdia.sample(denoiser, latents * sigmas[0], sigmas, solver="bdia_edm", gamma=0.5, return_pair=True)
    noise_pair = bdia.invert(denoiser, pair, sigmas, solver="bdia_edm", gamma=0.5)

Stable Diffusion (diffusers components, our solver loop): ``bdia.load_sd("sd15")`` or ``load_sd(path=...)``;
the drop-in diffusers schedulers are ``bdia.BDIADDIMScheduler`` and ``bdia.BDIADDIMInverseScheduler`` (from
``bdia.schedulers``, imported on first use: they load diffusers).

Flow-matching models (SD3, FLUX): ``bdia.load_flow("flux-dev")``, ``bdia.FlowDenoiser``, ``bdia.flow_sigmas``
(:mod:`bdia.flow`: the solvers step them in their own latents ``x_t``); drop-ins ``bdia.BDIAFlowMatchEulerScheduler``
and ``bdia.BDIAFlowMatchInverseScheduler`` (:mod:`bdia.flow_schedulers`, imported on first use).
"""

from . import networks
from .denoisers import (
    ClassifierFreeGuidance,
    CountingDenoiser,
    EmpiricalDenoiser,
    GaussianMixtureDenoiser,
    VPEpsDenoiser,
)
from .flow import FlowDenoiser, flow_schedule, flow_shift_mu, flow_sigmas
from .networks.flow import FLOW_MODELS, FlowModel, load_flow
from .networks.sd import SD_MODELS, StableDiffusion, load_sd, x_to_z, z_to_x
from .reversible import ReversibleGradientWarning, sample_with_grad
from .schedules import (
    SD_SCHEDULE,
    flow_sigma,
    flow_time,
    karras_sigmas,
    make_alphas_cumprod,
    sigma_to_timestep,
    vp_alpha,
    vp_sigmas,
    vp_timesteps,
)
from .solvers import (
    INVERTIBLE_SOLVERS,
    SOLVERS,
    StatePair,
    bdia_ddim,
    bdia_edm,
    ddim,
    edm,
    gamma_schedule,
    invert,
    invert_bdia_ddim,
    invert_bdia_edm,
    sample,
)

__version__ = "0.1.0"

_LAZY_SCHEDULERS = ("BDIADDIMScheduler", "BDIADDIMInverseScheduler", "BDIAInvertedPair")
_LAZY_FLOW_SCHEDULERS = ("BDIAFlowMatchEulerScheduler", "BDIAFlowMatchInverseScheduler")


def __getattr__(name):  # the diffusers schedulers import diffusers, so ``import bdia`` does not load them
    if name in _LAZY_SCHEDULERS:
        from . import schedulers

        return getattr(schedulers, name)
    if name in _LAZY_FLOW_SCHEDULERS:
        from . import flow_schedulers

        return getattr(flow_schedulers, name)
    raise AttributeError(f"module 'bdia' has no attribute {name!r}")
