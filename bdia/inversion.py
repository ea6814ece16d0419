"""Inversion methods for real images: BDIA-DDIM beside DDIM inversion, EDICT and null-text inversion, as a
registry of invert/regenerate pairs (:data:`METHOD_REGISTRY`; the edit app, :mod:`bdia.apps.edit`, is the harness).

Every method maps an encoded image to a representation in noise space under a *source* prompt, regenerates
the image from it (the reconstruction), and regenerates it under an *edit* prompt (the edit):

* ``"bdia"`` -- BDIA-DDIM (Zhang et al., arXiv 2307.10829): :func:`bdia.invert` to the noise-side pair,
  :func:`bdia.sample` from the pair. Exact up to round-off; NFE N (inversion) + N - 1 (regeneration).
* ``"ddim"`` -- the standard approximate DDIM inversion (:func:`ddim_invert`) and DDIM regeneration. Not exact.
* ``"edict"`` -- EDICT (Wallace et al., CVPR 2023): coupled chains with mixing weight ``p``
  (:func:`edict_invert`, :func:`edict_sample`). Exact; 2 network calls per step.
* ``"null_text"`` -- null-text inversion (Mokady et al., CVPR 2023): a DDIM-inversion pivot at guidance 1, then
  per-step Adam optimisation of the unconditional embedding so that guided DDIM lands on the pivot
  (:func:`null_text_invert`, :func:`null_text_sample`). Approximate; many calls plus backward passes.

Flow-matching models (SD3, FLUX; a denoiser with ``coordinates = "flow"``, :mod:`bdia.flow`) have their own
registry, :data:`FLOW_METHOD_REGISTRY` (EDICT and null-text are written for VP eps-models and are refused there):

* ``"bdia"`` -- BDIA over flow Euler (:func:`bdia.invert` / :func:`bdia.sample` with ``solver="bdia_ddim"``, which
  step a flow model in its own latents). Exact up to round-off; NFE N + N - 1.
* ``"ddim"`` -- plain flow-Euler inversion (:func:`flow_euler` backwards), flow Euler (``solver="ddim"``) to
  regenerate: what the flow editors start from. Not exact; NFE N + N.
* ``"rf_inversion"`` -- RF-Inversion (Rout et al., ICLR 2025): the controlled forward ODE towards a fixed noise
  sample (strength ``controller_gamma``), the controlled reverse ODE towards the image (``controller_eta`` on a
  window of steps) (:func:`rf_inversion_invert`, :func:`rf_inversion_sample`). Not exact; NFE N + N.
* ``"rf_solver"`` -- RF-Solver (Wang et al., 2024): second-order Taylor steps whose time derivative comes from an
  extra half-step evaluation (:func:`rf_solver`), both ways. Not exact; NFE 2N + 2N.
* ``"fireflow"`` -- FireFlow (Deng et al., 2024): the midpoint rule reusing the previous step's midpoint velocity
  (:func:`fireflow`), both ways. Not exact; NFE (N + 1) + (N + 1).

Conventions (they bite here)
----------------------------
* ``sigmas`` is a descending EDM-convention grid (``bdia.vp_sigmas`` with the model's settings, e.g.
  ``StableDiffusion.sigmas(N)``); for SD it ends at ``sigma_N ~ 0.0292``, not 0. The state ``x`` is EDM's,
  ``x = z / alpha`` with ``alpha = 1 / sqrt(1 + sigma**2)``; ``z`` is the VP latent the network sees.
* **The encoded image is the VP latent z at the last level** (diffusers' convention: DDIM with
  ``set_alpha_to_one=False`` ends on ``alpha-bar_0`` and the pipeline decodes that ``z`` as it is; null-text's and
  EDICT's code start their inversions from the encoded latent at ``alpha-bar_0`` too). So the clean state is
  ``x_clean = z0 / alpha_N`` (:func:`latent_to_state`) and a result is decoded from ``z = alpha_N x``
  (:func:`state_to_latent`); ``alpha_N = 0.99957`` for SD. All four methods use this one mapping.
* ``base`` is the *unguided* conditional denoiser ``D(x, sigma, encoder_hidden_states=e)`` (EDM protocol, e.g.
  ``VPEpsDenoiser(unet, alphas_cumprod)``). Classifier-free guidance is built on it here
  (:class:`bdia.ClassifierFreeGuidance`: one batched call on the unconditional and conditional rows).
* DDIM inversion, EDICT and null-text are written in the papers' VP coordinates ``z`` with the noise estimate
  :func:`vp_eps` ``eps(z, sigma) = (x - D(x, sigma)) / sigma`` at ``x = z / alpha(sigma)``, i.e. the network sees
  exactly the latent ``z`` with the label of ``sigma``, as in the papers' code. The DDIM step from level
  ``sigma_from`` to ``sigma_to`` is ``z_to = a z_from + b eps`` with EDICT's coefficients

      a = sqrt(abar_to / abar_from) = alpha_to / alpha_from,
      b = sqrt(1 - abar_to) - a sqrt(1 - abar_from) = alpha_to (sigma_to - sigma_from),

  which in ``x = z / alpha`` is the Euler step ``x_to = x_from + (sigma_to - sigma_from) eps`` (:func:`ddim_z`).

* BDIA's inversion from a single clean state starts with :func:`bdia.invert`'s approximate DDIM step, which
  evaluates the slope at ``x_N`` with the label of ``sigma_{N-1}`` (the network sees ``alpha_{N-1} x_N``, not
  ``z_N`` as in :func:`ddim_invert`); it hardly matters: regeneration from the pair reproduces ``x_N`` exactly
  whatever that step was.
* Edits regenerate each method's representation under the edit prompt (same grid, same guidance). Not
  included: prompt-to-prompt attention control (the null-text paper edits with it), EDICT's own add-ons, RF-Solver's
  and FireFlow's attention-feature sharing (their "RF-Edit" editing add-on).
* **Flows.** A flow model's state is its own latent ``x_t = (1 - t) x0 + t eps`` (``t = sigma / (1 + sigma)``,
  :func:`bdia.schedules.flow_time`; the grid starts at ``t = 1``, ``sigma = inf``, and ends at ``t = 0``), so the
  encoded image *is* the clean state and the result is decoded as it is. The model is called with EDM's ``sigma``
  and returns the velocity ``v = dx_t/dt`` (``eps - x0``); the flow methods are written in ``(x_t, t)``, as the
  papers' code steps FLUX, with the velocity taken at the start of each step (:func:`flow_velocity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .denoisers import ClassifierFreeGuidance, RowCountingDenoiser
from .schedules import as_sigmas, flow_sigma, flow_time, vp_alpha, x_to_z, z_to_x
from .solvers import coordinates_of, invert, sample

__all__ = [
    "METHODS",
    "METHOD_REGISTRY",
    "InversionMethod",
    "Inverted",
    "EditSetup",
    "BDIAOptions",
    "DDIMInversionOptions",
    "EDICTOptions",
    "NullTextOptions",
    "method_options",
    "EDICTPair",
    "NullTextInversion",
    "latent_to_state",
    "state_to_latent",
    "tail_sigmas",
    "vp_eps",
    "ddim_z",
    "ddim_invert",
    "edict_sample",
    "edict_invert",
    "null_text_invert",
    "null_text_sample",
    "guided",
    "FLOW_METHODS",
    "FLOW_METHOD_REGISTRY",
    "VP_ONLY_METHODS",
    "method_registry",
    "check_method",
    "METHOD_OPTION_NAMES",
    "FlowEulerOptions",
    "RFInversionOptions",
    "RFSolverOptions",
    "FireFlowOptions",
    "flow_velocity",
    "flow_steps",
    "flow_euler",
    "rf_inversion_invert",
    "rf_inversion_sample",
    "rf_inversion_strengths",
    "rf_solver",
    "fireflow",
]


# --------------------------------------------------------------------------------------------------
# Coordinates and the DDIM step in z.


def latent_to_state(z0: torch.Tensor, sigmas) -> torch.Tensor:
    """The encoded latent ``z0`` taken as the VP latent at the last level: ``x = z0 / alpha(sigmas[-1])``
    (:func:`bdia.schedules.z_to_x`, in ``z0``'s dtype)."""
    return z_to_x(z0, as_sigmas(sigmas)[-1]).to(z0.dtype)


def state_to_latent(x: torch.Tensor, sigmas) -> torch.Tensor:
    """The VP latent to decode from a clean state: ``z = alpha(sigmas[-1]) x`` (inverse of :func:`latent_to_state`)."""
    return x_to_z(x, as_sigmas(sigmas)[-1]).to(x.dtype)


def tail_sigmas(sigmas, strength: float) -> torch.Tensor:
    """The last ``ceil(strength * N)`` steps of the grid (the clean end): what an edit of that strength inverts
    and regenerates. At least 2 steps (BDIA needs a pair); ``strength = 1`` is the whole grid."""
    sigmas = as_sigmas(sigmas)
    N = len(sigmas) - 1
    if not 0 < strength <= 1:
        raise ValueError(f"strength is the fraction of steps to invert, in (0, 1]; got {strength}")
    steps = max(2, math.ceil(strength * N - 1e-9))
    if steps > N:
        raise ValueError(f"strength {strength} of {N} steps leaves fewer than 2 steps; use more steps")
    return sigmas[N - steps :]


def vp_eps(denoiser, z: torch.Tensor, sigma: float, cond: dict | None = None) -> torch.Tensor:
    """The noise estimate for the VP latent ``z`` with the label of level ``sigma``: the network sees ``z`` itself
    (``x = z / alpha(sigma)``, ``eps = (x - D(x, sigma)) / sigma``). Differentiable (no ``no_grad`` here)."""
    sigma_t = torch.tensor(float(sigma), dtype=torch.float64, device=z.device)
    x = z / vp_alpha(float(sigma))
    denoised = denoiser(x, sigma_t, None, **(cond or {})).to(z.dtype)
    return (x - denoised) / float(sigma)


def ddim_z(z: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """DDIM (eta = 0) on VP latents: ``z_to = a z + b eps``, ``a = alpha_to / alpha_from``,
    ``b = alpha_to (sigma_to - sigma_from)`` (EDICT's ``a_t``, ``b_t``; the Euler step in ``x = z / alpha``)."""
    alpha_from, alpha_to = vp_alpha(float(sigma_from)), vp_alpha(float(sigma_to))
    return (alpha_to / alpha_from) * z + alpha_to * (float(sigma_to) - float(sigma_from)) * eps


def _inverse_ddim_z(z_to: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Solve ``z_to = a z + b eps`` for ``z`` (EDICT's noising step)."""
    alpha_from, alpha_to = vp_alpha(float(sigma_from)), vp_alpha(float(sigma_to))
    return (z_to - alpha_to * (float(sigma_to) - float(sigma_from)) * eps) / (alpha_to / alpha_from)


# --------------------------------------------------------------------------------------------------
# DDIM inversion (approximate).


@torch.no_grad()
def ddim_invert(denoiser, x_clean: torch.Tensor, sigmas, cond: dict | None = None, return_trajectory: bool = False):
    """The standard approximate DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021; as in null-text's
    ``ddim_loop`` and diffusers' ``DDIMInverseScheduler``): step up in noise from ``sigmas[-1]`` to ``sigmas[0]``
    with the DDIM map, using the noise estimated at the *current* latent with the label of the *target* level,

        z_{k-1} = DDIM_{k -> k-1}(z_k; eps(z_k, sigma_{k-1})),

    the approximation ``eps(z_{k-1}) ~ eps(z_k)`` that makes it inexact. One call per step (N in all).

    Returns ``x`` at ``sigmas[0]`` (regenerate with ``bdia.sample(..., solver="ddim")``), or with
    ``return_trajectory=True`` the list ``[x at sigmas[0], ..., x at sigmas[-1]]`` (indexed like the grid).
    """
    levels = as_sigmas(sigmas).tolist()
    N = len(levels) - 1
    z = x_clean * vp_alpha(levels[N])
    trajectory = [z]
    for k in range(N, 0, -1):
        eps = vp_eps(denoiser, z, levels[k - 1], cond)
        z = ddim_z(z, eps, levels[k], levels[k - 1])
        trajectory.append(z)
    xs = [zk / vp_alpha(levels[N - i]) for i, zk in enumerate(trajectory)][::-1]
    return xs if return_trajectory else xs[0]


# --------------------------------------------------------------------------------------------------
# Option checks (one line naming the option; every entry point: the functions and the registry's options).

#: Bound on null-text's Adam iterations per step (the authors use 10).
MAX_INNER_STEPS = 1000


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_edict_p(p) -> None:
    """EDICT's mixing weight: its inverse divides by ``p``, so ``p`` must be in (0, 1]."""
    if not _finite(p) or not 0 < p <= 1:
        raise ValueError(f"p (EDICT's mixing weight) must be a number in (0, 1], got {p!r}")


def check_null_text(num_inner_steps, lr, early_stop) -> None:
    if isinstance(num_inner_steps, bool) or not isinstance(num_inner_steps, int) or \
            not 0 <= num_inner_steps <= MAX_INNER_STEPS:
        raise ValueError(f"num_inner_steps (null-text's Adam iterations per step) must be an integer in "
                         f"0..{MAX_INNER_STEPS}, got {num_inner_steps!r}")
    if not _finite(lr) or lr <= 0:
        raise ValueError(f"lr (null-text's learning rate) must be a positive number, got {lr!r}")
    if not _finite(early_stop) or early_stop < 0:
        raise ValueError(f"early_stop (null-text's loss threshold) must be a number >= 0, got {early_stop!r}")


# --------------------------------------------------------------------------------------------------
# EDICT (exact, two coupled chains).


class EDICTPair(NamedTuple):
    """EDICT's two coupled states ``(x, y)`` at one level (EDM-convention ``x = z / alpha``)."""

    x: torch.Tensor
    y: torch.Tensor


def _edict_order(k: int, leapfrog: bool) -> bool:
    """Whether step ``k`` (sampling order on the given grid) updates ``y`` first: EDICT's code alternates the
    order of the two chains every step ("leapfrog") by default."""
    return leapfrog and k % 2 == 1


@torch.no_grad()
def edict_sample(denoiser, pair, sigmas, cond: dict | None = None, p: float = 0.93, leapfrog: bool = True) -> EDICTPair:
    """EDICT's denoising process (Wallace et al. 2023, eqs. 12-15), in VP latents with ``a``, ``b`` of
    :func:`ddim_z` for the step from ``sigma_k`` to ``sigma_{k+1}``:

        x_inter = a x_k + b eps(y_k, sigma_k)
        y_inter = a y_k + b eps(x_inter, sigma_k)
        x_{k+1} = p x_inter + (1 - p) y_inter
        y_{k+1} = p y_inter + (1 - p) x_{k+1}

    (with ``leapfrog`` the roles of x and y swap on odd steps). Note ``x_inter`` already lives at
    ``sigma_{k+1}`` but is given to the network with the label of ``sigma_k``, as in the paper. Two calls per step.
    ``pair``: :class:`EDICTPair` at ``sigmas[0]`` (e.g. from :func:`edict_invert`) or one tensor for ``x = y``.
    Returns the pair at ``sigmas[-1]``; the paper decodes ``x``.
    """
    check_edict_p(p)
    levels = as_sigmas(sigmas).tolist()
    x, y = (pair, pair) if isinstance(pair, torch.Tensor) else pair
    x, y = x * vp_alpha(levels[0]), y * vp_alpha(levels[0])
    for k in range(len(levels) - 1):
        s_from, s_to = levels[k], levels[k + 1]
        first, second = (y, x) if _edict_order(k, leapfrog) else (x, y)
        first = ddim_z(first, vp_eps(denoiser, second, s_from, cond), s_from, s_to)
        second = ddim_z(second, vp_eps(denoiser, first, s_from, cond), s_from, s_to)
        x, y = (second, first) if _edict_order(k, leapfrog) else (first, second)
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    alpha = vp_alpha(levels[-1])
    return EDICTPair(x / alpha, y / alpha)


@torch.no_grad()
def edict_invert(denoiser, x_clean, sigmas, cond: dict | None = None, p: float = 0.93, leapfrog: bool = True) -> EDICTPair:
    """Exact inverse of :func:`edict_sample` (EDICT's noising process), each line undone in reverse order:

        y_inter = (y_{k+1} - (1 - p) x_{k+1}) / p
        x_inter = (x_{k+1} - (1 - p) y_inter) / p
        y_k = (y_inter - b eps(x_inter, sigma_k)) / a
        x_k = (x_inter - b eps(y_k, sigma_k)) / a

    ``x_clean``: one clean state (both chains start at the encoded image, as in the paper) or an
    :class:`EDICTPair`. Returns the pair at ``sigmas[0]``. Two calls per step.
    """
    check_edict_p(p)
    levels = as_sigmas(sigmas).tolist()
    x, y = (x_clean, x_clean) if isinstance(x_clean, torch.Tensor) else x_clean
    x, y = x * vp_alpha(levels[-1]), y * vp_alpha(levels[-1])
    for k in range(len(levels) - 2, -1, -1):
        s_from, s_to = levels[k], levels[k + 1]
        y = (y - (1 - p) * x) / p
        x = (x - (1 - p) * y) / p
        first, second = (y, x) if _edict_order(k, leapfrog) else (x, y)
        second = _inverse_ddim_z(second, vp_eps(denoiser, first, s_from, cond), s_from, s_to)
        first = _inverse_ddim_z(first, vp_eps(denoiser, second, s_from, cond), s_from, s_to)
        x, y = (second, first) if _edict_order(k, leapfrog) else (first, second)
    alpha = vp_alpha(levels[0])
    return EDICTPair(x / alpha, y / alpha)


# --------------------------------------------------------------------------------------------------
# Null-text inversion (approximate, optimised).


def guided(base, guidance_scale: float, uncond_embeds):
    """Classifier-free guidance on the unguided denoiser ``base`` with unconditional text embedding
    ``uncond_embeds`` (one batched call on both halves); ``guidance_scale = 1`` is ``base`` itself (the
    conditional denoiser, one half-size call), as :meth:`bdia.networks.sd.StableDiffusion.denoiser` does.
    ``uncond_embeds`` may be a whole conditioning dict (an SD3 model's ``encode_prompts([""])``), or ``None``: no
    classifier-free guidance (FLUX.1, whose guidance is an input of ``base`` itself)."""
    if float(guidance_scale) == 1.0 or uncond_embeds is None:
        return base
    uncond = dict(uncond_embeds) if isinstance(uncond_embeds, Mapping) else {"encoder_hidden_states": uncond_embeds}
    return ClassifierFreeGuidance(base, guidance_scale, uncond)


@dataclass
class NullTextInversion:
    """What null-text inversion represents an image by: the pivot's noise state ``x_noise`` at ``sigmas[0]`` and
    one optimised unconditional embedding per step (``uncond_embeds[k]`` for the step ``sigma_k -> sigma_{k+1}``).
    ``inner_steps[k]``: Adam iterations used at step k (early stopping); ``final_losses[k]``: the last loss."""

    x_noise: torch.Tensor
    uncond_embeds: list
    inner_steps: list = field(default_factory=list)
    final_losses: list = field(default_factory=list)

    @property
    def backward_passes(self) -> int:
        return int(sum(self.inner_steps))


def null_text_invert(
    base,
    x_clean: torch.Tensor,
    sigmas,
    cond_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    early_stop_growth: float = 2e-5,
    lr_decay: float = 0.01,
) -> NullTextInversion:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1, with the settings of the authors' code).

    1. Pivot: DDIM inversion at guidance 1 (the plain conditional denoiser), ``z*_0 ... z*_N`` (N calls).
    2. From ``zbar = z*_0`` and ``e = uncond_embeds``, for each step ``k`` (sigma_k -> sigma_{k+1}): optimise ``e``
       with Adam (learning rate ``lr * max(1 - lr_decay * k, lr_decay)``: the authors' decay, floored so that grids of
       more than ``1 / lr_decay`` steps keep a positive rate) to minimise ``mse(DDIM_z(zbar, eps_w(zbar; e)), z*_{k+1})``
       with ``eps_w = eps_u(e) + w (eps_c - eps_u(e))``, at most ``num_inner_steps`` iterations, stopping once the
       loss (in VP latents) falls below ``early_stop + early_stop_growth * k``; keep ``e_k``; advance ``zbar`` with
       the guided step using ``e_k``; start step k+1 from ``e_k``.

    Calls per step: 1 conditional (no grad) + one unconditional forward per Adam iteration (each followed by a
    backward pass) + 1 guided call to advance ``zbar``. Returns :class:`NullTextInversion`;
    regenerate with :func:`null_text_sample`.
    """
    check_null_text(num_inner_steps, lr, early_stop)
    levels = as_sigmas(sigmas).tolist()
    N = len(levels) - 1
    cond = {"encoder_hidden_states": cond_embeds}
    pivot = ddim_invert(base, x_clean, levels, cond, return_trajectory=True)
    pivot_z = [x * vp_alpha(levels[k]) for k, x in enumerate(pivot)]
    z = pivot_z[0]
    e = uncond_embeds.detach().clone()
    embeds, inner_steps, losses = [], [], []
    for k in range(N):
        s_from, s_to = levels[k], levels[k + 1]
        e = e.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([e], lr=lr * max(1.0 - lr_decay * k, lr_decay))
        with torch.no_grad():
            eps_c = vp_eps(base, z, s_from, cond)
        used, loss_value = 0, float("nan")
        for _ in range(num_inner_steps):
            eps_u = vp_eps(base, z, s_from, {"encoder_hidden_states": e})
            z_next = ddim_z(z, eps_u + guidance_scale * (eps_c - eps_u), s_from, s_to)
            loss = torch.nn.functional.mse_loss(z_next, pivot_z[k + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            used, loss_value = used + 1, loss.item()
            if loss_value < early_stop + early_stop_growth * k:
                break
        e = e.detach()
        embeds.append(e)
        inner_steps.append(used)
        losses.append(loss_value)
        with torch.no_grad():
            z = ddim_z(z, vp_eps(guided(base, guidance_scale, e), z, s_from, cond), s_from, s_to)
    return NullTextInversion(pivot[0], embeds, inner_steps, losses)


@torch.no_grad()
def null_text_sample(base, x_noise, sigmas, cond_embeds, uncond_embeds: Sequence[torch.Tensor], guidance_scale: float = 7.5):
    """Guided DDIM from ``sigmas[0]`` with a per-step unconditional embedding ``uncond_embeds[k]`` (one guided
    call per step). With the source prompt's ``cond_embeds`` this is null-text's reconstruction; with an edit
    prompt's, a plain (no prompt-to-prompt) edit. Returns ``x`` at ``sigmas[-1]``."""
    levels = as_sigmas(sigmas).tolist()
    if len(uncond_embeds) != len(levels) - 1:
        raise ValueError(f"need one unconditional embedding per step: {len(levels) - 1}, got {len(uncond_embeds)}")
    cond = {"encoder_hidden_states": cond_embeds}
    z = x_noise * vp_alpha(levels[0])
    for k, e in enumerate(uncond_embeds):
        z = ddim_z(z, vp_eps(guided(base, guidance_scale, e), z, levels[k], cond), levels[k], levels[k + 1])
    return z / vp_alpha(levels[-1])


# --------------------------------------------------------------------------------------------------
# Flow-matching models (SD3, FLUX): the inversion methods published for them, in the model's own (x_t, t).


def flow_velocity(denoiser, x: torch.Tensor, sigma: float, cond: dict | None = None) -> torch.Tensor:
    """A flow model's velocity ``v = dx_t/dt`` at latent ``x`` and EDM-convention level ``sigma`` (``inf``: ``t = 1``),
    in ``x``'s dtype: the model is called as the solvers call it, ``denoiser(x, sigma, None, **cond)``."""
    sigma_t = torch.tensor(float(sigma), dtype=torch.float64, device=x.device)
    return denoiser(x, sigma_t, None, **(cond or {})).to(x.dtype)


def flow_steps(sigmas, inverse: bool = False) -> list[tuple[float, float]]:
    """The steps ``(sigma_from, sigma_to)`` of a grid: in sampling order (noise to data), or with ``inverse`` from
    ``sigmas[-1]`` up to ``sigmas[0]`` (data to noise), the same steps taken backwards."""
    levels = as_sigmas(sigmas).tolist()
    steps = list(zip(levels[:-1], levels[1:]))
    return [(to, start) for start, to in reversed(steps)] if inverse else steps


def _require_flow(denoiser, what: str) -> None:
    if coordinates_of(denoiser) != "flow":
        raise ValueError(f"{what} steps a flow-matching model (coordinates 'flow': states x_t, velocity out); this "
                         "denoiser is an EDM-protocol one")


@torch.no_grad()
def flow_euler(denoiser, x: torch.Tensor, steps, cond: dict | None = None) -> torch.Tensor:
    """Flow Euler over ``steps`` (:func:`flow_steps`), the velocity taken at each step's start (one call per step):

        x_t' = x_t + (t' - t) v(x_t, t).

    In sampling order this is ``bdia.sample(..., solver="ddim")`` on a flow (diffusers' ``FlowMatchEulerDiscreteScheduler``);
    backwards it is the plain inversion the flow editors start from (RF-Inversion at ``gamma = 0``; the inversion
    loops of RF-Solver's and FireFlow's code with a first-order step)."""
    _require_flow(denoiser, "flow Euler")
    for sigma_from, sigma_to in steps:
        x = x + (flow_time(sigma_to) - flow_time(sigma_from)) * flow_velocity(denoiser, x, sigma_from, cond)
    return x


@torch.no_grad()
def rf_inversion_invert(denoiser, x_clean: torch.Tensor, sigmas, target_noise: torch.Tensor, cond: dict | None = None,
                        gamma: float = 0.5) -> torch.Tensor:
    """RF-Inversion's controlled forward ODE (Rout et al., ICLR 2025, eq. 8 and Algorithm 1): from the image
    ``Y_0 = y_0`` at ``t = 0`` up to the noise end of the grid,

        dY_t = [v(Y_t, t) + gamma ((y_1 - Y_t) / (1 - t) - v(Y_t, t))] dt,

    one Euler step per grid step with the velocity at its start (N calls). In the paper's notation the unconditional
    field is ``u_t(Y_t) = -u(Y_t, 1 - t)``, the model's field in its generation time, which is the velocity ``v`` of
    diffusers' time ``t`` used here; ``(y_1 - Y_t) / (1 - t)`` is the velocity of the straight path from ``Y_t`` to
    the noise sample ``y_1 = target_noise`` (drawn once, ``N(0, I)``) at ``t = 1``. ``gamma = 0`` is plain flow-Euler
    inversion; ``gamma = 1`` lands on ``y_1`` whatever the model (Euler follows a straight line exactly). Returns the
    latent at ``sigmas[0]``."""
    _require_flow(denoiser, "RF-Inversion")
    y1 = target_noise.to(x_clean)
    y = x_clean
    for sigma_from, sigma_to in flow_steps(sigmas, inverse=True):
        t, t_to = flow_time(sigma_from), flow_time(sigma_to)
        v = flow_velocity(denoiser, y, sigma_from, cond)
        y = y + (t_to - t) * (v + gamma * ((y1 - y) / (1 - t) - v))
    return y


def rf_inversion_strengths(num_steps: int, eta: float = 1.0, eta_start: float = 0.0, eta_stop: float = 0.25) -> list:
    """RF-Inversion's controller strength per sampling step ``k`` (``k = 0`` at the noise end): ``eta`` for
    ``int(eta_start N) <= k < min(int(eta_stop N), N)``, 0 elsewhere (the paper's starting and stopping times as
    fractions of the steps, the rule of diffusers' community ``RFInversionFluxPipeline``)."""
    start, stop = int(eta_start * num_steps), min(int(eta_stop * num_steps), num_steps)
    return [float(eta) if start <= k < stop else 0.0 for k in range(num_steps)]


@torch.no_grad()
def rf_inversion_sample(denoiser, x_noise: torch.Tensor, sigmas, reference: torch.Tensor, cond: dict | None = None,
                        eta: float = 1.0, eta_start: float = 0.0, eta_stop: float = 0.25) -> torch.Tensor:
    """RF-Inversion's controlled reverse ODE (Rout et al., ICLR 2025, Algorithm 2) from ``x_noise`` at ``sigmas[0]``
    down to ``sigmas[-1]``, towards the reference image ``y_0 = reference``:

        dX_t = [v(X_t, t) + eta_k ((X_t - y_0) / t - v(X_t, t))] dt,      t from 1 down to 0,

    one Euler step per grid step, the velocity at its start (N calls); ``eta_k`` from :func:`rf_inversion_strengths`.
    The paper writes it in generation time ``s = 1 - t`` with the field ``v_s(X) = -v(X, 1 - s)`` and the conditional
    field ``(y_0 - X) / (1 - s)``; here ``(X_t - y_0) / t`` is the velocity of the straight path from ``X_t`` to ``y_0``
    at ``t = 0``. ``eta = 0`` is flow Euler; ``eta = 1`` on every step lands on ``y_0`` whatever the model."""
    _require_flow(denoiser, "RF-Inversion")
    y0 = reference.to(x_noise)
    steps = flow_steps(sigmas)
    x = x_noise
    for (sigma_from, sigma_to), eta_k in zip(steps, rf_inversion_strengths(len(steps), eta, eta_start, eta_stop)):
        t, t_to = flow_time(sigma_from), flow_time(sigma_to)
        v = flow_velocity(denoiser, x, sigma_from, cond)
        x = x + (t_to - t) * (v + eta_k * ((x - y0) / t - v))
    return x


@torch.no_grad()
def rf_solver(denoiser, x: torch.Tensor, steps, cond: dict | None = None) -> torch.Tensor:
    """RF-Solver (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing"): the second-order Taylor
    expansion of the flow ODE over each step ``t -> t'`` of ``steps`` (:func:`flow_steps`; backwards for inversion),

        x_t' = x_t + h v(x_t, t) + (h^2 / 2) v',      h = t' - t,
        v' = (v(x_t + (h / 2) v(x_t, t), t + h / 2) - v(x_t, t)) / (h / 2),

    the time derivative ``v'`` from an extra evaluation half a step ahead: two calls per step, as the authors' code
    (algebraically the explicit midpoint rule; written as the paper does)."""
    _require_flow(denoiser, "RF-Solver")
    for sigma_from, sigma_to in steps:
        t, t_to = flow_time(sigma_from), flow_time(sigma_to)
        h = t_to - t
        v = flow_velocity(denoiser, x, sigma_from, cond)
        v_mid = flow_velocity(denoiser, x + (h / 2) * v, flow_sigma(t + h / 2), cond)
        x = x + h * v + (h**2 / 2) * ((v_mid - v) / (h / 2))
    return x


@torch.no_grad()
def fireflow(denoiser, x: torch.Tensor, steps, cond: dict | None = None) -> torch.Tensor:
    """FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing"): the
    midpoint rule whose starting velocity is the previous step's midpoint velocity, so each step costs one call
    (the first step computes its own starting velocity: N + 1 calls in all):

        x_mid = x_t + (h / 2) v_hat,    v_mid = v(x_mid, t + h / 2),    x_t' = x_t + h v_mid,    v_hat <- v_mid,

    over ``steps`` (:func:`flow_steps`; backwards for inversion), as the authors' code."""
    _require_flow(denoiser, "FireFlow")
    v_hat = None
    for sigma_from, sigma_to in steps:
        t, t_to = flow_time(sigma_from), flow_time(sigma_to)
        h = t_to - t
        if v_hat is None:
            v_hat = flow_velocity(denoiser, x, sigma_from, cond)
        v_hat = flow_velocity(denoiser, x + (h / 2) * v_hat, flow_sigma(t + h / 2), cond)
        x = x + h * v_hat
    return x


# --------------------------------------------------------------------------------------------------
# The registry: each method's options and its invert function; regeneration comes back with the inversion.


@dataclass(frozen=True)
class BDIAOptions:
    """BDIA-DDIM. ``gamma``: the BDIA weight; inversion amplifies round-off like ``gamma**-N``, so editing uses
    [0.92, 1]."""

    gamma: float = 0.96

    def __post_init__(self):
        if not _finite(self.gamma) or not 0 < self.gamma <= 1:  # gamma = 0 (DDIM) cannot be inverted exactly
            raise ValueError(f"gamma (BDIA's weight) must be a number in (0, 1] for inversion, got {self.gamma!r}")


@dataclass(frozen=True)
class DDIMInversionOptions:
    """DDIM inversion. ``ddim_inversion_guidance``: the inversion's guidance (default the run's guidance scale;
    1 gives null-text's pivot); regeneration uses the run's guidance scale."""

    ddim_inversion_guidance: float | None = None

    def __post_init__(self):
        if self.ddim_inversion_guidance is not None and not _finite(self.ddim_inversion_guidance):
            raise ValueError(f"ddim_inversion_guidance must be a number or null, got {self.ddim_inversion_guidance!r}")


@dataclass(frozen=True)
class EDICTOptions:
    """EDICT. ``p``: the mixing weight of the coupled chains; ``leapfrog``: alternate which chain goes first."""

    p: float = 0.93
    leapfrog: bool = True

    def __post_init__(self):
        check_edict_p(self.p)
        if not isinstance(self.leapfrog, bool):
            raise ValueError(f"leapfrog must be true or false, got {self.leapfrog!r}")


@dataclass(frozen=True)
class NullTextOptions:
    """Null-text inversion. Adam on the unconditional embedding: at most ``num_inner_steps`` iterations per step,
    learning rate ``lr``, stopping once the loss is below ``early_stop`` (+ a per-step growth)."""

    num_inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5

    def __post_init__(self):
        check_null_text(self.num_inner_steps, self.lr, self.early_stop)


@dataclass(frozen=True)
class FlowEulerOptions:
    """Plain flow-Euler inversion (flow models' ``ddim``): no options; inversion and regeneration use the run's
    guidance."""


@dataclass(frozen=True)
class RFInversionOptions:
    """RF-Inversion. ``controller_gamma``: the pull of the forward ODE towards a fixed noise sample (the paper's
    gamma; 0 = plain flow-Euler inversion); ``controller_eta``: the pull of the reverse ODE towards the image (the
    paper's eta), applied on the sampling steps ``[eta_start N, eta_stop N)`` (fractions of the steps, from the noise
    end); ``target_noise_seed``: the seed of that noise sample ``y_1``. Defaults: gamma 0.5, eta 1.0, steps [0, 0.25)
    (diffusers' community ``RFInversionFluxPipeline``)."""

    controller_gamma: float = 0.5
    controller_eta: float = 1.0
    eta_start: float = 0.0
    eta_stop: float = 0.25
    target_noise_seed: int = 0

    def __post_init__(self):
        for key in ("controller_gamma", "controller_eta"):
            value = getattr(self, key)
            if not _finite(value) or not 0 <= value <= 1:
                raise ValueError(f"{key} (RF-Inversion's controller strength) must be a number in [0, 1], got {value!r}")
        if not (_finite(self.eta_start) and _finite(self.eta_stop) and 0 <= self.eta_start <= self.eta_stop <= 1):
            raise ValueError(f"eta_start and eta_stop (RF-Inversion's controlled steps, fractions of the steps) must "
                             f"satisfy 0 <= eta_start <= eta_stop <= 1, got {self.eta_start!r}, {self.eta_stop!r}")
        seed = self.target_noise_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"target_noise_seed (RF-Inversion's noise sample) must be an integer >= 0, got {seed!r}")


@dataclass(frozen=True)
class RFSolverOptions:
    """RF-Solver: no options (two calls per step both ways)."""


@dataclass(frozen=True)
class FireFlowOptions:
    """FireFlow: no options (one call per step both ways, plus one)."""


class Inverted(NamedTuple):
    """What an invert function returns: the image's ``representation`` (tensors), ``regenerate(cond)`` (the clean
    state under the conditioning ``cond``), the method's ``settings`` to record, and backward passes used."""

    representation: dict
    regenerate: Callable[[dict], torch.Tensor]
    settings: dict
    backward_passes: int = 0


class EditSetup(NamedTuple):
    """What every method shares: the counted unguided denoiser, its guided version at ``guidance_scale``, and
    the unconditional embedding (SD: a tensor; SD3: the empty prompt's conditioning dict; FLUX: ``None``, its guidance
    is an input of the network and ``cfg`` is ``counted`` itself)."""

    counted: "RowCountingDenoiser"
    cfg: object
    uncond_embeds: Any
    guidance_scale: float


def _invert_bdia(setup: EditSetup, x_clean, grid, source: dict, o: BDIAOptions) -> Inverted:
    pair = invert(setup.cfg, x_clean, grid, solver="bdia_ddim", gamma=o.gamma, cond=source, dtype=None)
    regenerate = lambda cond: sample(setup.cfg, pair, grid, solver="bdia_ddim", gamma=o.gamma, cond=cond, dtype=None)  # noqa: E731
    return Inverted({"x_end": pair.x_end, "x_inner": pair.x_inner}, regenerate, {"gamma": o.gamma})


def _invert_ddim(setup: EditSetup, x_clean, grid, source: dict, o: DDIMInversionOptions) -> Inverted:
    w_inv = setup.guidance_scale if o.ddim_inversion_guidance is None else float(o.ddim_inversion_guidance)
    x_noise = ddim_invert(guided(setup.counted, w_inv, setup.uncond_embeds), x_clean, grid, source)
    regenerate = lambda cond: sample(setup.cfg, x_noise, grid, solver="ddim", cond=cond, dtype=None)  # noqa: E731
    return Inverted({"x_noise": x_noise}, regenerate, {"inversion_guidance": w_inv})


def _invert_edict(setup: EditSetup, x_clean, grid, source: dict, o: EDICTOptions) -> Inverted:
    pair = edict_invert(setup.cfg, x_clean, grid, source, p=o.p, leapfrog=o.leapfrog)
    regenerate = lambda cond: edict_sample(setup.cfg, pair, grid, cond, p=o.p, leapfrog=o.leapfrog).x  # noqa: E731
    return Inverted({"x": pair.x, "y": pair.y}, regenerate, {"p": o.p, "leapfrog": o.leapfrog})


def _invert_null_text(setup: EditSetup, x_clean, grid, source: dict, o: NullTextOptions) -> Inverted:
    inv = null_text_invert(setup.counted, x_clean, grid, source["encoder_hidden_states"], setup.uncond_embeds,
                           setup.guidance_scale, num_inner_steps=o.num_inner_steps, lr=o.lr, early_stop=o.early_stop)
    regenerate = lambda cond: null_text_sample(setup.counted, inv.x_noise, grid, cond["encoder_hidden_states"],  # noqa: E731
                                               inv.uncond_embeds, setup.guidance_scale)
    settings = {"num_inner_steps": o.num_inner_steps, "lr": o.lr, "early_stop": o.early_stop,
                "inner_steps": inv.inner_steps}
    return Inverted({"x_noise": inv.x_noise, "uncond_embeds": torch.stack(inv.uncond_embeds)}, regenerate, settings,
                    inv.backward_passes)


def _invert_flow_euler(setup: EditSetup, x_clean, grid, source: dict, o: FlowEulerOptions) -> Inverted:
    x_noise = flow_euler(setup.cfg, x_clean, flow_steps(grid, inverse=True), source)
    regenerate = lambda cond: sample(setup.cfg, x_noise, grid, solver="ddim", cond=cond, dtype=None)  # noqa: E731
    return Inverted({"x_noise": x_noise}, regenerate, {})


def _invert_rf_inversion(setup: EditSetup, x_clean, grid, source: dict, o: RFInversionOptions) -> Inverted:
    generator = torch.Generator().manual_seed(o.target_noise_seed)
    target = torch.randn(x_clean.shape, generator=generator, dtype=torch.float64).to(x_clean)
    x_noise = rf_inversion_invert(setup.cfg, x_clean, grid, target, source, gamma=o.controller_gamma)
    regenerate = lambda cond: rf_inversion_sample(setup.cfg, x_noise, grid, x_clean, cond, eta=o.controller_eta,  # noqa: E731
                                                  eta_start=o.eta_start, eta_stop=o.eta_stop)
    settings = {"controller_gamma": o.controller_gamma, "controller_eta": o.controller_eta, "eta_start": o.eta_start,
                "eta_stop": o.eta_stop, "target_noise_seed": o.target_noise_seed}
    # the reverse ODE steers towards the image itself: it belongs to the representation
    return Inverted({"x_noise": x_noise, "reference": x_clean, "target_noise": target}, regenerate, settings)


def _invert_rf_solver(setup: EditSetup, x_clean, grid, source: dict, o: RFSolverOptions) -> Inverted:
    x_noise = rf_solver(setup.cfg, x_clean, flow_steps(grid, inverse=True), source)
    regenerate = lambda cond: rf_solver(setup.cfg, x_noise, flow_steps(grid), cond)  # noqa: E731
    return Inverted({"x_noise": x_noise}, regenerate, {})


def _invert_fireflow(setup: EditSetup, x_clean, grid, source: dict, o: FireFlowOptions) -> Inverted:
    x_noise = fireflow(setup.cfg, x_clean, flow_steps(grid, inverse=True), source)
    regenerate = lambda cond: fireflow(setup.cfg, x_noise, flow_steps(grid), cond)  # noqa: E731
    return Inverted({"x_noise": x_noise}, regenerate, {})


class InversionMethod(NamedTuple):
    """A registry entry: the options dataclass and ``invert(setup, x_clean, grid, source_cond, options)``."""

    options: type
    invert: Callable[..., Inverted]


#: The editing methods by name (:func:`invert_and_edit` is the harness over them).
METHOD_REGISTRY = {
    "bdia": InversionMethod(BDIAOptions, _invert_bdia),
    "ddim": InversionMethod(DDIMInversionOptions, _invert_ddim),
    "edict": InversionMethod(EDICTOptions, _invert_edict),
    "null_text": InversionMethod(NullTextOptions, _invert_null_text),
}
METHODS = tuple(METHOD_REGISTRY)

#: The editing methods for flow-matching models (SD3, FLUX): BDIA over flow Euler, plain flow-Euler inversion and the
#: published flow inversions, each written in the model's own latents ``x_t`` (see the module notes).
FLOW_METHOD_REGISTRY = {
    "bdia": InversionMethod(BDIAOptions, _invert_bdia),  # bdia.invert / bdia.sample step a flow in its own x_t
    "ddim": InversionMethod(FlowEulerOptions, _invert_flow_euler),
    "rf_inversion": InversionMethod(RFInversionOptions, _invert_rf_inversion),
    "rf_solver": InversionMethod(RFSolverOptions, _invert_rf_solver),
    "fireflow": InversionMethod(FireFlowOptions, _invert_fireflow),
}
FLOW_METHODS = tuple(FLOW_METHOD_REGISTRY)
#: Methods written for VP eps-models only (Stable Diffusion 1.x / 2.x): refused on a flow model.
VP_ONLY_METHODS = tuple(m for m in METHODS if m not in FLOW_METHOD_REGISTRY)


def method_registry(flow: bool = False) -> dict:
    """The methods for a VP model (:data:`METHOD_REGISTRY`) or, with ``flow``, a flow-matching one
    (:data:`FLOW_METHOD_REGISTRY`)."""
    return FLOW_METHOD_REGISTRY if flow else METHOD_REGISTRY


def check_method(method, flow: bool = False) -> None:
    """One line naming the method when it is unknown or does not apply to the model's kind."""
    registry = method_registry(flow)
    if method in registry:
        return
    if flow and method in METHOD_REGISTRY:
        raise ValueError(f"{method} is an inversion method for VP eps-prediction models (Stable Diffusion 1.x / 2.x), "
                         f"not for flow-matching models (SD3, FLUX); for them choose from {', '.join(FLOW_METHODS)}")
    if not flow and method in FLOW_METHOD_REGISTRY:
        raise ValueError(f"{method} is an inversion method for flow-matching models (SD3, FLUX), not for Stable "
                         f"Diffusion 1.x / 2.x; for it choose from {', '.join(METHODS)}")
    raise ValueError(f"unknown editing method {method!r}; choose from {', '.join(registry)}")


def method_options(method: str, settings: Mapping[str, Any] | None = None, flow: bool = False):
    """The options dataclass of ``method`` (of the VP registry, or with ``flow`` of the flow registry) filled from
    ``settings`` (keys of other methods are ignored)."""
    check_method(method, flow)
    options = method_registry(flow)[method].options
    names = {f.name for f in fields(options)}
    return options(**{k: v for k, v in (settings or {}).items() if k in names})


#: Every option name of every method (one settings dict serves them all).
METHOD_OPTION_NAMES = frozenset(f.name for registry in (METHOD_REGISTRY, FLOW_METHOD_REGISTRY)
                                for entry in registry.values() for f in fields(entry.options))
