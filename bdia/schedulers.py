"""BDIA-DDIM as drop-in diffusers schedulers, for pipelines we do not control.

    from diffusers import StableDiffusionPipeline
    from bdia.schedulers import BDIADDIMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(...)
    pipe.scheduler = BDIADDIMScheduler.from_config(pipe.scheduler.config, gamma=0.5)
    image = pipe("a photo of a cat", num_inference_steps=10).images[0]

**Drop-in.** :class:`BDIADDIMScheduler` takes every ``DDIMScheduler`` config key, with DDIM's defaults and
meaning (``clip_sample``, ``clip_sample_range``, ``thresholding``, ``dynamic_thresholding_ratio``,
``sample_max_value``, ``rescale_betas_zero_snr``, ``timestep_spacing``, ``prediction_type``, ``trained_betas``,
``set_alpha_to_one``, ``steps_offset``, the beta schedule), builds the same ``betas`` / ``alphas`` /
``alphas_cumprod`` / ``final_alpha_cumprod`` (float32, as diffusers does) and does DDIM's arithmetic op for op,
plus one key: ``gamma``. **The default is ``gamma = 0``, which is DDIM (eta = 0) bit for bit**: a drop-in should
change nothing until asked, ``from_config`` of a DDIM config then reproduces DDIM exactly, and BDIA is opt-in
(``gamma=0.5`` at ~10 steps, ``gamma=1`` at ~40 steps are the authors' text-to-image settings). Only ``eta = 0``
exists: BDIA integrates the deterministic ODE, so ``step(..., eta>0)`` raises.

**The update** is the paper's, in z-space. With ``D_{t->s}(z_t) = sqrt(a_s) x0 + sqrt(1 - a_s) eps`` (``a`` the
``alphas_cumprod``; ``x0``, ``eps`` from the model output exactly as DDIM derives them, after DDIM's x0 clipping
or thresholding when configured):

    z_{t_next} = D_{t->t_next}(z_t) + gamma * (z_{t_prev} - D_{t->t_prev}(z_t))

``t_next = t - num_train_timesteps // num_inference_steps`` (DDIM's target; below 0 the final level
``final_alpha_cumprod``) and ``t_prev`` the timestep of the previous step, whose input latent was ``z_{t_prev}``.
The first step of a trajectory is a plain DDIM step. The first term is computed exactly as ``DDIMScheduler``
computes its output (same dtype, same operations); the BDIA term in at least float32, added to it, and the result
cast to the latents' dtype.

**State.** diffusers' ``step(model_output, timestep, sample)`` hands a scheduler only the current latent, so the
scheduler must remember the previous one: :attr:`BDIADDIMScheduler.state` (that latent and its timestep), one
small explicit value. ``set_timesteps`` (which every pipeline call runs first) clears it, and a ``step`` at a
timestep not below the remembered one starts a new trajectory, so one scheduler object can be reused across
pipeline calls.

**Exact inversion inside pipelines.** :class:`BDIADDIMInverseScheduler` is usable as a pipeline's
``inverse_scheduler`` (DiffEdit, Pix2Pix-Zero). Its timesteps are ``[t_1, t_1, t_2, ..., t_{N-1}]`` (the forward
grid ``t_N > ... > t_1``, ascending, lowest first twice): the first step is an ordinary DDIM inversion step from
the clean latent ``z_0`` to level ``t_1`` (approximate, as in the paper); every later step, with the model
evaluated at the latent's own timestep, is the exact BDIA inverse

    z_{k+1} = (z_{k-1} - D_{t_k->t_k_next}(z_k)) / gamma + D_{t_k->t_{k+1}}(z_k).

The inverted image is the **pair** ``(z_N, z_{N-1})`` (:attr:`BDIADDIMInverseScheduler.inverted_pair`); a pipeline
carries only ``z_N``, so hand the pair to the sampling scheduler with
:meth:`BDIADDIMScheduler.regenerate_from`: its step at ``t_N`` from ``z_N`` then returns ``z_{N-1}`` (that one
model call is spent for nothing) and the rest regenerates ``z_0`` up to round-off, which the inversion amplifies
about ``1 / gamma`` per step (use ``gamma`` in [0.9, 1] for inversion).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar, rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .schedules import TIMESTEP_SPACINGS, vp_timesteps

__all__ = [
    "BDIADDIMInverseScheduler",
    "BDIADDIMScheduler",
    "BDIADDIMSchedulerOutput",
    "BDIAInvertedPair",
    "BDIASchedulerState",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: Bound on ``num_train_timesteps`` (DDPM and Stable Diffusion use 1000); the schedule is allocated from it.
MAX_TRAIN_TIMESTEPS = 100_000


@dataclass
class BDIADDIMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next timestep of the loop (lower when sampling, higher when inverting);
    ``pred_original_sample``: the model's ``x0`` (after clipping / thresholding when configured)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class BDIASchedulerState(NamedTuple):
    """What a BDIA step needs from the previous one: the latent that step started from and its timestep
    (for the inverse scheduler's first step, the clean latent and the level below ``t_1``, possibly negative:
    the final level)."""

    sample: torch.Tensor
    timestep: int


class BDIAInvertedPair(NamedTuple):
    """An image's exact representation on the noise side: ``upper`` (``z_N``, what a pipeline starts from, at
    ``timestep``) and ``lower`` (``z_{N-1}``), with the ``gamma`` it was inverted with."""

    upper: torch.Tensor
    lower: torch.Tensor
    timestep: int
    gamma: float

    def check_regenerates_with(self, gamma: float) -> None:
        """Refuse (one line) a pair that a scheduler of this ``gamma`` cannot continue exactly: another gamma, or
        halves of different shapes."""
        if float(self.gamma) != float(gamma):
            raise ValueError(f"the pair was inverted with gamma={self.gamma} but this scheduler has "
                             f"gamma={gamma}; regeneration is exact only with the same gamma")
        if self.upper.shape != self.lower.shape:
            raise ValueError(f"pair.upper {tuple(self.upper.shape)} and pair.lower {tuple(self.lower.shape)} "
                             "differ in shape")


def _ddim_init_keys() -> set[str]:
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    keys = set()
    for cls in (DDIMScheduler, DDIMInverseScheduler):
        keys |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                 if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys


class _BDIABase(SchedulerMixin, ConfigMixin):
    """The config, the schedule and the DDIM pieces shared by the sampling and the inverse scheduler."""

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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        gamma: float = 0.0,
    ):
        self._check_gamma(gamma)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) or \
                not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be an integer in 1..{MAX_TRAIN_TIMESTEPS}, got "
                             f"{num_train_timesteps!r}")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        # the betas exactly as diffusers' DDIMScheduler builds them (float32), so every attribute matches it
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
            if betas.ndim != 1 or len(betas) != num_train_timesteps:
                raise ValueError(f"trained_betas must be {num_train_timesteps} numbers (num_train_timesteps), got "
                                 f"shape {list(betas.shape)}")
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps)
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not bool(torch.isfinite(betas).all()) or bool((betas < 0).any()) or bool((betas > 1).any()):
            bad = betas[~(torch.isfinite(betas) & (betas >= 0) & (betas <= 1))][0].item()
            raise ValueError(f"betas must be finite numbers in [0, 1] (noise variances per step), got {bad}")
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # the level a step lands on when t - step_ratio < 0 (the clean end of sampling, the start of inversion)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.state: BDIASchedulerState | None = None

    @staticmethod
    def _check_gamma(gamma) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1] (0 = DDIM, 1 = full BDIA), got {gamma!r}")

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, which silently drops keys known to a compatible class; here a
        ``DDIMScheduler`` key this class does not take (one a newer diffusers may add) is warned about."""
        given = getattr(config, "config", config) or {}
        params = set(inspect.signature(cls.__init__).parameters)
        missing = sorted(k for k in _ddim_init_keys() - params if k in given or k in kwargs)
        if missing:
            warnings.warn(f"{cls.__name__} does not implement the DDIMScheduler config key(s) {missing}; they are "
                          "ignored, so the result may differ from DDIMScheduler", UserWarning, stacklevel=2)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _grid(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        if isinstance(num_inference_steps, torch.Tensor) and num_inference_steps.numel() == 1 and \
                not num_inference_steps.is_floating_point():
            num_inference_steps = int(num_inference_steps.item())
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if num_inference_steps > cfg.num_train_timesteps:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps "
                             f"({cfg.num_train_timesteps})")
        return vp_timesteps(int(num_inference_steps), cfg.num_train_timesteps, cfg.timestep_spacing,
                            cfg.steps_offset)

    def reset(self) -> None:
        """Forget the remembered latent: the next ``step`` starts a new trajectory."""
        self.state = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network sees the latent as it is (as with DDIM)."""
        return sample

    def _step_ratio(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        return self.config.num_train_timesteps // self.num_inference_steps

    def _alpha_bar(self, timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """DDIM's ``sigma_t^2 / eta^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)`` between two timesteps (DDIM
        paper eq. 16; ``DDIMScheduler._get_variance``), kept for callers that read it. BDIA's steps are deterministic
        (``eta = 0``) and never use it."""
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[timestep], self._alpha_bar(prev_timestep)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    # --- DDIM's pieces, the same operations as diffusers' DDIMScheduler.step -------------------------------

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen): per sample, ``s`` = the ``dynamic_thresholding_ratio`` quantile of
        ``|x0|`` clamped to ``[1, sample_max_value]``; ``x0`` is clamped to ``[-s, s]`` and divided by ``s``."""
        dtype = x0.dtype
        batch, channels, *rest = x0.shape
        flat = x0 if dtype in (torch.float32, torch.float64) else x0.float()
        flat = flat.reshape(batch, channels * np.prod(rest))
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(batch, channels, *rest).to(dtype)

    def _x0_and_eps(self, model_output, sample, alpha_prod_t, use_clipped_model_output=False):
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        else:  # "v_prediction"
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        if self.config.thresholding:
            x0 = self._threshold(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        return x0, eps

    @staticmethod
    def _ddim_to(x0, eps, alpha_prod_s) -> torch.Tensor:
        """``D_{t->s} = sqrt(a_s) x0 + sqrt(1 - a_s) eps``."""
        return alpha_prod_s ** (0.5) * x0 + (1 - alpha_prod_s) ** (0.5) * eps

    def _timestep(self, timestep, model_output: torch.Tensor, sample: torch.Tensor, on_grid: bool = True) -> int:
        """``timestep`` as an int, checked: a training timestep in ``[0, num_train_timesteps)`` (never negative: that
        would index ``alphas_cumprod`` from its end), one of this loop's timesteps when ``on_grid`` (BDIA pairs
        grid levels; plain DDIM, gamma = 0, steps from any training timestep as ``DDIMScheduler`` does), and
        ``model_output`` of ``sample``'s shape (no broadcasting across a batch)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() and timestep.item() != int(timestep.item()):
                raise ValueError(f"timestep must be one integer timestep, got {timestep}")
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer, float)) or timestep != int(timestep):
            raise ValueError(f"timestep must be an integer timestep, got {timestep!r}")
        t = int(timestep)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the training timesteps 0..{self.config.num_train_timesteps - 1}")
        if on_grid and t not in set(self.timesteps.tolist()):
            raise ValueError(f"timestep {t} is not one of this loop's timesteps (set_timesteps gave "
                             f"{self.timesteps.tolist()[:6]}{' ...' if len(self.timesteps) > 6 else ''})")
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(f"model_output has shape {list(model_output.shape)} but sample {list(sample.shape)}; "
                             f"they must match (no broadcasting across the batch)")
        return t

    @staticmethod
    def _check_continuation(state, sample: torch.Tensor) -> None:
        if state is not None and tuple(state.sample.shape) != tuple(sample.shape):
            raise ValueError(f"sample has shape {list(sample.shape)} but the previous step's had "
                             f"{list(state.sample.shape)}; a new batch is a new trajectory: call set_timesteps() or "
                             f"reset() first")

    # --- forward process (img2img pipelines, training) -------------------------------------------------------

    def _per_row(self, timesteps: torch.Tensor, like: torch.Tensor):
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        abar = self.alphas_cumprod.to(dtype=like.dtype)[timesteps.to(like.device)].flatten()
        shape = (-1, *([1] * (like.ndim - 1)))
        return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise`` per row (what img2img pipelines call; as DDIM)."""
        a, s = self._per_row(timesteps, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(a_t) noise - sqrt(1 - a_t) sample`` per row (as DDIM)."""
        a, s = self._per_row(timesteps, sample)
        return a * noise - s * sample


class BDIADDIMScheduler(_BDIABase):
    """BDIA-DDIM (Zhang, Lewis, Kleijn, arXiv 2307.10829) as a drop-in for diffusers' ``DDIMScheduler``; see the
    module notes.

    Config: every ``DDIMScheduler`` key with DDIM's defaults and meaning, plus ``gamma`` in [0, 1], **default 0
    (= DDIM, bit-identical)** so that swapping the class changes nothing until BDIA is asked for; the authors used
    ``gamma = 0.5`` at 10 steps and ``1.0`` at 40 for text-to-image. ``step`` takes DDIM's arguments; ``eta`` must
    be 0 (BDIA is deterministic), ``generator`` and ``variance_noise`` are accepted and unused, as DDIM ignores
    them at ``eta = 0``.

    State: :attr:`state` (the previous step's input latent and timestep), cleared by ``set_timesteps`` and
    :meth:`reset`; see the module notes. :meth:`regenerate_from` registers an inverted pair.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_pair: BDIAInvertedPair | None = None

    __init__.__signature__ = inspect.signature(_BDIABase.__init__)  # diffusers reads the config keys from it

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """DDIM's descending timesteps for ``num_inference_steps`` steps; clears the BDIA state, so each pipeline
        call starts a new trajectory."""
        timesteps = self._grid(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.state = None

    def regenerate_from(self, pair: BDIAInvertedPair | None) -> None:
        """Make the next trajectories that start from ``pair.upper`` at ``pair.timestep`` continue exactly with
        ``pair.lower`` (the BDIA pair an inversion produced) instead of a DDIM step; kept across
        ``set_timesteps`` (Pix2Pix-Zero runs two passes) until ``regenerate_from(None)``."""
        if pair is not None:
            pair.check_regenerates_with(self.config.gamma)
        self.start_pair = pair

    def _starts_the_pair(self, t: int, sample: torch.Tensor) -> bool:
        pair = self.start_pair
        if pair is None or pair.upper.shape != sample.shape:
            return False
        if not torch.equal(pair.upper.to(device=sample.device, dtype=sample.dtype), sample):
            return False
        if t != int(pair.timestep):
            warnings.warn(f"the sample equals the registered pair's upper latent but the step is at timestep {t}, "
                          f"not {pair.timestep}: different num_inference_steps or spacing; stepping without the "
                          "pair (not an exact regeneration)", UserWarning, stacklevel=3)
            return False
        return True

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BDIADDIMSchedulerOutput | tuple:
        """One BDIA-DDIM step from ``sample`` at ``timestep`` given the model's output there (see the module
        notes). Returns ``prev_sample`` (the latent at ``timestep - num_train_timesteps // num_inference_steps``)
        and the model's ``x0``, in DDIM's dtype."""
        if eta != 0:
            raise ValueError(f"BDIADDIMScheduler is deterministic: eta must be 0, got eta={eta} (BDIA integrates the "
                             "probability-flow ODE; for stochastic DDIM sampling use diffusers' DDIMScheduler)")
        bdia_step = float(self.config.gamma) != 0.0  # gamma = 0 is DDIMScheduler, off-grid timesteps included
        t = self._timestep(timestep, model_output, sample, on_grid=bdia_step)
        t_next = t - self._step_ratio()
        x0, eps = self._x0_and_eps(model_output, sample, self.alphas_cumprod[t], use_clipped_model_output)
        state = self.state
        if state is not None and state.timestep <= t:  # not a continuation: a new trajectory starts here
            state = None
        if bdia_step:
            self._check_continuation(state, sample)
        if state is None and self._starts_the_pair(t, sample):
            prev_sample = self.start_pair.lower.to(device=sample.device, dtype=sample.dtype).clone()
        else:
            prev_sample = self._ddim_to(x0, eps, self._alpha_bar(t_next))  # exactly DDIMScheduler's output
            gamma = float(self.config.gamma)
            if state is not None and gamma != 0.0:
                work = torch.promote_types(prev_sample.dtype, torch.float32)
                back = self._ddim_to(x0, eps, self.alphas_cumprod[state.timestep])
                correction = gamma * (state.sample.to(work) - back.to(work))
                prev_sample = (prev_sample.to(work) + correction).to(prev_sample.dtype)
        self.state = BDIASchedulerState(sample.detach().clone(), t)
        if not return_dict:
            return (prev_sample, x0)
        return BDIADDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class BDIADDIMInverseScheduler(_BDIABase):
    """The exact inverse of :class:`BDIADDIMScheduler`, usable as a pipeline's ``inverse_scheduler``; see the
    module notes.

    Config: the same keys as :class:`BDIADDIMScheduler` (build both from one config, with the same ``gamma``).
    ``gamma`` must lie in (0, 1] (the inverse divides by it); **default 1**, the value whose round-off is not
    amplified (about ``gamma^-N`` otherwise). ``set_alpha_to_one`` means what it means for sampling: the clean
    level is ``a = 1`` (True) or ``alphas_cumprod[0]`` (False).

    ``clip_sample`` / ``thresholding`` warn: both directions clip ``x0`` identically, so regenerating from the
    pair stays exact, but the inverted latents are no longer an inversion of the sampling ODE (clipping is
    pixel-space DDPM practice; latent models use neither).

    Exactness needs the sampler to see the same model outputs as the inversion: a pipeline that alters the noise
    prediction while inverting (DiffEdit's ``num_reg_steps > 0``, Pix2Pix-Zero's default ``num_reg_steps=5``) or
    the latents while sampling (Pix2Pix-Zero's cross-attention guidance) still runs, but does not regenerate
    exactly. Differences from ``DDIMInverseScheduler``: the timesteps (see ``set_timesteps``; DDIM's inverse
    evaluates the model one grid level above the latent's) and ``gamma``. ``initial_alpha_cumprod`` (its name
    there) is ``final_alpha_cumprod``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("gamma", 1.0)
        super().__init__(*args, **kwargs)
        if self.config.clip_sample or self.config.thresholding:
            option = "thresholding" if self.config.thresholding else "clip_sample"
            warnings.warn(f"{option}=True in an inverse scheduler: x0 is clipped identically when inverting and "
                          "when sampling, so regeneration from the inverted pair stays exact, but the inverted "
                          "latents are not an inversion of the sampling ODE (set clip_sample=False and "
                          "thresholding=False, as latent diffusion models do)", UserWarning, stacklevel=2)
        self.initial_alpha_cumprod = self.final_alpha_cumprod  # DDIMInverseScheduler's name for the clean level
        self.grid: np.ndarray | None = None
        self.inverted_pair: BDIAInvertedPair | None = None

    __init__.__signature__ = inspect.signature(_BDIABase.__init__).replace(parameters=[
        p.replace(default=1.0) if p.name == "gamma" else p
        for p in inspect.signature(_BDIABase.__init__).parameters.values()])

    @staticmethod
    def _check_gamma(gamma) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"BDIADDIMInverseScheduler needs gamma in (0, 1] (the inverse divides by gamma; use the "
                             f"sampling scheduler's gamma), got {gamma}")

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """``[t_1, t_1, t_2, ..., t_{N-1}]`` for the sampling grid ``t_N > ... > t_1``: the first step takes the
        clean latent to level ``t_1``, step ``k`` takes ``z_k`` (at ``t_k``, where the model is evaluated) to
        ``t_{k+1}``. Clears the state."""
        grid = self._grid(num_inference_steps)[::-1].copy()  # ascending
        self.num_inference_steps = int(num_inference_steps)
        self.grid = grid
        self.timesteps = torch.from_numpy(np.concatenate([grid[:1], grid[:-1]])).to(device)
        self.state = None
        self.inverted_pair = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> BDIADDIMSchedulerOutput | tuple:
        """One inversion step at ``timestep`` (the model was evaluated at ``sample`` with this label). Without a
        remembered latent (a new trajectory), a DDIM inversion step from the level below ``timestep`` up to it;
        else the exact BDIA inverse from ``timestep`` to the next grid timestep. ``inverted_pair`` holds
        ``(output, sample)`` afterwards."""
        if self.grid is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        t = self._timestep(timestep, model_output, sample)
        below = t - self._step_ratio()  # where BDIADDIMScheduler's step from t lands
        state = self.state
        if state is not None and state.timestep >= t:  # not a continuation: a new trajectory starts here
            state = None
        self._check_continuation(state, sample)
        if state is None:
            # DDIM inversion, the sample taken to be at level `below`, the model output (label t) used as its eps
            x0, eps = self._x0_and_eps(model_output, sample, self._alpha_bar(below))
            prev_sample = self._ddim_to(x0, eps, self.alphas_cumprod[t])
            self.state = BDIASchedulerState(sample.detach().clone(), below)
            t_out = t
        else:
            ahead = self.grid[self.grid > t]
            if len(ahead) == 0:
                raise ValueError(f"timestep {t} is the top of the grid {self.grid.tolist()}: nothing above it to "
                                 "invert to")
            t_out = int(ahead[0])
            x0, eps = self._x0_and_eps(model_output, sample, self.alphas_cumprod[t])
            work = torch.promote_types(sample.dtype, torch.float32)
            back = self._ddim_to(x0, eps, self._alpha_bar(below)).to(work)
            up = self._ddim_to(x0, eps, self.alphas_cumprod[t_out]).to(work)
            gamma = float(self.config.gamma)
            prev_sample = ((state.sample.to(work) - back) / gamma + up).to(sample.dtype)
            self.state = BDIASchedulerState(sample.detach().clone(), t)
        self.inverted_pair = BDIAInvertedPair(prev_sample.detach().clone(), sample.detach().clone(), t_out,
                                              float(self.config.gamma))
        if not return_dict:
            return (prev_sample, x0)
        return BDIADDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
