"""BDIA-DDIM as a drop-in diffusers scheduler, for pipelines we do not control.

    from diffusers import StableDiffusionPipeline
    from bdia.schedulers import BDIADDIMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(...)
    pipe.scheduler = BDIADDIMScheduler.from_config(pipe.scheduler.config, gamma=0.5)
    image = pipe("a photo of a cat", num_inference_steps=10).images[0]

Our own solvers (:func:`bdia.sample` with ``solver="bdia_ddim"``) are the reference implementation and keep
the BDIA pair as an explicit value; this class exists because diffusers' ``step(model_output, timestep,
sample)`` API only hands a scheduler the current latent, so the scheduler has to remember the previous one.
That memory is one small value, :attr:`BDIADDIMScheduler.state` (the latent the previous ``step`` started
from and its timestep); ``set_timesteps`` (which every pipeline call runs first) clears it, and a ``step`` at
a timestep not below the remembered one (a new trajectory without ``set_timesteps``) starts afresh too.

The update is the paper's, in z-space (VP latents, what diffusers' pipelines carry). With ``a_t`` the
``alphas_cumprod`` at timestep ``t``, ``eps`` and ``x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` from the
model output,

    DDIM_{t->s}(z_t) = sqrt(a_s) x0 + sqrt(1 - a_s) eps
    z_{t_next} = DDIM_{t->t_next}(z_t) + gamma * (z_{t_prev} - DDIM_{t->t_prev}(z_t))

where ``t_next = t - num_train_timesteps // num_inference_steps`` (diffusers' DDIM step; below 0 the final
level: ``alphas_cumprod[0]``, or 1 with ``set_alpha_to_one``) and ``t_prev`` is the timestep of the previous
step, whose input latent was ``z_{t_prev}``. The first step of a trajectory is a plain DDIM step; every later
step, the last included, is a BDIA step. ``gamma = 0`` is DDIM (eta = 0); ``gamma = 1`` full BDIA.

With "leading" spacing (Stable Diffusion) and "trailing" spacing when the step count divides
``num_train_timesteps``, ``t_next`` is the next timestep of the grid, so the scheduler equals
``bdia.sample(..., solver="bdia_ddim", gamma)`` on :func:`bdia.vp_sigmas` with the same settings (tested to
float32 round-off inside a real ``StableDiffusionPipeline``). The arithmetic runs in float64 and the result
is cast back to the latents' dtype. ``alphas_cumprod`` is computed in float64 (diffusers' own schedulers
build it in float32; the difference is ~1e-7 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .schedules import TIMESTEP_SPACINGS, make_alphas_cumprod, vp_timesteps

__all__ = ["BDIADDIMScheduler", "BDIADDIMSchedulerOutput", "BDIASchedulerState"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class BDIADDIMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next (lower) timestep; ``pred_original_sample``: the model's ``x0``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class BDIASchedulerState(NamedTuple):
    """What a BDIA step needs from the previous one: the latent that step started from and its timestep."""

    sample: torch.Tensor  # float64
    timestep: int


class BDIADDIMScheduler(SchedulerMixin, ConfigMixin):
    """BDIA-DDIM (Zhang, Lewis, Kleijn, arXiv 2307.10829) with diffusers' scheduler API; see the module notes.

    Config (the same keys and defaults as diffusers' ``DDIMScheduler``, so ``from_config`` of an SD pipeline's
    DDIM or PNDM scheduler config works) plus ``gamma`` in [0, 1] (0: DDIM; the authors recommend 0.5 at 10
    steps and 1.0 at 40 for text-to-image). Only deterministic sampling: ``eta`` must be 0; no x0 clipping or
    thresholding (an ODE solver must not clip).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        gamma: float = 1.0,
    ):
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1] (0 = DDIM, 1 = full BDIA), got {gamma}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64)
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            self.alphas_cumprod = make_alphas_cumprod(beta_schedule, beta_start, beta_end, num_train_timesteps,
                                                      dtype=torch.float64)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0  # initial latents are unit normals in z-space
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.state: BDIASchedulerState | None = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- the grid ------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The descending timesteps of an ``num_inference_steps``-step run (:func:`bdia.vp_timesteps`, the
        same ones diffusers' DDIM picks); clears the BDIA state, so each pipeline call starts a new trajectory."""
        cfg = self.config
        timesteps = vp_timesteps(int(num_inference_steps), cfg.num_train_timesteps, cfg.timestep_spacing,
                                 cfg.steps_offset)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.state = None

    def reset(self) -> None:
        """Forget the previous latent: the next ``step`` is a plain DDIM step."""
        self.state = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet sees the latent as it is."""
        return sample

    def _alpha_bar(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    def next_timestep(self, timestep: int) -> int:
        """Where a step from ``timestep`` lands: ``timestep - num_train_timesteps // num_inference_steps``."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    # --- the step ------------------------------------------------------------------------------------

    def _eps_and_x0(self, model_output: torch.Tensor, z: torch.Tensor, alpha_bar: float):
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (z - s * eps) / a
        elif kind == "v_prediction":
            x0 = a * z - s * model_output
            eps = a * model_output + s * z
        else:  # "sample"
            x0 = model_output
            eps = (z - a * x0) / s
        return eps, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> BDIADDIMSchedulerOutput | tuple:
        """One BDIA-DDIM step from ``sample`` (``z_t``) at ``timestep`` given the model's output there; see the
        module notes for the update. Returns ``prev_sample`` (the latent at the next, lower timestep) and the
        model's ``x0`` estimate, in ``sample``'s dtype. ``generator`` is accepted and unused (deterministic)."""
        if eta:
            raise ValueError(f"BDIADDIMScheduler is deterministic (eta = 0); got eta={eta}")
        t = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        t_next = self.next_timestep(t)
        work = torch.float32 if sample.device.type == "mps" else torch.float64
        z = sample.to(work)
        alpha_bar = self._alpha_bar(t)
        eps, x0 = self._eps_and_x0(model_output.to(work), z, alpha_bar)

        def ddim_to(target: int) -> torch.Tensor:
            a_target = self._alpha_bar(target)
            return math.sqrt(a_target) * x0 + math.sqrt(1.0 - a_target) * eps

        z_next = ddim_to(t_next)
        gamma = float(self.config.gamma)
        state = self.state
        if state is not None and state.timestep <= t:  # not a continuation: a new trajectory starts here
            state = None
        if state is not None and gamma != 0.0:
            z_next = z_next + gamma * (state.sample.to(z_next) - ddim_to(state.timestep))
        self.state = BDIASchedulerState(z.clone(), t)
        prev_sample = z_next.to(sample.dtype)
        pred_original_sample = x0.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return BDIADDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # --- forward process (img2img pipelines) --------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise`` per row (what img2img pipelines call)."""
        abar = self.alphas_cumprod.to(device=original_samples.device)[timesteps.to(original_samples.device).long()]
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        out = abar.sqrt() * original_samples.to(torch.float64) + (1 - abar).sqrt() * noise.to(torch.float64)
        return out.to(original_samples.dtype)
