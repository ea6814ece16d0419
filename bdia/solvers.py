"""Solvers: DDIM, EDM (Heun), and their BDIA versions with exact inversion.

Conventions (``docs/design.md`` draws where they bite):

* ``sigmas`` is a strictly descending float64 grid in EDM's convention ``x = x0 + sigma * n``, with
  ``N + 1`` levels for ``N`` steps; ``x_k`` is the state at ``sigmas[k]`` (``k = 0`` pure noise, ``k = N``
  data). The paper counts the other way: its ``z_i`` is our ``k = N - i``.
* ``d(x, sigma) = (x - D(x, sigma)) / sigma`` is the probability-flow ODE's ``dx/dsigma`` (EDM eq. 3, s = 1).
  For a VP model it is the noise estimate eps.
* gamma = 0 is the base solver; gamma = 1 is "full" BDIA. The first sampling step is a plain base step.
* BDIA with a one-step map Phi of the current state only (paper eq. in k-index):

      x_{k+1} = gamma * c_k * (x_{k-1} - Phi(x_k; k -> k-1)) + Phi(x_k; k -> k+1)

  with ``c_k = alpha_{k-1} / alpha_{k+1}`` for BDIA-DDIM: the paper states BDIA-DDIM on VP latents
  ``z = alpha * x``; dividing its z-space update by ``alpha_{k+1}`` gives exactly this x-space form,
  ``alpha = 1 / sqrt(1 + sigma**2)``. BDIA-EDM's coordinates are an option, chosen by measurement
  (``make study``): ``space="vp"`` (default) is the same factor with ``alpha = 1 / sqrt(sigma_data**2 + sigma**2)``,
  ``space="x"`` is ``c_k = 1`` (EDM's x-space, s(t) = 1).
* Inversion runs the same recurrence backwards, ``x_{k-1} = (x_{k+1} - Phi_fwd) / (gamma c_k) + Phi_back``,
  with both maps evaluated at the middle state ``x_k``; it is exact up to round-off, which it amplifies
  by about ``1 / gamma`` per step.
* **Flow-matching models** (a denoiser with ``coordinates = "flow"``, :class:`bdia.flow.FlowDenoiser`): the
  states are the model's own latents ``x_t = (1 - t) x0 + t eps = x / (1 + sigma)``, the time variable is
  ``t = sigma / (1 + sigma)`` (:func:`bdia.schedules.flow_time`) and the model returns the velocity
  ``dx_t/dt``. Every map above steps in ``(x_t, t)`` instead of ``(x, sigma)``: Euler there is flow Euler,
  ``x_t + (t' - t) v``, which is DDIM (eta = 0) again; Heun there is diffusers' flow Heun. So a flow grid may
  start at pure noise, ``t = 1`` (``sigma = inf``), where ``x`` is infinite but ``x_t`` is the noise itself. The
  factors ``c_k`` are those of the same combination space written in ``x_t`` (:func:`bdia.gammas.scale_in`):
  BDIA-DDIM combines in the model's own latents, ``c_k = 1``.

The BDIA state is the pair of the last two states, an explicit :class:`StatePair` value passed in and
returned; nothing is kept on objects between calls.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch

from .gammas import (  # noqa: F401  (public here too)
    GAMMA_SCHEDULES,
    UNSTABLE_ROUNDTRIP_ERROR,
    check_invertible,
    gamma_schedule,
    predicted_roundtrip_error,
)
from .gammas import ddim_scale as _ddim_scale
from .gammas import scale_in, unit_scale
from .gammas import vp_scale as _vp_scale  # noqa: F401  (the tests' name)
from .schedules import as_sigmas, flow_time
from .multistep import dpmpp_2m, ipndm, unipc
from .rex import invert_rex, rex

__all__ = [
    "StatePair",
    "SOLVERS",
    "INVERTIBLE_SOLVERS",
    "GAMMA_SCHEDULES",
    "ddim",
    "edm",
    "bdia_ddim",
    "bdia_edm",
    "invert_bdia_ddim",
    "invert_bdia_edm",
    "bdia_combine",
    "bdia_uncombine",
    "gamma_schedule",
    "predicted_roundtrip_error",
    "sample",
    "invert",
    "dpmpp_2m",
    "unipc",
    "ipndm",
    "rex",
    "invert_rex",
]

SOLVERS = ("ddim", "bdia_ddim", "edm", "bdia_edm", "dpmpp_2m", "unipc", "ipndm", "rex")
INVERTIBLE_SOLVERS = ("bdia_ddim", "bdia_edm", "rex")
#: The solvers with a BDIA weight ``gamma`` (the others refuse one). Rex couples with ``zeta`` instead.
GAMMA_SOLVERS = ("bdia_ddim", "bdia_edm")
BACKWARD_MAPS = ("euler", "heun", "taylor", "exp")
SPACES = ("x", "vp")


class StatePair(NamedTuple):
    """Two consecutive BDIA states: ``x_end`` at one end of the sigma grid, ``x_inner`` one step inside it.

    ``sample(..., return_pair=True)`` returns ``(x at sigmas[-1], x at sigmas[-2])``; ``invert`` returns
    ``(x at sigmas[0], x at sigmas[1])``, which ``sample`` accepts as its starting point. For ``rex`` the second
    state is its coupled companion ``x_hat`` (:mod:`bdia.rex`): ``(x_N, x_hat_{N-1})`` and ``(x_0, x_hat_0)``.
    """

    x_end: torch.Tensor
    x_inner: torch.Tensor


# --------------------------------------------------------------------------------------------------
# The BDIA combinator and its inverse.


def bdia_combine(x_prev, x_fwd, x_back, coeff):
    """``x_next = coeff * (x_prev - x_back) + x_fwd``  (``coeff = gamma * c_k``)."""
    return coeff * (x_prev - x_back) + x_fwd


def bdia_uncombine(x_next, x_fwd, x_back, coeff):
    """Exact inverse of :func:`bdia_combine`: ``x_prev = (x_next - x_fwd) / coeff + x_back``."""
    return (x_next - x_fwd) / coeff + x_back


# --------------------------------------------------------------------------------------------------
# Helpers shared by the solvers.


def coordinates_of(denoiser) -> str:
    """The coordinates a model's states live in: ``"edm"`` (EDM's ``x``; the model returns ``denoised``; the
    default) or ``"flow"`` (a flow-matching model's latents ``x_t``; the model returns the velocity)."""
    coordinates = getattr(denoiser, "coordinates", "edm")
    if coordinates not in ("edm", "flow"):
        raise ValueError(f"a denoiser's coordinates must be 'edm' or 'flow', got {coordinates!r}")
    return coordinates


class _Problem:
    """The denoiser with its conditioning bound, the grid on the state's device, and checks.

    ``tau`` is the time variable the maps step in: ``sigma`` on EDM's ``x``, the flow time ``t`` on a flow's
    ``x_t`` (module notes); ``slope`` is the state's derivative in it."""

    def __init__(self, denoiser, sigmas, x, class_labels, cond):
        self.denoiser = denoiser
        self.sigmas = as_sigmas(sigmas)
        self.levels = self.sigmas.tolist()  # python floats, for branching without device syncs
        self.coordinates = coordinates_of(denoiser)
        if self.coordinates == "edm" and math.isinf(self.levels[0]):
            raise ValueError("sigmas[0] is inf (pure noise, a flow grid's t = 1), where EDM's x is infinite: only a "
                             "flow-matching model (coordinates 'flow', bdia.FlowDenoiser) starts there")
        self.sig = self.sigmas.to(device=x.device, dtype=x.dtype)  # 0-dim views of this feed the maths
        self.tau = self.sig if self.coordinates == "edm" else flow_time(self.sigmas).to(device=x.device, dtype=x.dtype)
        self.num_steps = len(self.levels) - 1
        self.class_labels = class_labels
        self.cond = dict(cond or {})

    def slope(self, x, k, sigma=None):
        """The state's derivative in ``tau`` at level ``sigmas[k]`` (or an explicit 0-dim ``sigma``): on EDM's x
        ``d = (x - D(x, sigma)) / sigma``; on a flow's ``x_t`` the model's velocity itself."""
        sigma = self.sig[k] if sigma is None else sigma
        out = self.denoiser(x, sigma, self.class_labels, **self.cond).to(x.dtype)
        if self.coordinates == "flow":
            return out
        return (x - out) / sigma

    def scale(self, scale_fn):
        """``scale_fn`` (an x-space factor ``c_k``) in this problem's coordinates (:func:`bdia.gammas.scale_in`)."""
        return scale_in(scale_fn, self.coordinates)

    def check(self, x, k, action="step"):
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"non-finite values (NaN/Inf) in the solver state after {action} {k} "
                f"(sigma {self.levels[k]:.6g} -> {self.levels[k + 1] if action == 'step' else self.levels[k - 1]:.6g})"
            )


def _euler(p: _Problem, x, k_from, k_to, d=None):
    """Euler step in sigma from ``sigmas[k_from]`` to ``sigmas[k_to]``; DDIM (eta = 0) on ``z = alpha x``.
    (On a flow: flow Euler in ``t``, the same DDIM step.)"""
    d = p.slope(x, k_from) if d is None else d
    return x + (p.tau[k_to] - p.tau[k_from]) * d, d


def _heun(p: _Problem, x, k_from, k_to, d=None, sigma_from=None):
    """EDM's Heun step; plain Euler when it lands on sigma = 0 (where the slope is undefined).
    ``sigma_from`` overrides ``sigmas[k_from]`` (EDM's churned level ``sigma_hat``).
    Returns ``(x_next, d, d_next)``: the two slopes it took (``d_next`` at the Euler predictor; None on sigma = 0)."""
    if sigma_from is not None and p.coordinates == "flow":
        raise ValueError("EDM's churn (s_churn > 0) raises sigma on EDM's x; it is not defined on a flow model")
    d = p.slope(x, k_from, sigma_from) if d is None else d
    h = p.tau[k_to] - (p.tau[k_from] if sigma_from is None else sigma_from)
    x_next = x + h * d
    d_next = None
    if p.levels[k_to] > 0:
        d_next = p.slope(x_next, k_to)
        x_next = x + h * (0.5 * d + 0.5 * d_next)
    return x_next, d, d_next


def _ddim_maps(p: _Problem, x, k, need_back=True):
    x_fwd, d = _euler(p, x, k, k + 1)
    x_back = _euler(p, x, k, k - 1, d)[0] if need_back else None
    return x_fwd, x_back


def _edm_backward(p: _Problem, backward, x, k, d, d_next):
    """``Phi_back(x_k; sigma_k -> sigma_{k-1})``, built from the slopes Heun's forward step took at ``x_k``
    (``d = d(x_k)``, ``d_next`` at its Euler predictor), so it depends on ``x_k`` alone and inversion stays exact.

    * ``euler``: ``x_k + h_b d``, first order (local error O(h^2)), no extra NFE.
    * ``heun``: a Heun step back, second order, one extra NFE.
    * ``taylor``: Heun's own quadratic in sigma, ``x_k + h d + h^2/2 * (d_next - d)/h_f`` (which is the Heun step at
      ``h = h_f``), evaluated at ``h = h_b``: second order, no extra NFE.
    * ``exp``: the same second-order extrapolation done on the denoised ``D = x - sigma d`` in ``u = 1/sigma``,
      where the ODE reads ``d(x/sigma)/du = D`` (the exponential integrator DPM-Solver++ uses); its correction is
      ``taylor``'s times ``sigma_{k+1}^2 / (sigma_k sigma_{k-1})``, damped where the Karras steps grow fast.

    On the last step (onto sigma = 0) Heun is Euler and has one slope, so every map but ``heun`` is Euler there.
    On a flow every map is the same formula in ``(x_t, t)``; for ``exp`` that is exact, not an analogy:
    ``x/sigma = x_t/t`` and ``u = 1/sigma``, and the correction works out to ``taylor``'s (in t) times
    ``t_{k+1}^2 / (t_k t_{k-1})``, finite at ``t_{k-1} = 1``.
    """
    h_b, h_f = p.tau[k - 1] - p.tau[k], p.tau[k + 1] - p.tau[k]
    x_back = x + h_b * d  # Euler
    if backward == "heun":
        return _heun(p, x, k, k - 1, d)[0]
    if backward == "euler" or d_next is None:
        return x_back
    taylor = h_b**2 / (2 * h_f) * (d_next - d)
    if backward == "taylor":
        return x_back + taylor
    return x_back + taylor * p.tau[k + 1] ** 2 / (p.tau[k] * p.tau[k - 1])  # "exp"


def _edm_maps(backward: str):
    def maps(p: _Problem, x, k, need_back=True):
        x_fwd, d, d_next = _heun(p, x, k, k + 1)
        return x_fwd, (_edm_backward(p, backward, x, k, d, d_next) if need_back else None)

    return maps


def _coefficients(p: _Problem, gammas, scale_fn):
    scale_fn = p.scale(scale_fn)
    return [0.0] + [gammas[k] * scale_fn(p.levels, k) for k in range(1, p.num_steps)]


def _progress(iterable, enabled, desc):
    if not enabled:  # the core needs only torch and numpy; tqdm draws the bar when asked for one
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Base solvers.


def ddim(denoiser, x, sigmas, class_labels=None, cond=None, progress=False) -> torch.Tensor:
    """Deterministic DDIM (eta = 0). On VP latents ``z = alpha x`` the DDIM update

        z_{k+1} = alpha_{k+1} (z_k - sigma^z_k eps_k) / alpha_k + sigma^z_{k+1} eps_k

    is exactly an Euler step of the probability-flow ODE in sigma on ``x``: ``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) eps_k``.
    One network evaluation per step.
    """
    p = _Problem(denoiser, sigmas, x, class_labels, cond)
    for k in _progress(range(p.num_steps), progress, "ddim"):
        x = _euler(p, x, k, k + 1)[0]
        p.check(x, k)
    return x


def edm(
    denoiser,
    x,
    sigmas,
    class_labels=None,
    cond=None,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress=False,
) -> torch.Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when ``s_churn = 0``, the default).

    Each step optionally raises the noise level to ``sigma_hat = sigma (1 + churn)`` with fresh noise
    (``churn = min(s_churn / N, sqrt(2) - 1)`` for ``s_min <= sigma <= s_max``), then takes a Heun step to the
    next level; the step onto sigma = 0 is Euler. NFE = 2N - 1 on a grid ending at 0 (18 steps: 35).
    ``randn_like`` supplies the churn noise (pass one bound to a per-image generator for reproducibility).
    """
    p = _Problem(denoiser, sigmas, x, class_labels, cond)
    N = p.num_steps
    for k in _progress(range(N), progress, "edm"):
        if s_churn > 0:
            # As EDM does, noise is drawn at every step of a stochastic run (also where churn is 0), so
            # per-image generators give EDM's stream.
            churn = min(s_churn / N, math.sqrt(2) - 1) if s_min <= p.levels[k] <= s_max else 0.0
            sigma_cur = p.sig[k]
            sigma_hat = torch.as_tensor(denoiser.round_sigma(sigma_cur + churn * sigma_cur)).to(x)
            x_hat = x + (sigma_hat**2 - sigma_cur**2).sqrt() * s_noise * randn_like(x)
            x = _heun(p, x_hat, k, k + 1, sigma_from=sigma_hat)[0]
        else:
            x = _heun(p, x, k, k + 1)[0]
        p.check(x, k)
    return x


# --------------------------------------------------------------------------------------------------
# BDIA: sampling and exact inversion over a one-step map pair.


def _bdia_sample(maps, scale_fn, denoiser, x_init, sigmas, gamma, solver, class_labels, cond, progress):
    first = x_init[0] if isinstance(x_init, (tuple, list)) else x_init
    p = _Problem(denoiser, sigmas, first, class_labels, cond)
    coeffs = _coefficients(p, gamma_schedule(gamma, p.sigmas, solver, scale_fn, p.coordinates), scale_fn)
    if isinstance(x_init, (tuple, list)):
        x_prev, x = x_init  # (x_0, x_1), e.g. from `invert`: continue with BDIA steps from k = 1
    else:
        x_prev, x = x_init, maps(p, x_init, 0, need_back=False)[0]  # the first step is a plain base step
        p.check(x, 0)
    for k in _progress(range(1, p.num_steps), progress, solver):
        x_fwd, x_back = maps(p, x, k, need_back=coeffs[k] != 0)
        x_next = x_fwd if coeffs[k] == 0 else bdia_combine(x_prev, x_fwd, x_back, coeffs[k])
        x_prev, x = x, x_next
        p.check(x, k)
    return StatePair(x, x_prev)


def _bdia_invert(maps, scale_fn, denoiser, x_last, sigmas, gamma, solver, class_labels, cond, progress):
    first = x_last[0] if isinstance(x_last, (tuple, list)) else x_last
    p = _Problem(denoiser, sigmas, first, class_labels, cond)
    N = p.num_steps
    gammas = gamma_schedule(gamma, p.sigmas, solver, scale_fn, p.coordinates)
    check_invertible(gammas, first.dtype, f"{solver} inversion with gamma={gamma!r}, N={N}")
    coeffs = _coefficients(p, gammas, scale_fn)
    if isinstance(x_last, (tuple, list)):
        x_next, x = x_last  # (x_N, x_{N-1}) as `sample(..., return_pair=True)` returns it
    else:
        # One approximate DDIM-inversion step from the clean state: the noise estimate at x_N with the
        # label of the target level sigma_{N-1} (the slope at sigma_N = 0 is undefined), as diffusers'
        # DDIMInverseScheduler does. Everything after it is exact.
        x_next = x_last
        x = x_last + (p.tau[N - 1] - p.tau[N]) * p.slope(x_last, N - 1)
        p.check(x, N, action="inversion step")
    for k in _progress(range(N - 1, 0, -1), progress, f"invert {solver}"):
        x_fwd, x_back = maps(p, x, k)
        x_prev = bdia_uncombine(x_next, x_fwd, x_back, coeffs[k])
        x_next, x = x, x_prev
        p.check(x, k, action="inversion step")
    return StatePair(x, x_next)


def bdia_ddim(denoiser, x_init, sigmas, gamma=1.0, class_labels=None, cond=None, progress=False) -> StatePair:
    """BDIA-DDIM (paper eq., z-space):

        z_{i-1} = gamma z_{i+1} - gamma DDIM_{i->i+1}(z_i) + DDIM_{i->i-1}(z_i),
        DDIM_{i->j}(z_i) = alpha_j (z_i - sigma^z_i eps_i) / alpha_i + sigma^z_j eps_i,

    computed on ``x = z / alpha`` (see the module notes). One network evaluation per step, like DDIM.
    ``x_init`` is the noise state at ``sigmas[0]`` or the pair ``(x_0, x_1)`` from :func:`invert_bdia_ddim`.
    Returns the pair ``(x_N, x_{N-1})``.
    """
    return _bdia_sample(_ddim_maps, _ddim_scale, denoiser, x_init, sigmas, gamma, "bdia_ddim", class_labels, cond, progress)


def _edm_options(backward, space, sigma_data):
    if backward not in BACKWARD_MAPS:
        raise ValueError(f"backward must be one of {list(BACKWARD_MAPS)}, got {backward!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    return _edm_maps(backward), (_vp_scale(float(sigma_data)) if space == "vp" else unit_scale)


def bdia_edm(
    denoiser, x_init, sigmas, gamma=0.5, backward="exp", space="vp", sigma_data=1.0, class_labels=None, cond=None,
    progress=False,
) -> StatePair:
    """BDIA over EDM's deterministic Heun sampler:

        x_{k+1} = gamma c_k (x_{k-1} - Phi_back(x_k; sigma_k -> sigma_{k-1})) + Heun(x_k; sigma_k -> sigma_{k+1})

    ``space="x"``: the combination in EDM's x-space, ``c_k = 1``. ``space="vp"``: in ``z = alpha x``,
    ``alpha = 1/sqrt(sigma_data^2 + sigma^2)``, i.e. ``c_k = alpha_{k-1} / alpha_{k+1}`` as in BDIA-DDIM.
    ``backward``: ``Phi_back`` (see :func:`_edm_backward`): ``euler`` (first order), ``taylor`` / ``exp``
    (second order), all reusing Heun's slopes at ``x_k`` (NFE = EDM's); ``heun`` costs one more NFE per step.
    Returns the pair ``(x_N, x_{N-1})``.
    """
    maps, scale_fn = _edm_options(backward, space, sigma_data)
    return _bdia_sample(maps, scale_fn, denoiser, x_init, sigmas, gamma, "bdia_edm", class_labels, cond, progress)


def invert_bdia_ddim(denoiser, x_last, sigmas, gamma=1.0, class_labels=None, cond=None, progress=False) -> StatePair:
    """Exact inverse of :func:`bdia_ddim`. ``x_last`` is the pair ``(x_N, x_{N-1})`` or a single clean state
    ``x_N`` (then ``x_{N-1}`` comes from one approximate DDIM-inversion step). Returns ``(x_0, x_1)``."""
    return _bdia_invert(_ddim_maps, _ddim_scale, denoiser, x_last, sigmas, gamma, "bdia_ddim", class_labels, cond, progress)


def invert_bdia_edm(
    denoiser, x_last, sigmas, gamma=0.5, backward="exp", space="vp", sigma_data=1.0, class_labels=None, cond=None,
    progress=False,
) -> StatePair:
    """Exact inverse of :func:`bdia_edm`; arguments as :func:`invert_bdia_ddim` and :func:`bdia_edm`."""
    maps, scale_fn = _edm_options(backward, space, sigma_data)
    return _bdia_invert(maps, scale_fn, denoiser, x_last, sigmas, gamma, "bdia_edm", class_labels, cond, progress)


#: bdia_edm's default formulation, chosen by measurement: ``make study`` (benchmarks/solver_study.py) compares every
#: combination of coordinates, backward map and gamma with EDM; results/solver_study.md has the numbers.
BDIA_EDM_DEFAULTS = {
    name: p.default for name, p in inspect.signature(bdia_edm).parameters.items()
    if name in ("gamma", "backward", "space", "sigma_data")
}
#: ``gamma`` when ``sample`` / ``invert`` get none.
DEFAULT_GAMMA = {"bdia_ddim": 1.0, "bdia_edm": BDIA_EDM_DEFAULTS["gamma"]}


# --------------------------------------------------------------------------------------------------
# Public entry points.


def _check_solver(solver, allowed):
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(allowed)}")


#: The solvers whose maps step a flow-matching model (coordinates "flow") in its own (x_t, t).
FLOW_SOLVERS = ("ddim", "bdia_ddim", "edm", "bdia_edm")


def _check_flow_solver(denoiser, solver):
    if solver not in FLOW_SOLVERS and coordinates_of(denoiser) == "flow":
        raise ValueError(f"{solver!r} does not take flow-matching models (coordinates 'flow': states x_t, velocity "
                         f"output); use one of {', '.join(FLOW_SOLVERS)}")


def _cast(x_init, dtype):
    if isinstance(x_init, (tuple, list)):
        if len(x_init) != 2:
            raise ValueError(f"a BDIA state pair has 2 tensors, got {len(x_init)}")
        pair = StatePair(*(_cast(x, dtype) for x in x_init))
        if pair[0].shape != pair[1].shape:  # never broadcast one half over the other (another batch size)
            raise ValueError(f"the two states of a BDIA pair must have one shape, got {list(pair[0].shape)} and "
                             f"{list(pair[1].shape)}")
        return pair
    if not isinstance(x_init, torch.Tensor):
        raise TypeError(f"expected a tensor or a StatePair, got {type(x_init).__name__}")
    return x_init if dtype is None else x_init.to(dtype)


@torch.no_grad()
def sample(
    denoiser,
    x_init,
    sigmas,
    solver: str = "bdia_edm",
    gamma=None,
    class_labels=None,
    return_pair: bool = False,
    cond: dict | None = None,
    dtype: torch.dtype | None = torch.float64,
    progress: bool = False,
    **solver_kwargs,
):
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]``.

    ``denoiser`` follows EDM's protocol ``D(x, sigma, class_labels, **cond)``; ``sigmas`` is an EDM-convention
    grid (:func:`bdia.karras_sigmas`, :func:`bdia.vp_sigmas`). ``x_init`` is the initial state
    (``latents * sigmas[0]``) or, for BDIA solvers, a :class:`StatePair` from :func:`invert`.
    ``gamma``: BDIA weight (scalar, per-step list, or a named schedule of :data:`GAMMA_SCHEDULES`); default :data:`DEFAULT_GAMMA` (bdia_ddim 1,
    bdia_edm its measured default, 0.5); must be left
    unset for the solvers without one (``ddim``, ``edm``, ``dpmpp_2m``, ``unipc``, ``ipndm``, ``rex``). ``dtype``: the
    solver state's dtype (float64 by default; ``None`` keeps the input's). Extra keywords go to the solver
    (``backward``, ``space``, ``sigma_data`` for ``bdia_edm``; ``s_churn`` ... for ``edm``; ``order``, ``variant`` for
    ``unipc``; ``max_order`` for ``ipndm``; ``tableau``, ``zeta`` for ``rex``, whose pair is ``(x_N, x_hat_{N-1})``).

    Returns the final state, or with ``return_pair=True`` the :class:`StatePair` ``(x_N, x_{N-1})``.
    Runs without autograd (the per-solver functions such as :func:`bdia_edm` do not disable it).
    """
    _check_solver(solver, SOLVERS)
    _check_flow_solver(denoiser, solver)
    _warn_noisy_end(sigmas)
    x_init = _cast(x_init, dtype)
    common = dict(class_labels=class_labels, cond=cond, progress=progress)
    if solver in GAMMA_SOLVERS:
        fn = bdia_ddim if solver == "bdia_ddim" else bdia_edm
        gamma = DEFAULT_GAMMA[solver] if gamma is None else gamma
        pair = fn(denoiser, x_init, sigmas, gamma=gamma, **common, **solver_kwargs)
        return pair if return_pair else pair.x_end
    _refuse_gamma(solver, gamma)
    if solver == "rex":
        pair = StatePair(*rex(denoiser, x_init, sigmas, **common, **solver_kwargs))
        return pair if return_pair else pair.x_end
    if return_pair:
        raise ValueError(f"return_pair needs a BDIA solver ({', '.join(INVERTIBLE_SOLVERS)}), not {solver!r}")
    if isinstance(x_init, tuple):
        raise TypeError(f"{solver!r} starts from a single tensor; a state pair is BDIA state (use its x_end)")
    fn = {"ddim": ddim, "edm": edm, "dpmpp_2m": dpmpp_2m, "unipc": unipc, "ipndm": ipndm}[solver]
    return fn(denoiser, x_init, sigmas, **common, **solver_kwargs)


#: A grid ending above this noise level leaves visible noise in the result (``x = x0 + sigma n``); EDM's grids end
#: at 0, Stable Diffusion's DDIM grid at ~0.029 (its smallest trained level), both below.
NOISY_END = 0.1


def _warn_noisy_end(sigmas) -> None:
    try:
        last = float(sigmas[-1])
    except (TypeError, ValueError, IndexError):
        return  # as_sigmas reports malformed grids
    if math.isfinite(last) and last > NOISY_END:
        import warnings

        warnings.warn(f"sigmas end at {last:.4g} (> {NOISY_END}): the result is the state at that noise level, still "
                      f"noisy (x = x0 + {last:.3g} n); end the grid at 0, as bdia.karras_sigmas does, to denoise fully",
                      UserWarning, stacklevel=4)  # the caller of bdia.sample (under torch.no_grad)


def _refuse_gamma(solver, gamma):
    if gamma is not None and not (isinstance(gamma, (int, float)) and gamma == 0):
        hint = f"is gamma = 0 (use bdia_{solver})" if f"bdia_{solver}" in GAMMA_SOLVERS else "has no gamma"
        raise ValueError(f"gamma applies to the BDIA solvers only; {solver!r} {hint}")


@torch.no_grad()
def invert(
    denoiser,
    x_last,
    sigmas,
    solver: str = "bdia_edm",
    gamma=None,
    class_labels=None,
    cond: dict | None = None,
    dtype: torch.dtype | None = torch.float64,
    progress: bool = False,
    **solver_kwargs,
) -> StatePair:
    """Run a BDIA solver backwards from ``sigmas[-1]`` to ``sigmas[0]``; exact up to round-off.

    ``x_last`` is the pair ``(x_N, x_{N-1})`` from ``sample(..., return_pair=True)`` or a single clean state
    (an encoded real image; ``x_{N-1}`` then comes from one approximate DDIM-inversion step). Returns the pair
    ``(x_0, x_1)``, which ``sample`` takes as ``x_init`` to regenerate ``(x_N, x_{N-1})`` exactly.
    ``gamma`` defaults as in :func:`sample` (pass the one you sampled with). Warns when (gamma, N, dtype) is predicted to amplify round-off beyond 1e-4 relative.
    """
    if solver in SOLVERS and solver not in INVERTIBLE_SOLVERS:
        raise ValueError(f"{solver!r} has no exact inverse; invertible solvers: {', '.join(INVERTIBLE_SOLVERS)}")
    _check_solver(solver, INVERTIBLE_SOLVERS)
    _check_flow_solver(denoiser, solver)
    x_last = _cast(x_last, dtype)
    if solver == "rex":
        _refuse_gamma(solver, gamma)
        return StatePair(*invert_rex(denoiser, x_last, sigmas, class_labels=class_labels, cond=cond, progress=progress,
                                     **solver_kwargs))
    gamma = DEFAULT_GAMMA[solver] if gamma is None else gamma
    fn = invert_bdia_ddim if solver == "bdia_ddim" else invert_bdia_edm
    return fn(denoiser, x_last, sigmas, gamma=gamma, class_labels=class_labels, cond=cond, progress=progress, **solver_kwargs)
