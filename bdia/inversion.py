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
  included: prompt-to-prompt attention control (the null-text paper edits with it), EDICT's own add-ons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .denoisers import ClassifierFreeGuidance, RowCountingDenoiser
from .schedules import as_sigmas, vp_alpha, x_to_z, z_to_x
from .solvers import invert, sample

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


def guided(base, guidance_scale: float, uncond_embeds: torch.Tensor):
    """Classifier-free guidance on the unguided denoiser ``base`` with unconditional text embedding
    ``uncond_embeds`` (one batched call on both halves); ``guidance_scale = 1`` is ``base`` itself (the
    conditional denoiser, one half-size call), as :meth:`bdia.networks.sd.StableDiffusion.denoiser` does."""
    if float(guidance_scale) == 1.0:
        return base
    return ClassifierFreeGuidance(base, guidance_scale, {"encoder_hidden_states": uncond_embeds})


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
       with Adam (learning rate ``lr * (1 - lr_decay * k)``) to minimise ``mse(DDIM_z(zbar, eps_w(zbar; e)), z*_{k+1})``
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
        optimizer = torch.optim.Adam([e], lr=lr * (1.0 - lr_decay * k))
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


class Inverted(NamedTuple):
    """What an invert function returns: the image's ``representation`` (tensors), ``regenerate(cond)`` (the clean
    state under the conditioning ``cond``), the method's ``settings`` to record, and backward passes used."""

    representation: dict
    regenerate: Callable[[dict], torch.Tensor]
    settings: dict
    backward_passes: int = 0


class EditSetup(NamedTuple):
    """What every method shares: the counted unguided denoiser, its guided version at ``guidance_scale``, and
    the unconditional embedding."""

    counted: "RowCountingDenoiser"
    cfg: object
    uncond_embeds: torch.Tensor
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


def method_options(method: str, settings: Mapping[str, Any] | None = None):
    """The options dataclass of ``method`` filled from ``settings`` (keys of other methods are ignored)."""
    if method not in METHOD_REGISTRY:
        raise ValueError(f"unknown editing method {method!r}; choose from {', '.join(METHODS)}")
    options = METHOD_REGISTRY[method].options
    names = {f.name for f in fields(options)}
    return options(**{k: v for k, v in (settings or {}).items() if k in names})
