"""Gamma for the BDIA solvers: constant, per step, or a named schedule, and what it costs on inversion.

``gamma_schedule`` turns a user's gamma into the ``N`` per-step weights a solver uses (entry 0, the first plain
base step, is 0). The weight multiplies ``c_k (x_{k-1} - Phi(x_k; k -> k-1))``, where ``c_k`` is the coordinate
factor of the solver's space (:func:`ddim_scale` for BDIA-DDIM's VP latents, :func:`vp_scale` for BDIA-EDM's
``space="vp"``, 1 in EDM's x-space). Inversion divides by ``gamma_k c_k``, so round-off grows about
``prod_k 1 / gamma_k`` (:func:`predicted_roundtrip_error`).

A flow-matching model's states are its own latents ``x_t = s x`` (``s = 1 / (1 + sigma)``, coordinates
``"flow"``), so there a factor is the one of the same space written in ``x_t``: :func:`scale_in` maps each
x-space factor to it (BDIA-DDIM combines in the model's own latents, so 1 on a flow; ``space="vp"`` is
``(alpha/s)_{k-1} / (alpha/s)_{k+1}``, finite at ``sigma = inf``; EDM's x-space is ``s_{k+1} / s_{k-1}``, infinite
there).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from .schedules import as_sigmas, flow_time, vp_alpha

__all__ = ["GAMMA_SCHEDULES", "UNSTABLE_ROUNDTRIP_ERROR", "check_invertible", "gamma_schedule", "predicted_roundtrip_error",
           "ddim_scale", "vp_scale", "unit_scale", "scale_in", "ei_obelm_weight"]

GAMMA_SCHEDULES = ("obelm", "lte", "obelm_ei", "obelm_mix")

#: Inversion warns when the predicted relative round-trip error exceeds this.
UNSTABLE_ROUNDTRIP_ERROR = 1e-4


def vp_scale(sigma_data: float = 1.0):
    """``c_k = alpha_{k-1} / alpha_{k+1}`` with ``alpha = 1 / sqrt(sigma_data^2 + sigma^2)`` (up to a constant,
    which cancels): BDIA applied to ``z = alpha x`` and written in ``x``. ``sigma_data = 1``: the VP latents
    (``alpha = 1/sqrt(1 + sigma^2)``, BDIA-DDIM's); ``0.5``: EDM's network input scaling ``c_in``."""
    def scale(levels, k):
        return math.sqrt((sigma_data**2 + levels[k + 1] ** 2) / (sigma_data**2 + levels[k - 1] ** 2))

    def in_flow(levels, k):  # the same space written in x_t = x / (1 + sigma): (alpha / s)_{k-1} / (alpha / s)_{k+1}
        def alpha_over_s(sigma):  # (1 + sigma) / sqrt(sigma_data^2 + sigma^2), 1 at sigma = inf
            if math.isinf(sigma):
                return 1.0
            return (1.0 + sigma) / math.sqrt(sigma_data**2 + sigma**2)

        return alpha_over_s(levels[k - 1]) / alpha_over_s(levels[k + 1])

    scale.in_flow = in_flow
    return scale


def ddim_scale(levels, k):
    """``c_k = alpha_{k-1} / alpha_{k+1}``: the z-space BDIA-DDIM update written in x = z / alpha."""
    return vp_alpha(levels[k - 1]) / vp_alpha(levels[k + 1])


def unit_scale(levels, k):
    """``c_k = 1``: the combination in the solver state's own coordinates (EDM's ``x``; a flow's ``x_t``)."""
    return 1.0


def x_space_in_flow(levels, k):
    """EDM's x-space combination (``c_k = 1`` in ``x``) written in a flow's ``x_t = x / (1 + sigma)``:
    ``s_{k+1} / s_{k-1} = (1 + sigma_{k-1}) / (1 + sigma_{k+1})``; infinite where ``sigma_{k-1} = inf``."""
    if math.isinf(levels[k - 1]):
        raise ValueError("space='x' combines BDIA's gamma-term in EDM's x, which is infinite at sigma = inf (a flow "
                         "grid's t = 1); use space='vp' (the default) or a grid that starts below t = 1")
    return (1.0 + levels[k - 1]) / (1.0 + levels[k + 1])


#: BDIA-DDIM combines in the model's own latents: the VP latents for an x-state model, x_t itself for a flow.
ddim_scale.in_flow = unit_scale
unit_scale.in_flow = x_space_in_flow  # "1 in EDM's x" (bdia_edm's space="x")


def scale_in(scale_fn, coordinates: str):
    """The factor ``c_k`` of ``scale_fn`` (an x-space factor of this module) for states in ``coordinates``:
    ``"edm"`` (EDM's ``x``) returns it as it is, ``"flow"`` (a flow's ``x_t``) its ``in_flow`` form."""
    if coordinates == "edm" or scale_fn is None:
        return scale_fn
    in_flow = getattr(scale_fn, "in_flow", None)
    if in_flow is None:
        raise ValueError(f"no flow-coordinates form of the BDIA factor {getattr(scale_fn, '__name__', scale_fn)!r}")
    return in_flow


def ei_obelm_weight(levels, k) -> float:
    """The x-space BDIA weight ``gamma_k c_k`` that makes BDIA-DDIM exact for a denoiser output linear in
    ``lambda = -log sigma``: ``phi(h_f) / phi(-h_b) * sigma_{k+1} / sigma_{k-1}`` with ``h_f = lambda_{k+1} - lambda_k``,
    ``h_b = lambda_k - lambda_{k-1}`` and ``phi(h) = e^h (h - 1) + 1`` (the local errors of the exponential Euler
    step forward and back, ``sigma_t`` times ``e^lambda_k phi(h) dD/dlambda``). On a step onto sigma = 0 (``h_f``
    infinite) it returns O-BELM's ``r_k^2``."""
    h_b_sigma, h_f_sigma = levels[k - 1] - levels[k], levels[k] - levels[k + 1]
    if levels[k + 1] == 0:
        return (h_f_sigma / h_b_sigma) ** 2
    h_f, h_b = math.log(levels[k] / levels[k + 1]), math.log(levels[k - 1] / levels[k])
    phi_f = h_f * math.exp(h_f) - math.expm1(h_f)  # e^h (h - 1) + 1, ~h^2/2
    phi_b = -math.expm1(-h_b) - h_b * math.exp(-h_b)  # phi(-h_b) = 1 - e^-h (1 + h), ~h^2/2
    return phi_f / phi_b * levels[k + 1] / levels[k - 1]


def gamma_schedule(gamma, sigmas, solver: str = "bdia_edm", scale_fn=None, coordinates: str = "edm") -> list[float]:
    """The per-step gamma a BDIA solver uses, as a list of ``N`` floats (entry ``k`` for the step that makes
    ``x_{k+1}``; entry 0 belongs to the first, plain base step and is 0).

    ``gamma`` is a scalar in [0, 1], a sequence of ``N - 1`` values in [0, 1] (one per BDIA step, in sampling
    order), or a named schedule, with ``h_k = sigma_k - sigma_{k+1}`` and ``r_k = h_k / h_{k-1} (< 1 on a Karras grid)``:

    * ``"obelm"``: ``gamma_k = r_k**2``, which makes BDIA over Euler the O-BELM sampler (Wang et al.,
      NeurIPS 2024), second-order accurate: the forward and the backward Euler step's O(h^2) local errors have
      opposite signs and cancel. For ``bdia_ddim`` the value is divided by ``c_k = alpha_{k-1}/alpha_{k+1}`` so
      that the x-space recurrence is exactly O-BELM. For ``bdia_edm`` (Heun base) it is a heuristic.
    * ``"lte"`` (``bdia_edm`` only): ``gamma_k c_k = min(1, r_k**3)`` (and ``gamma_k <= 1``). Heun's local
      error is O(h^3) and odd in h, so a second-order backward step's error over ``h_{k-1}`` adds to (never
      cancels) the forward step's; this weight caps BDIA's share, ``gamma_k c_k h_{k-1}^3``, at Heun's own
      ``h_k^3``, tapering gamma where the steps shrink fast (few steps, and near the data). ``scale_fn`` gives
      ``c_k`` (the solver passes its own; default 1, x-space).

    * ``"obelm_ei"`` (``bdia_ddim`` on EDM's x only): O-BELM derived in DPM-Solver++'s variables instead of sigma.
      DDIM is the exponential Euler step in ``lambda = -log sigma`` (``x/sigma`` advances by the integral of
      ``e^lambda D``); the combination is exact whenever ``D`` is linear in ``lambda`` if its x-space weight is
      ``gamma_k c_k = phi(h_k) / phi(-h_{k-1}) * sigma_{k+1} / sigma_{k-1}``, ``phi(h) = e^h (h - 1) + 1``, with
      ``h`` the lambda-steps (:func:`ei_obelm_weight`). Also second order; a different third-order error.
    * ``"obelm_mix"`` (``bdia_ddim`` on EDM's x only): each expansion where it holds. Far above the data's scale
      ``D`` barely moves and the noise part of the state is linear in ``lambda``-time (the exponential integrator's
      case); far below it the state is smooth in sigma (``x - mu ~ sqrt(s^2 + sigma^2)``: O-BELM's case). The
      x-space weight is the weighted geometric mean ``(r_k^2)^(1 - w_k) * ei_k^w_k`` with ``w_k = sigma_k^2 / (1 +
      sigma_k^2)``, the noise share of the VP latent's variance (``1 - alpha-bar``; BDIA-DDIM's own coordinates).
      Chosen by measurement (``make samplers``, results/samplers.md).
      The step onto sigma = 0 (``lambda = inf``) takes ``"obelm"``'s weight in both.

    ``coordinates="flow"`` (a flow-matching model's states ``x_t``, :func:`bdia.schedules.flow_time`): the step
    ratios are those of the flow time ``t``, in which the solvers step there, and ``c_k`` the flow form of
    ``scale_fn`` (:func:`scale_in`; BDIA-DDIM's is 1): ``"obelm"`` is then O-BELM over flow Euler in ``(x_t, t)``.
    """
    sigmas = as_sigmas(sigmas)
    levels = sigmas.tolist()
    N = len(levels) - 1
    if isinstance(gamma, str):
        if gamma not in GAMMA_SCHEDULES:
            raise ValueError(f"unknown gamma schedule {gamma!r}; named schedules: {list(GAMMA_SCHEDULES)}")
        times = flow_time(sigmas).tolist() if coordinates == "flow" else levels  # the solver's time variable
        ratios = [0.0] + [(times[k] - times[k + 1]) / (times[k - 1] - times[k]) for k in range(1, N)]
        if gamma in ("obelm_ei", "obelm_mix"):
            if solver != "bdia_ddim" or coordinates != "edm":
                raise ValueError(f"gamma={gamma!r} is derived for BDIA-DDIM on EDM's x (bdia_ddim, not a flow model); "
                                 "use 'obelm' there")
            def weight(k):  # the share of the lambda-expansion
                return 1.0 if gamma == "obelm_ei" else levels[k] ** 2 / (1 + levels[k] ** 2)

            return [0.0] + [ratios[k] ** (2 * (1 - weight(k))) * ei_obelm_weight(levels, k) ** weight(k)
                            / ddim_scale(levels, k) for k in range(1, N)]
        if gamma == "lte":
            if solver != "bdia_edm":
                raise ValueError("gamma='lte' is derived from Heun's local error: bdia_edm only (bdia_ddim: 'obelm')")
            scale = scale_in(scale_fn or unit_scale, coordinates)
            return [0.0] + [min(1.0, ratios[k] ** 3 / scale(levels, k)) for k in range(1, N)]
        gammas = [r**2 for r in ratios]
        if solver == "bdia_ddim":
            scale = scale_in(ddim_scale, coordinates)
            gammas = [0.0] + [gammas[k] / scale(levels, k) for k in range(1, N)]
        return gammas
    if isinstance(gamma, torch.Tensor) and gamma.ndim == 0:
        gamma = gamma.item()
    if isinstance(gamma, (int, float)):
        values = [float(gamma)] * (N - 1)
    else:
        values = [float(g) for g in gamma]
        if len(values) != N - 1:
            raise ValueError(
                f"a per-step gamma needs one value per BDIA step: {N - 1} for {N} steps, got {len(values)}"
            )
    for g in values:
        if not (0.0 <= g <= 1.0):  # also rejects NaN
            raise ValueError(f"gamma must lie in [0, 1] (0 = base solver, 1 = full BDIA), got {g}")
    return [0.0] + values


def predicted_roundtrip_error(gammas: Sequence[float], dtype: torch.dtype) -> float:
    """Round-off amplification model for inversion: ``eps(dtype) * prod_k 1 / gamma_k``.

    Matches measurements in float64 over 20 steps: about 1e-10 at gamma 0.5 and 1e3 at gamma 0.1.
    """
    log_growth = sum(-math.log(g) for g in gammas[1:])
    return torch.finfo(dtype).eps * math.exp(min(log_growth, 700.0))


def check_invertible(gammas: Sequence[float], dtype: torch.dtype, what: str) -> None:
    """Inversion divides by every gamma: refuse a zero one, and warn (naming ``what``) when the predicted
    round-trip error of ``dtype`` exceeds :data:`UNSTABLE_ROUNDTRIP_ERROR`."""
    if min(gammas[1:]) <= 0:
        raise ValueError("gamma = 0 is the base solver, which is not invertible; use gamma in (0, 1] (0.92-1 for editing)")
    predicted = predicted_roundtrip_error(gammas, dtype)
    if predicted > UNSTABLE_ROUNDTRIP_ERROR:
        warnings.warn(
            f"{what}, dtype={dtype} amplifies round-off by about prod(1/gamma): expected relative round-trip error "
            f"~{predicted:.1e}. Use gamma closer to 1, fewer steps, or a wider dtype (float64).",
            RuntimeWarning,
            stacklevel=5,
        )
