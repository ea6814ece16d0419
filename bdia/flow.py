"""Flow-matching models (rectified flow: Stable Diffusion 3, FLUX) for the solvers: grids and the model adapter.

**The maths.** A flow-matching model carries latents ``x_t = (1 - t) x0 + t eps`` from data (``t = 0``) to noise
(``t = 1``) and predicts the velocity ``v = dx_t/dt ~ eps - x0``. With ``s = 1 - t`` and ``sigma = t / (1 - t)``,
``x = x_t / s = x0 + sigma eps`` is EDM's state, so the model is one more denoiser,
``D(x, sigma) = x_t - t v(x_t, t)`` (:func:`bdia.schedules.flow_time` / :func:`bdia.schedules.flow_sigma`). Flow
Euler, ``x_t' = x_t + (t' - t) v`` (diffusers' ``FlowMatchEulerDiscreteScheduler``), is DDIM (eta = 0) there,
exactly as DDIM on VP latents is Euler in sigma on ``x``.

**Coordinates.** The grid starts at pure noise, ``t = 1``: ``sigma = inf``, where ``x`` is infinite. So the solvers
step a flow model in its own coordinates: a :class:`FlowDenoiser` says ``coordinates = "flow"``; its states are
the latents ``x_t`` (start from the noise itself, as diffusers' pipelines do), it is called as
``model(x_t, sigma, **cond)`` with an EDM-convention ``sigma`` (``inf`` allowed) and returns the velocity. Every
solver map is then the same formula in ``(x_t, t)`` (:mod:`bdia.solvers`): ``ddim`` is flow Euler, ``edm`` is flow
Heun (diffusers' ``FlowMatchHeunDiscreteScheduler``), ``bdia_ddim`` combines in ``x_t``:

    x_t{k+1} = gamma (x_t{k-1} - Phi(x_t{k}; t_k -> t_{k-1})) + Phi(x_t{k}; t_k -> t_{k+1}),   Phi = flow Euler,

one network call per step, and its inverse runs the same maps backwards.

**Grids.** :func:`flow_schedule` reproduces ``FlowMatchEulerDiscreteScheduler.set_timesteps`` op for op (every
config key, custom ``sigmas``, ``mu``): its ``sigmas`` (the flow times ``t``, float32, the terminal one appended)
and ``timesteps``. :func:`flow_sigmas` turns them into the EDM-convention grid the solvers take; its flow times
round to diffusers' float32 ``sigmas`` exactly.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from .denoisers import _per_row
from .schedules import flow_sigma, flow_time

__all__ = [
    "FLOW_PREDICTIONS",
    "FLOW_SCHEDULE_KEYS",
    "FlowDenoiser",
    "flow_schedule",
    "flow_sigmas",
    "flow_shift_mu",
    "MAX_FLOW_STEPS",
]

#: What a flow network predicts: the velocity ``eps - x0`` (SD3, FLUX), the clean sample, or the noise.
FLOW_PREDICTIONS = ("velocity", "sample", "epsilon")

#: ``FlowMatchEulerDiscreteScheduler``'s config keys (diffusers 0.42), with its defaults.
FLOW_SCHEDULE_KEYS = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    time_shift_type="exponential",
    stochastic_sampling=False,
)

#: Bound on the number of steps of a flow grid (it sizes allocations).
MAX_FLOW_STEPS = 100_000


def flow_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of image tokens, ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (diffusers' ``calculate_shift``, which the
    SD3 and FLUX pipelines pass to ``set_timesteps(mu=...)``)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    b = base_shift - m * base_image_seq_len
    return image_seq_len * m + b


def _check_schedule_config(config: dict) -> dict:
    unknown = sorted(set(config) - set(FLOW_SCHEDULE_KEYS))
    if unknown:
        raise ValueError(f"unknown flow schedule key(s) {unknown}; FlowMatchEulerDiscreteScheduler takes "
                         f"{sorted(FLOW_SCHEDULE_KEYS)}")
    cfg = {**FLOW_SCHEDULE_KEYS, **config}
    T = cfg["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or not 1 <= T <= MAX_FLOW_STEPS:
        raise ValueError(f"num_train_timesteps must be an integer in 1..{MAX_FLOW_STEPS}, got {T!r}")
    if sum(bool(cfg[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {cfg['time_shift_type']!r}")
    shift = cfg["shift"]
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if cfg["shift_terminal"] is not None and not 0 <= float(cfg["shift_terminal"]) < 1:
        raise ValueError(f"shift_terminal must lie in [0, 1), got {cfg['shift_terminal']!r}")
    return cfg


def _time_shift(cfg: dict, mu: float, t):
    """Dynamic shifting, as diffusers writes it (``sigma`` = 1.0): exponential ``e^mu / (e^mu + (1/t - 1))``,
    linear ``mu / (mu + (1/t - 1))``."""
    if cfg["time_shift_type"] == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_schedule(num_steps: int | None = None, sigmas=None, mu: float | None = None, **config):
    """``(times, timesteps)`` exactly as ``FlowMatchEulerDiscreteScheduler(**config).set_timesteps(num_steps,
    sigmas=sigmas, mu=mu)`` leaves its ``sigmas`` and ``timesteps``: float32 tensors, ``times`` the flow times
    ``t`` of the ``N`` steps with the terminal level appended (0; 1 under ``invert_sigmas``, Mochi's convention,
    where they are ``1 - t``), ``timesteps`` the ``N`` network labels (``t * num_train_timesteps``).

    The same operations in the same dtypes as diffusers 0.42: the training grid in float32 (its ends, shifted
    once, set the range), a float64 ramp (custom ``sigmas``: float32), ``shift`` or dynamic shifting with ``mu``
    (``time_shift_type``), ``shift_terminal`` stretching, then Karras / exponential / beta spacing, rounded to
    float32. ``stochastic_sampling`` does not change the grid."""
    cfg = _check_schedule_config(config)
    if cfg["use_dynamic_shifting"] and mu is None:
        raise ValueError("use_dynamic_shifting needs mu (FLUX: flow_shift_mu(image_seq_len, ...))")
    if sigmas is not None:
        sigmas = np.asarray(sigmas)
        if sigmas.ndim != 1 or not 1 <= sigmas.size <= MAX_FLOW_STEPS:
            raise ValueError(f"custom sigmas must be a list of 1..{MAX_FLOW_STEPS} flow times, got shape {sigmas.shape}")
        if num_steps is not None and num_steps != sigmas.size:
            raise ValueError(f"num_steps ({num_steps}) differs from the number of custom sigmas ({sigmas.size})")
    elif isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= MAX_FLOW_STEPS:
        raise ValueError(f"num_steps must be an integer in 1..{MAX_FLOW_STEPS}, got {num_steps!r}")
    T = int(cfg["num_train_timesteps"])
    shift = float(cfg["shift"])

    # __init__: the training grid (float32), shifted unless shifting is dynamic; its ends set the range
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()).to(dtype=torch.float32) / T
    if not cfg["use_dynamic_shifting"]:
        train = shift * train / (1 + (shift - 1) * train)
    sigma_min, sigma_max = train[-1].item(), train[0].item()

    # set_timesteps
    if sigmas is None:
        num_steps = int(num_steps)
        times = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    else:
        times = np.array(sigmas).astype(np.float32)
        num_steps = len(times)
    if cfg["use_dynamic_shifting"]:
        times = _time_shift(cfg, mu, times)
    else:
        times = shift * times / (1 + (shift - 1) * times)
    if cfg["shift_terminal"]:
        one_minus = 1 - times
        scale_factor = one_minus[-1] / (1 - cfg["shift_terminal"])
        times = 1 - (one_minus / scale_factor)
    if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"] or cfg["use_beta_sigmas"]:
        low, high = times[-1].item(), times[0].item()
        if cfg["use_karras_sigmas"]:
            rho = 7.0
            ramp = np.linspace(0, 1, num_steps)
            times = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
        elif cfg["use_exponential_sigmas"]:
            times = np.exp(np.linspace(math.log(high), math.log(low), num_steps))
        else:
            import scipy.stats  # diffusers needs scipy for beta sigmas too

            times = np.array([low + (ppf * (high - low)) for ppf in [
                scipy.stats.beta.ppf(step, 0.6, 0.6) for step in 1 - np.linspace(0, 1, num_steps)]])
    times = torch.from_numpy(np.asarray(times)).to(dtype=torch.float32)
    timesteps = times * T
    if cfg["invert_sigmas"]:
        times = 1.0 - times
        timesteps = times * T
        times = torch.cat([times, torch.ones(1)])
    else:
        times = torch.cat([times, torch.zeros(1)])
    return times, timesteps


def flow_sigmas(num_steps: int | None = None, sigmas=None, mu: float | None = None, **config) -> torch.Tensor:
    """The solvers' grid (EDM convention, float64, ``num_steps + 1`` levels) for a flow model with
    ``FlowMatchEulerDiscreteScheduler`` settings ``config``: ``sigma = t / (1 - t)`` of :func:`flow_schedule`'s
    flow times (``inf`` at ``t = 1``, 0 appended). ``bdia.schedules.flow_time(flow_sigmas(...))`` rounds to
    diffusers' float32 ``scheduler.sigmas`` exactly (under ``invert_sigmas``: to ``1 - scheduler.sigmas``).

    ``num_steps`` with ``shift`` (SD3: 3), or ``mu`` with ``use_dynamic_shifting`` (FLUX; :func:`flow_shift_mu`),
    or custom flow times ``sigmas`` (FLUX's pipeline passes ``linspace(1, 1/N, N)``), as diffusers takes them."""
    times, _ = flow_schedule(num_steps, sigmas=sigmas, mu=mu, **config)
    t = times.to(torch.float64)
    if config.get("invert_sigmas"):
        t = 1.0 - t
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"flow times must lie in [0, 1], got {t.min().item():.6g}..{t.max().item():.6g}")
    return flow_sigma(t)


class FlowDenoiser(nn.Module):
    """A flow-matching network as a solver's model (coordinates ``"flow"``; see the module notes).

    ``model(x_t, timestep, **cond)`` predicts, for ``x_t = (1 - t) x0 + t eps``, the velocity ``eps - x0``
    (``prediction_type="velocity"``: SD3, FLUX), the clean sample ``x0`` (``"sample"``) or the noise ``eps``
    (``"epsilon"``); ``timestep = t * timestep_scale`` (diffusers' label, ``num_train_timesteps = 1000``), rounded
    to float32 as diffusers' flow schedulers keep it. The call ``D(x_t, sigma, class_labels=None, **cond)`` takes the
    latent ``x_t`` and an EDM-convention ``sigma`` (``t = sigma / (1 + sigma)``; ``inf`` is ``t = 1``) and returns
    the velocity ``dx_t/dt`` in the state's dtype:

    * velocity: the output itself;  * sample: ``(x_t - x0) / t``;  * epsilon: ``(eps - x_t) / (1 - t)``, undefined
      at ``t = 1`` (the noise there says nothing about ``x0``), where it raises.

    The model runs in ``model_dtype`` (default: its floating-point parameters' dtype). ``model`` may return a
    tensor, a tuple (first entry) or an object with ``.sample``. :meth:`denoised` gives EDM's
    ``D = x_t - t v`` (the clean estimate) for those who want it; the solvers use the velocity.
    """

    coordinates = "flow"

    def __init__(self, model, prediction_type: str = "velocity", timestep_scale: float = 1000.0,
                 model_dtype: torch.dtype | None = None):
        super().__init__()
        if prediction_type not in FLOW_PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {FLOW_PREDICTIONS}, got {prediction_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        self.timestep_scale = float(timestep_scale)
        self.model_dtype = model_dtype
        self.sigma_min = 0.0
        self.sigma_max = math.inf

    def round_sigma(self, sigma):
        return sigma

    def _dtype(self, x):
        if self.model_dtype is not None:
            return self.model_dtype
        parameters = self.model.parameters() if isinstance(self.model, nn.Module) else ()
        return next((p.dtype for p in parameters if p.is_floating_point()), x.dtype)

    def forward(self, x, sigma, class_labels=None, **cond):
        if class_labels is not None:
            cond = {"class_labels": class_labels, **cond}
        t = flow_time(_per_row(sigma, x))  # [B, 1, ..., 1] float64
        if self.prediction_type == "epsilon" and bool((t == 1).any()):
            raise ValueError("an epsilon-prediction flow cannot be evaluated at t = 1 (sigma = inf): the noise "
                             "there carries no information about x0; start the grid below t = 1")
        timestep = (t.flatten() * self.timestep_scale).to(torch.float32)
        out = self.model(x.to(self._dtype(x)), timestep, **cond)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        out = out.to(torch.float64)
        if self.prediction_type == "sample":
            out = (x.to(torch.float64) - out) / t
        elif self.prediction_type == "epsilon":
            out = (out - x.to(torch.float64)) / (1 - t)
        return out.to(x.dtype)

    def denoised(self, x, sigma, class_labels=None, **cond):
        """EDM's denoiser output ``D = x_t - t v`` (the estimate of ``x0``) at latent ``x`` and level ``sigma``."""
        t = flow_time(_per_row(sigma, x)).to(x.dtype)
        return x - t * self(x, sigma, class_labels, **cond)
