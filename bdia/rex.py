"""Rex (Blasingame & Liu, arXiv 2502.08834): exponential Runge-Kutta steps inside McCallum and Foster's reversible
coupling, exact to round-off, forward and backward.

Conventions as in :mod:`bdia.solvers` (``docs/design.md``): EDM's state ``x = x0 + sigma * n``, a strictly
descending float64 grid ``sigmas`` (``N + 1`` levels), ``D(x, sigma)`` the denoiser. Rex works in the
data-prediction variables of an exponential integrator, ``y = x / sigma`` and ``u = 1 / sigma`` (for a VP model
``y = z / sigma_z``, ``u = alpha / sigma_z``: the same numbers), where the probability-flow ODE is

    dy/du = D(y / u, 1 / u)                                     (Lawson's transformation: no linear term left)

``Psi_h(x; sigma)`` is one explicit Runge-Kutta step of it with step ``h`` in ``u`` from ``y = x / sigma``,
returned as the increment of ``y``: ``h sum_i b_i k_i``, ``k_i = D(sigma_i Z_i, sigma_i)``,
``Z_i = y + h sum_j a_ij k_j``, ``sigma_i = 1 / (u + c_i h)``.

The state is a pair ``(x, x_hat)`` at one level; both start at the noise. One coupled step ``sigma_k -> sigma_{k+1}``
(``h = 1/sigma_{k+1} - 1/sigma_k``, ``r = sigma_{k+1} / sigma_k``), with the coupling parameter ``zeta`` in (0, 1]:

    x_{k+1}     = r (zeta x_k + (1 - zeta) x_hat_k) + sigma_{k+1} Psi_h(x_hat_k; sigma_k)
    x_hat_{k+1} = r x_hat_k - sigma_{k+1} Psi_{-h}(x_{k+1}; sigma_{k+1})

and its exact inverse, with the same two RK steps at the same states:

    x_hat_k = x_hat_{k+1} / r + sigma_k Psi_{-h}(x_{k+1}; sigma_{k+1})
    x_k     = (x_{k+1} / r - (1 - zeta) x_hat_k - sigma_k Psi_h(x_hat_k; sigma_k)) / zeta

Two RK steps per step: ``2 s`` network evaluations for an ``s``-stage tableau. ``x`` is the solution; with
``zeta = 1`` it moves by increments taken at ``x_hat`` and vice versa; ``zeta < 1`` pulls ``x`` towards ``x_hat``.

The last step ends where ``u = 1/sigma`` may be infinite (sigma = 0: the data). There Rex takes the ``x``-half of a
Rex-Euler step in noise-prediction variables (weight 1, time ``sigma`` on EDM's x), which stays finite and is
still exactly invertible given ``x_hat_{N-1}``:

    x_N = zeta x_{N-1} + (1 - zeta) x_hat_{N-1} + (sigma_N - sigma_{N-1}) (x_hat_{N-1} - D(x_hat_{N-1}, sigma_{N-1})) / sigma_{N-1}

(one network evaluation; first order, like every solver's step onto sigma = 0). So sampling returns the pair
``(x_N, x_hat_{N-1})`` (the output and Rex's companion state one level inside), and inversion the pair
``(x_0, x_hat_0)`` at ``sigmas[0]``, which sampling takes back. NFE = ``2 s (N - 1) + 1``; inversion costs the same
(plus one for the approximate first step when it starts from a single clean state).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .schedules import as_sigmas

__all__ = ["Tableau", "TABLEAUS", "rex", "invert_rex", "rex_nfe", "DEFAULT_ZETA", "check_options"]

#: The coupling parameter the reference implementation's scripts use (zblasingame/Rex-solver).
DEFAULT_ZETA = 0.999


class Tableau(NamedTuple):
    """An explicit Runge-Kutta (Butcher) tableau: nodes ``c``, the strictly lower-triangular ``a`` (row ``i``
    holds ``a_i0 .. a_i(i-1)``), weights ``b``, and the order."""

    c: tuple
    a: tuple
    b: tuple
    order: int


TABLEAUS = {
    "euler": Tableau((0.0,), ((),), (1.0,), 1),
    "midpoint": Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0), 2),
    "heun": Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5), 2),
    "ssprk3": Tableau((0.0, 1.0, 0.5), ((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3), 3),  # Shu-Osher
    "rk4": Tableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4),
}


def check_options(tableau: str = "midpoint", zeta: float = DEFAULT_ZETA) -> Tableau:
    """The tableau's name and ``zeta`` (one-line ``ValueError``); returns the tableau."""
    if tableau not in TABLEAUS:
        raise ValueError(f"rex tableau must be one of {list(TABLEAUS)}, got {tableau!r}")
    if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not 0 < zeta <= 1:
        raise ValueError(f"rex zeta must be a number in (0, 1], got {zeta!r}")
    return TABLEAUS[tableau]


def rex_nfe(num_steps: int, tableau: str = "midpoint") -> int:
    """Network evaluations of :func:`rex` for ``num_steps`` steps (the last one a single evaluation)."""
    return 2 * len(check_options(tableau).c) * (num_steps - 1) + 1


class _Rex:
    """The bound denoiser and grid; the RK step ``Psi`` and the last half-step, shared by sampling and inversion."""

    def __init__(self, denoiser, sigmas, x, tableau, class_labels, cond):
        if getattr(denoiser, "coordinates", "edm") != "edm":
            raise ValueError("rex steps in EDM's x with a denoiser D(x, sigma); this model has other coordinates")
        self.sigmas = as_sigmas(sigmas)
        self.levels = self.sigmas.tolist()
        if self.levels[0] == float("inf"):
            raise ValueError("rex steps in EDM's x, which is infinite at sigma = inf; start the grid at a finite sigma")
        self.num_steps = len(self.levels) - 1
        self.tableau = tableau
        self.denoiser, self.class_labels, self.cond = denoiser, class_labels, dict(cond or {})
        self.device, self.dtype = x.device, x.dtype

    def denoised(self, x, sigma: float):
        sigma_t = torch.tensor(sigma, dtype=self.dtype, device=self.device)
        return self.denoiser(x, sigma_t, self.class_labels, **self.cond).to(x.dtype)

    def psi(self, x, sigma_from: float, sigma_to: float):
        """``Psi_h(x; sigma_from)``, ``h = 1/sigma_to - 1/sigma_from``: the increment of ``y = x / sigma``."""
        u, h = 1 / sigma_from, 1 / sigma_to - 1 / sigma_from
        y, ks = x / sigma_from, []
        for c, row in zip(self.tableau.c, self.tableau.a):
            # stage levels: the grid's own numbers at c = 0 and c = 1 (a VP model then sees its exact timesteps)
            sigma = sigma_from if c == 0 else sigma_to if c == 1 else 1 / (u + c * h)
            z = y
            for a, k in zip(row, ks):
                if a != 0:
                    z = z + (h * a) * k
            ks.append(self.denoised(sigma * z, sigma))
        return sum((h * b) * k for b, k in zip(self.tableau.b, ks) if b != 0)

    def last_increment(self, x_hat, k):
        """``(sigma_N - sigma_{N-1}) * eps(x_hat_{N-1})`` of the last half-step (k = N - 1)."""
        sigma_from, sigma_to = self.levels[k], self.levels[k + 1]
        return (sigma_to - sigma_from) / sigma_from * (x_hat - self.denoised(x_hat, sigma_from))


def _check(x, what, k, levels):
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite values (NaN/Inf) in the rex state after {what} {k} "
                                 f"(sigma {levels[k]:.6g} -> {levels[k + 1]:.6g})")


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def rex(denoiser, x_init, sigmas, tableau: str = "midpoint", zeta: float = DEFAULT_ZETA, class_labels=None, cond=None,
        progress=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with Rex (module notes). ``x_init`` is the noise at ``sigmas[0]`` (then ``x_hat_0 = x_0``) or the pair
    ``(x_0, x_hat_0)`` from :func:`invert_rex`. ``tableau``: ``euler`` (order 1), ``midpoint`` / ``heun`` (2),
    ``ssprk3`` (3), ``rk4`` (4) (:data:`TABLEAUS`); ``zeta`` in (0, 1]. Returns ``(x_N, x_hat_{N-1})``; ``x_N`` is the sample.
    NFE = ``2 s (N - 1) + 1`` for an ``s``-stage tableau (Euler: EDM's ``2N - 1``)."""
    table = check_options(tableau, zeta)
    if isinstance(x_init, (tuple, list)):
        x, x_hat = x_init
    else:
        x = x_hat = x_init
    r = _Rex(denoiser, sigmas, x, table, class_labels, cond)
    levels = r.levels
    for k in _progress(range(r.num_steps), progress, f"rex {tableau}"):
        if k == r.num_steps - 1:  # the last half-step (module notes)
            x = zeta * x + (1 - zeta) * x_hat + r.last_increment(x_hat, k)
        else:
            ratio = levels[k + 1] / levels[k]
            x = ratio * (zeta * x + (1 - zeta) * x_hat) + levels[k + 1] * r.psi(x_hat, levels[k], levels[k + 1])
            x_hat = ratio * x_hat - levels[k + 1] * r.psi(x, levels[k + 1], levels[k])
        _check(x, "step", k, levels)
    return x, x_hat


def invert_rex(denoiser, x_last, sigmas, tableau: str = "midpoint", zeta: float = DEFAULT_ZETA, class_labels=None,
               cond=None, progress=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`rex`: from the pair ``(x_N, x_hat_{N-1})`` back to ``(x_0, x_hat_0)``.

    ``x_last`` may also be a single clean state ``x_N`` (an encoded image): then ``x_hat_{N-1}`` comes from one
    approximate DDIM-inversion step (the noise estimate at ``x_N`` with the label of ``sigmas[N-1]``, as BDIA's
    inversion does). Any ``x_hat_{N-1}`` regenerates ``x_N`` exactly; that one keeps it near the trajectory."""
    table = check_options(tableau, zeta)
    single = not isinstance(x_last, (tuple, list))
    first = x_last if single else x_last[0]
    if first.dtype != torch.float64:
        warnings.warn(
            f"rex inversion with dtype={first.dtype}: running the coupling backwards grows its companion mode by about "
            "(sigma_k / sigma_(k+1))^2 per step near the data; measured float32 round trips are 1e-3 to 3e-1 relative "
            "(make samplers). Use float64 states.", RuntimeWarning, stacklevel=3)
    r = _Rex(denoiser, sigmas, first, table, class_labels, cond)
    levels, N = r.levels, r.num_steps
    if single:
        x = x_last
        x_hat = x + (levels[N - 1] - levels[N]) / levels[N - 1] * (x - r.denoised(x, levels[N - 1]))
    else:
        x, x_hat = x_last
    x = (x - (1 - zeta) * x_hat - r.last_increment(x_hat, N - 1)) / zeta
    _check(x, "inversion step", N - 1, levels)
    for k in _progress(range(N - 2, -1, -1), progress, f"invert rex {tableau}"):
        inv_ratio = levels[k] / levels[k + 1]
        x_hat = inv_ratio * x_hat + levels[k] * r.psi(x, levels[k + 1], levels[k])
        x = (inv_ratio * x - (1 - zeta) * x_hat - levels[k] * r.psi(x_hat, levels[k], levels[k + 1])) / zeta
        _check(x, "inversion step", k, levels)
    return x, x_hat
