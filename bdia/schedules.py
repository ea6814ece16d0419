"""Noise-level grids.

Every function here returns noise levels in EDM's convention: ``x = x0 + sigma * n``, as a 1-D float64
tensor, strictly descending, ending at the terminal level (0 for the Karras grid; sigma of the final
alpha-bar for a VP grid).  Solvers index these arrays; they never compute "the next time" themselves.

VP (variance-preserving) facts used throughout, with alpha-bar = ``alphas_cumprod[t]``:

* latent ``z = alpha * x0 + sigma_z * eps`` with ``alpha = sqrt(alpha_bar)``, ``sigma_z = sqrt(1 - alpha_bar)``;
* EDM coordinates ``x = z / alpha`` with ``sigma = sigma_z / alpha = sqrt((1 - alpha_bar) / alpha_bar)``;
* hence ``alpha = 1 / sqrt(1 + sigma**2)``  (:func:`vp_alpha`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "karras_sigmas",
    "make_alphas_cumprod",
    "vp_timesteps",
    "vp_sigmas",
    "vp_alpha",
    "z_to_x",
    "x_to_z",
    "sigmas_from_alphas_cumprod",
    "sigma_to_timestep",
    "as_sigmas",
    "flow_time",
    "flow_sigma",
    "TIMESTEP_SPACINGS",
    "SD_SCHEDULE",
    "DDPM_SCHEDULE",
]

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

#: Stable Diffusion v1.x / v2.x-base scheduler settings: the keyword arguments of diffusers'
#: ``DDIMScheduler`` from the checkpoints' ``scheduler_config.json`` (no x0 clipping: an ODE solver must not clip).
SD_SCHEDULE = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)

#: DDPM (Ho et al. 2020) linear beta schedule.
DDPM_SCHEDULE = dict(
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    num_train_timesteps=1000,
)


#: Bound on a grid's step count (the grid is allocated from it; the apps allow 100 000).
MAX_GRID_STEPS = 1_000_000


def karras_sigmas(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    round_sigma=None,
) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): ``num_steps`` levels from ``sigma_max`` down to
    ``sigma_min``, evenly spaced in ``sigma ** (1 / rho)``, then ``0`` appended (``num_steps + 1`` values).

    ``round_sigma`` (a network's ``round_sigma``) is applied to the levels before 0 is appended, as EDM's
    sampler does; the identity for EDM-preconditioned networks.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 2 <= num_steps <= MAX_GRID_STEPS:
        raise ValueError(f"karras_sigmas needs an integer num_steps in 2..{MAX_GRID_STEPS}, got {num_steps!r}")
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    step = torch.arange(num_steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + step / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    if round_sigma is not None:
        sigmas = torch.as_tensor(round_sigma(sigmas), dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_alphas_cumprod(
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``alphas_cumprod`` for the beta schedules diffusers defines.

    * ``linear``: ``beta = linspace(beta_start, beta_end, T)`` (DDPM);
    * ``scaled_linear``: ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (Stable Diffusion);
    * ``squaredcos_cap_v2``: the cosine schedule (Nichol & Dhariwal) with betas capped at 0.999.

    diffusers builds its betas in float32; pass ``dtype=torch.float32`` to get its numbers exactly. The
    default float64 is what exactness tests want.
    """
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=dtype)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=dtype) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=dtype
        )
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; choose one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def vp_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending integer timesteps, exactly as diffusers' ``DDIMScheduler.set_timesteps`` picks them."""
    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        step_ratio = T // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        timesteps += steps_offset
    elif timestep_spacing == "trailing":
        step_ratio = T / num_steps
        timesteps = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
        timesteps -= 1
    else:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if timesteps.max() >= T or timesteps.min() < 0:
        raise ValueError(
            f"timesteps {timesteps.min()}..{timesteps.max()} fall outside [0, {T - 1}] "
            f"(steps_offset={steps_offset}, timestep_spacing={timestep_spacing!r})"
        )
    return timesteps


def sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """The training-time noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)``, ascending in ``t`` (float64)."""
    abar = torch.as_tensor(alphas_cumprod).to(torch.float64)
    return ((1 - abar) / abar).sqrt()


def vp_sigmas(
    alphas_cumprod,
    num_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> torch.Tensor:
    """Sampling grid of a discrete VP model in EDM's sigma convention (``num_steps + 1`` values).

    The first ``num_steps`` levels are ``sigma_t`` at diffusers' timesteps (:func:`vp_timesteps`); the last is
    the level DDIM's final step lands on: ``0`` when ``set_alpha_to_one`` (final alpha-bar 1), else
    ``sigma_0`` (final alpha-bar ``alphas_cumprod[0]``; about 0.0292 for Stable Diffusion).
    Defaults equal diffusers' ``DDIMScheduler`` defaults; Stable Diffusion uses :data:`SD_SCHEDULE`.

    Note on parity with diffusers: our solvers step from each level to the *next level in this array*.
    diffusers' DDIM steps from ``t`` to ``t - T // num_steps``, which is the next timestep for "leading"
    spacing (any ``num_steps``) and for "trailing" when ``num_steps`` divides ``T``, but not in general
    for "linspace".
    """
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = vp_timesteps(num_steps, len(train_sigmas), timestep_spacing, steps_offset)
    final = train_sigmas.new_zeros(1) if set_alpha_to_one else train_sigmas[:1]
    return torch.cat([train_sigmas[torch.from_numpy(timesteps)], final])


def vp_alpha(sigma):
    """VP signal scale ``alpha = sqrt(alpha_bar) = 1 / sqrt(1 + sigma**2)`` for an EDM-convention sigma."""
    if isinstance(sigma, torch.Tensor):
        return (1 + sigma.to(torch.float64) ** 2).rsqrt()
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


def flow_time(sigma):
    """Rectified-flow time ``t = sigma / (1 + sigma)`` of an EDM-convention ``sigma`` (``inf`` -> 1, 0 -> 0).

    A flow-matching model's latent ``x_t = (1 - t) x0 + t eps`` is EDM's ``x = x0 + sigma eps`` scaled by
    ``s = 1 - t = 1 / (1 + sigma)``: ``x_t = s x``, ``t = s sigma``. A tensor gives a float64 tensor."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(torch.float64)
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    sigma = float(sigma)
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def flow_sigma(t):
    """EDM-convention ``sigma = t / (1 - t)`` of a rectified-flow time ``t`` in [0, 1] (1 -> ``inf``); the inverse of
    :func:`flow_time` (up to one rounding). A tensor gives a float64 tensor."""
    if isinstance(t, torch.Tensor):
        t = t.to(torch.float64)
        return torch.where(t == 1, torch.full_like(t, math.inf), t / (1 - torch.where(t == 1, torch.zeros_like(t), t)))
    t = float(t)
    return math.inf if t == 1.0 else t / (1.0 - t)


def z_to_x(z: torch.Tensor, sigma) -> torch.Tensor:
    """VP latent ``z`` at level ``sigma`` -> EDM-scaled state ``x = z / alpha`` (float64). The one z <-> x map:
    Stable Diffusion's UNet sees ``z``, every solver works on ``x``."""
    return z.to(torch.float64) / vp_alpha(torch.as_tensor(sigma, dtype=torch.float64)).to(z.device)


def x_to_z(x: torch.Tensor, sigma) -> torch.Tensor:
    """EDM-scaled state ``x`` at level ``sigma`` -> VP latent ``z = alpha x`` (float64)."""
    return x.to(torch.float64) * vp_alpha(torch.as_tensor(sigma, dtype=torch.float64)).to(x.device)


def sigma_to_timestep(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Map EDM-convention sigmas to (possibly fractional) discrete timestep labels.

    ``train_sigmas`` is ascending in ``t`` (:func:`sigmas_from_alphas_cumprod`). A sigma on the training grid
    returns its integer ``t`` exactly (as a float64 value); between two grid levels the label is interpolated
    linearly in ``log sigma``, as k-diffusion does. Sigmas outside ``[train_sigmas[0], train_sigmas[-1]]`` raise
    ``ValueError``: the network was never trained there.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    table = train_sigmas.to(dtype=torch.float64, device=sigma.device)
    lo_ok = sigma >= table[0] * (1 - 1e-12)
    hi_ok = sigma <= table[-1] * (1 + 1e-12)
    if not bool((lo_ok & hi_ok).all()):
        bad = sigma[~(lo_ok & hi_ok)].flatten()[0].item()
        raise ValueError(
            f"sigma={bad:.6g} is outside the model's trained range "
            f"[{table[0].item():.6g}, {table[-1].item():.6g}]"
        )
    log_table = table.log()
    log_sigma = sigma.clamp(table[0], table[-1]).log()
    hi = torch.searchsorted(log_table, log_sigma).clamp(1, len(table) - 1)
    lo = hi - 1
    exact_hi = log_table[hi] == log_sigma
    w = (log_sigma - log_table[lo]) / (log_table[hi] - log_table[lo])
    t = torch.where(exact_hi, hi.to(torch.float64), lo.to(torch.float64) + w)
    return t


def as_sigmas(sigmas) -> torch.Tensor:
    """Validate a sampling grid and return it as a 1-D float64 CPU tensor.

    Requires at least 3 levels (2 steps), strictly descending, all positive except possibly the last, which may
    be 0, and finite except possibly the first, which may be ``inf``: pure noise, the start ``t = 1`` of a
    flow-matching grid (:func:`flow_time`), where only a model stepping in its own coordinates can start.
    """
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.detach().to(device="cpu", dtype=torch.float64)
    else:
        s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    if s.ndim > 1:
        raise ValueError(f"sigmas must be a 1-D grid of noise levels, got shape {list(s.shape)}")
    s = s.flatten()
    if s.numel() < 3:
        raise ValueError(
            f"need at least 2 steps (3 sigma levels, the terminal one included), got {s.numel()} level(s)"
        )
    if not bool(torch.isfinite(s[1:]).all()) or not bool(s[0] > -math.inf):  # s[0] may be +inf, not NaN or -inf
        raise ValueError("sigmas contain NaN or Inf (only sigmas[0] may be inf: a flow grid's t = 1)")
    diffs = s[1:] - s[:-1]
    if not bool((diffs < 0).all()):
        i = int(torch.nonzero(diffs >= 0)[0])
        raise ValueError(
            f"sigmas must be strictly descending; sigmas[{i}]={s[i].item():.6g} <= sigmas[{i + 1}]={s[i + 1].item():.6g}"
        )
    if not bool((s[:-1] > 0).all()) or s[-1] < 0:
        raise ValueError("sigmas must be positive, except the last, which may be 0")
    return s
