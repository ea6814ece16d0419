"""The multistep samplers people pick at low NFE: DPM-Solver++(2M), UniPC, iPNDM. None is invertible.

Conventions as in :mod:`bdia.solvers` (``docs/design.md``): EDM's state ``x = x0 + sigma * n``, a strictly
descending float64 grid ``sigmas`` of ``N + 1`` levels, ``x_k`` at ``sigmas[k]``, ``D_k = D(x_k, sigma_k)`` the
denoiser's output. Each solver calls the denoiser once per step, at the state it has just reached, and keeps
the last few ``D_k`` (or slopes) as local variables of its loop.

The exponential integrators (DPM-Solver++, UniPC) work in ``lambda = -log sigma``, the log signal-to-noise ratio
of the VP latent ``z = alpha x`` (``alpha / sigma_z = 1 / sigma``), where the probability-flow ODE reads
``d(x / sigma) / d(1 / sigma) = D``. Their VP-coordinate updates (Lu et al. 2022; Zhao et al. 2023; diffusers'
``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``) divided by ``alpha_{k+1}`` are the x-space forms
below; every ``alpha`` cancels. A step that lands on ``sigma = 0`` (``lambda = inf``) is first order, where it is
exact for a constant ``D``: ``x_{k+1} = D_k``.
"""

from __future__ import annotations

import math

import torch

from .schedules import as_sigmas

__all__ = ["dpmpp_2m", "unipc", "ipndm", "UNIPC_VARIANTS", "MULTISTEP_SOLVERS", "check_options"]

MULTISTEP_SOLVERS = ("dpmpp_2m", "unipc", "ipndm")
UNIPC_VARIANTS = ("bh1", "bh2")


def check_options(solver: str, options: dict) -> None:
    """``unipc``'s ``order`` / ``variant`` and ``ipndm``'s ``max_order`` (one-line ``ValueError``)."""
    order, variant = options.get("order", 2), options.get("variant", "bh2")
    max_order = options.get("max_order", 4)
    if solver == "unipc" and (isinstance(order, bool) or order not in (1, 2, 3)):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
    if solver == "unipc" and variant not in UNIPC_VARIANTS:
        raise ValueError(f"unipc variant must be one of {list(UNIPC_VARIANTS)}, got {variant!r}")
    if solver == "ipndm" and (isinstance(max_order, bool) or max_order not in _ADAMS_BASHFORTH):
        raise ValueError(f"ipndm max_order must be 1, 2, 3 or 4, got {max_order!r}")


class _Loop:
    """The grid as python floats and as 0-dim tensors on the state's device, the bound denoiser, and checks."""

    def __init__(self, denoiser, sigmas, x, class_labels, cond, progress, name):
        if getattr(denoiser, "coordinates", "edm") != "edm":
            raise ValueError(f"{name} steps in EDM's x with a denoiser D(x, sigma); this model has other coordinates")
        self.sigmas = as_sigmas(sigmas)
        if math.isinf(self.sigmas[0]):
            raise ValueError(f"{name} steps in EDM's x, which is infinite at sigma = inf; start at a finite sigma")
        self.levels = self.sigmas.tolist()
        self.sig = self.sigmas.to(device=x.device, dtype=x.dtype)
        self.num_steps = len(self.levels) - 1
        self.denoiser, self.class_labels, self.cond = denoiser, class_labels, dict(cond or {})
        self.steps = range(self.num_steps)
        if progress:  # the core needs only torch; tqdm draws the bar when asked for one
            from tqdm.auto import tqdm

            self.steps = tqdm(self.steps, desc=name, leave=False, dynamic_ncols=True)

    def denoised(self, x, k):
        return self.denoiser(x, self.sig[k], self.class_labels, **self.cond).to(x.dtype)

    def lam(self, k) -> float:
        """``lambda_k = -log sigma_k`` (``inf`` at sigma = 0)."""
        return -math.log(self.levels[k]) if self.levels[k] > 0 else math.inf

    def check(self, x, k):
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"non-finite values (NaN/Inf) in the solver state after step {k} "
                f"(sigma {self.levels[k]:.6g} -> {self.levels[k + 1]:.6g})"
            )


def _exp_euler(loop: _Loop, x, k, denoised):
    """DPM-Solver++(1) = DDIM: ``x_{k+1} = (sigma_{k+1}/sigma_k) x_k + (1 - sigma_{k+1}/sigma_k) D_k``."""
    ratio = loop.levels[k + 1] / loop.levels[k]
    return ratio * x + (1 - ratio) * denoised


# --------------------------------------------------------------------------------------------------
# DPM-Solver++(2M).


def dpmpp_2m(denoiser, x, sigmas, class_labels=None, cond=None, progress=False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; data prediction, multistep, second order):

        h_k = lambda_{k+1} - lambda_k,     r_k = h_{k-1} / h_k,
        x_{k+1} = (sigma_{k+1}/sigma_k) x_k - expm1(-h_k) (D_k + (D_k - D_{k-1}) / (2 r_k))

    The first step (no ``D_{k-1}`` yet) and a step onto sigma = 0 are first order (DDIM), as in diffusers'
    ``DPMSolverMultistepScheduler`` (``solver_order=2``, ``final_sigmas_type="zero"``) and k-diffusion's
    ``sample_dpmpp_2m``. One network evaluation per step (NFE = N).
    """
    loop = _Loop(denoiser, sigmas, x, class_labels, cond, progress, "dpmpp_2m")
    previous = None
    for k in loop.steps:
        denoised = loop.denoised(x, k)
        if previous is None or loop.levels[k + 1] == 0:
            x = _exp_euler(loop, x, k, denoised)
        else:
            h, h_prev = loop.lam(k + 1) - loop.lam(k), loop.lam(k) - loop.lam(k - 1)
            blended = denoised + (denoised - previous) * (h / (2 * h_prev))
            x = (loop.levels[k + 1] / loop.levels[k]) * x - math.expm1(-h) * blended
        previous = denoised
        loop.check(x, k)
    return x


# --------------------------------------------------------------------------------------------------
# UniPC.


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """A small dense linear solve in float64 (the UniPC coefficients; at most 3 x 3)."""
    out = torch.linalg.solve(torch.tensor(matrix, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return out.tolist()


def _unipc_b(hh: float, order: int, variant: str) -> tuple[list[float], float]:
    """UniPC's right-hand side ``b_i = i! phi_{i+1}(hh) / B(hh)`` for i = 1..order (``hh = -h``; diffusers'
    recursion ``h phi_{k+1} = h phi_k / hh - 1/k!``) and ``B(hh)``: ``expm1(hh)`` (bh2) or ``hh`` (bh1)."""
    b_of_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi, factorial, rhs = math.expm1(hh) / hh - 1, 1, []
    for i in range(1, order + 1):
        rhs.append(h_phi * factorial / b_of_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    return rhs, b_of_h


def _unipc_update(loop: _Loop, x, k_from, k_to, history, order, variant, new=None):
    """One UniPC update of ``x`` (at ``sigmas[k_from]``) to ``sigmas[k_to]`` in data prediction:

        x_to = (sigma_to/sigma_from) x - expm1(-h) D_from - B(-h) (sum_i rho_i (D_{from-i} - D_from) / r_i [+ rho_c (D_new - D_from)])

    with ``r_i = (lambda_{from-i} - lambda_from) / h``. Predictor (UniP-p, ``new=None``): ``rho`` solves the
    first ``order - 1`` conditions (1/2 for order 2, as diffusers). Corrector (UniC-p, ``new = D_to``, the
    output at the predicted state): ``rho`` solves all ``order`` conditions (1/2 for order 1); it raises the
    order by one without another network evaluation. ``history[-1]`` is ``D_from``, older ones before it.
    """
    h = loop.lam(k_to) - loop.lam(k_from)
    ratio = loop.levels[k_to] / loop.levels[k_from]
    base = ratio * x - math.expm1(-h) * history[-1]
    if order == 1 and new is None:
        return base  # DDIM
    if math.isinf(h):
        raise ValueError("UniPC: a step onto sigma = 0 must be first order")
    d_from = history[-1]
    rs = [(loop.lam(k_from - i) - loop.lam(k_from)) / h for i in range(1, order)]
    diffs = [(history[-1 - i] - d_from) / rs[i - 1] for i in range(1, order)]
    rhs, b_of_h = _unipc_b(-h, order, variant)
    if new is None:
        if order == 2:
            rhos = [0.5]
        else:
            rhos = _solve([[r**j for r in rs] for j in range(order - 1)], rhs[:-1])
        return base - b_of_h * sum(rho * d for rho, d in zip(rhos, diffs))
    if order == 1:
        rhos = [0.5]
    else:
        rhos = _solve([[r**j for r in rs + [1.0]] for j in range(order)], rhs)
    correction = sum((rho * d for rho, d in zip(rhos[:-1], diffs)), torch.zeros_like(x)) + rhos[-1] * (new - d_from)
    return base - b_of_h * correction


def unipc(denoiser, x, sigmas, order: int = 2, variant: str = "bh2", class_labels=None, cond=None,
          progress=False) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the UniP-``order`` predictor and the UniC corrector in data prediction, with
    ``B(h) = e^h - 1`` (``variant="bh2"``, diffusers' default) or ``B(h) = h`` (``"bh1"``).

    Step k: evaluate ``D_k`` at the predicted ``x_k``; correct ``x_k`` with UniC (same order as the predictor
    that made it; uses ``D_k``, no extra evaluation); then predict ``x_{k+1}`` from the corrected ``x_k`` and
    ``D_k, D_{k-1}, ...`` (the stored ``D_k`` stays the one taken at the uncorrected state). The order warms up
    from 1 and drops to 1 on the last step (diffusers' ``lower_order_final``), and the state that lands on the
    last level is not corrected (no evaluation there). NFE = N. UniP-2 with bh2 is DPM-Solver++(2M)'s update;
    the corrector makes the difference. Matches diffusers' ``UniPCMultistepScheduler`` (``solver_order=order``,
    ``predict_x0=True``, ``final_sigmas_type="zero"``).
    """
    check_options("unipc", dict(order=order, variant=variant))
    loop = _Loop(denoiser, sigmas, x, class_labels, cond, progress, "unipc")
    N = loop.num_steps
    history, last = [], None  # last: (corrected x_{k-1}, the order of the step that made x_k)
    for k in loop.steps:
        denoised = loop.denoised(x, k)
        if last is not None:
            x = _unipc_update(loop, last[0], k - 1, k, history, last[1], variant, new=denoised)
        history = (history + [denoised])[-order:]
        step_order = min(order, N - k, k + 1)
        last = (x, step_order)
        x = _unipc_update(loop, x, k, k + 1, history, step_order, variant)
        loop.check(x, k)
    return x


# --------------------------------------------------------------------------------------------------
# iPNDM.

#: Adams-Bashforth weights on (d_k, d_{k-1}, ...) for orders 1-4 (constant steps; iPNDM uses them on any grid).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(denoiser, x, sigmas, max_order: int = 4, class_labels=None, cond=None, progress=False) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS paper; the ``ipndm`` of zju-pi/diff-sampler): Adams-Bashforth on the
    slopes ``d_k = (x_k - D_k) / sigma_k`` in sigma, with the constant-step weights of order
    ``min(max_order, k + 1)`` (lower orders warm it up):

        x_{k+1} = x_k + (sigma_{k+1} - sigma_k) sum_j w_j d_{k-j},    order 4: w = (55, -59, 37, -9) / 24

    One network evaluation per step (NFE = N).
    """
    check_options("ipndm", dict(max_order=max_order))
    loop = _Loop(denoiser, sigmas, x, class_labels, cond, progress, "ipndm")
    slopes = []
    for k in loop.steps:
        slopes = ([(x - loop.denoised(x, k)) / loop.sig[k]] + slopes)[:max_order]
        weights = _ADAMS_BASHFORTH[min(max_order, k + 1)]
        x = x + (loop.sig[k + 1] - loop.sig[k]) * sum(w * d for w, d in zip(weights, slopes))
        loop.check(x, k)
    return x
