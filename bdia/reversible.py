"""Gradients through a whole sampling run, in memory that does not grow with the number of steps.

    noise = torch.randn(8, 1, 16, 16, requires_grad=True)
    images = bdia.sample_with_grad(denoiser, noise * sigmas[0], sigmas, solver="bdia_edm", gamma=0.96)
    loss(images).backward()   # noise.grad; the denoiser's parameters' .grad; .grad of tensors in cond

``backprop`` picks how the backward pass gets the states it needs (``docs/design.md``, "Gradients through the
sampler", writes the adjoint out):

* ``"reversible"`` (BDIA solvers): the forward pass runs without autograd and keeps only its input and the
  final pair. The backward pass walks the grid in reverse: at step ``k`` it recomputes the step's two maps at
  the middle state ``x_k`` with autograd on (one step's network calls), back-propagates through them, and
  recovers the state before it with BDIA's exact inverse from the same two maps. Memory: O(1) states plus one
  step's activations, whatever N. Time: one more forward pass than plain autograd.
* ``"checkpoint"``: :func:`torch.utils.checkpoint.checkpoint` around every step: keeps each step's input
  states (O(N) states, no activations) and recomputes one step's activations at a time.
* ``"autograd"``: plain autograd through the unrolled sampler (the solver functions of :mod:`bdia.solvers`
  with autograd on): O(N) activations. The reference the other two are tested against.

The BDIA step ``(x_{k-1}, x_k) -> (x_k, x_{k+1})`` is ``x_{k+1} = a_k (x_{k-1} - B_k(x_k)) + F_k(x_k)`` with
``a_k = gamma_k c_k`` (``bdia.solvers``: ``F`` the forward map, ``B`` the backward map, both of ``x_k`` only).
With ``g_j = dL/dx_j`` collected from every later step, its adjoint is

    g_{k-1} = a_k g_{k+1}            (x_{k-1} enters step k only through a_k x_{k-1}),
    g_k    += J(F_k - a_k B_k)(x_k)^T g_{k+1},

and the parameters and conditioning collect the same vector-Jacobian product. The inverse
``x_{k-1} = (x_{k+1} - F_k(x_k)) / a_k + B_k(x_k)`` reuses that product's ``F_k`` and ``B_k``.

Round-off in the recovered states grows like inversion's, by about ``1 / gamma`` per step (float64 at gamma in
[0.9, 1]: ~1e-14 relative over 50 steps; float32 or small gamma: far more). :func:`sample_with_grad` warns
up front when the predicted error of the recovered states is above
:data:`bdia.gammas.UNSTABLE_ROUNDTRIP_ERROR`, and the backward pass measures it: it recovers the starting state
it was given and compares (``on_backward`` receives the numbers; a warning says when it exceeds that bound).
Steps with ``gamma_k = 0`` cannot be inverted; there the pair the step starts from is kept (``store_every``
keeps more pairs, which bounds the drift of long, small-gamma or float32 runs).
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import solvers as _solvers
from .checks import check_solver_options
from .gammas import UNSTABLE_ROUNDTRIP_ERROR, gamma_schedule, predicted_roundtrip_error
from .schedules import as_sigmas
from .solvers import StatePair

__all__ = ["BACKPROP", "ReversibleGradientWarning", "sample_with_grad", "predicted_recovery_error"]

#: How :func:`sample_with_grad` gets the states its backward pass needs.
BACKPROP = ("reversible", "checkpoint", "autograd")


class ReversibleGradientWarning(RuntimeWarning):
    """The states a reversible backward pass recovers (and so its gradients) may be inaccurate."""


# --------------------------------------------------------------------------------------------------
# The solver's pieces, from bdia.solvers (one set of one-step maps for sampling, inversion and gradients).


def _maps_and_scale(solver: str, solver_kwargs: Mapping):
    """``(maps, scale_fn)`` of a solver: ``maps(p, x, k, need_back)`` gives ``(F_k(x), B_k(x))`` and
    ``scale_fn(levels, k)`` the coordinate factor ``c_k``. The base solvers are BDIA with every ``a_k = 0``."""
    if solver in ("bdia_ddim", "ddim"):
        return _solvers._ddim_maps, _solvers._ddim_scale
    options = {**_solvers.BDIA_EDM_DEFAULTS, **solver_kwargs}
    options.pop("gamma", None)
    return _solvers._edm_options(options["backward"], options["space"], options["sigma_data"])


def _is_stored(coeffs: Sequence[float], k: int, store_every: int | None) -> bool:
    """Whether the reversible forward pass keeps the pair ``(x_{k-1}, x_k)`` that step ``k`` starts from: where
    the step cannot be inverted (``a_k = 0``), and every ``store_every`` steps when asked. Keeping both states
    (not only the one the step forgets) resets the drift of the recovered pair completely."""
    return coeffs[k] == 0 or bool(store_every and k % store_every == 0)


def predicted_recovery_error(gammas: Sequence[float], dtype: torch.dtype, store_every: int | None = None) -> float:
    """Predicted relative error of the states a reversible backward pass recovers: inversion's round-off model
    (:func:`bdia.gammas.predicted_roundtrip_error`) over the longest run of steps walked back from a kept pair
    (the final one, or one kept by :func:`_is_stored`)."""
    worst, run = 0.0, [0.0]
    for k in range(len(gammas) - 1, 0, -1):
        if _is_stored(gammas, k, store_every):
            run = [0.0]  # the walk continues from the exact pair here
        if gammas[k] == 0:
            continue
        run.append(gammas[k])
        worst = max(worst, predicted_roundtrip_error(run, dtype))
    return worst


def _check_deterministic(denoiser) -> None:
    """A network in training mode with dropout draws other masks when a step is recomputed, so the recovered
    states and the gradients would be wrong: refuse it."""
    if not isinstance(denoiser, nn.Module):
        return
    for name, module in denoiser.named_modules():
        if not module.training:
            continue
        rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else getattr(module, "dropout", 0)
        rate = rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) else 0
        if rate > 0 or (getattr(module, "label_dropout", 0) or 0) > 0:
            raise ValueError(
                f"backprop='reversible' recomputes every step, but {name or type(module).__name__} is in training "
                f"mode with dropout (other masks on recomputation); call denoiser.eval() or use backprop='checkpoint'"
            )


def _split_conditioning(class_labels, cond):
    """The tensors among ``class_labels`` and ``cond`` (they become inputs of the autograd graph) and a function
    that rebuilds ``(class_labels, cond)`` from replacements for them."""
    cond = dict(cond or {})
    keys = [key for key, value in cond.items() if isinstance(value, torch.Tensor)]
    labels_is_tensor = isinstance(class_labels, torch.Tensor)
    tensors = ([class_labels] if labels_is_tensor else []) + [cond[key] for key in keys]

    def rebuild(replacements):
        replacements = list(replacements)
        labels = replacements.pop(0) if labels_is_tensor else class_labels
        return labels, {**cond, **dict(zip(keys, replacements))}

    return tensors, rebuild


def _relative_error(recovered: torch.Tensor, exact: torch.Tensor) -> float:
    scale = float(exact.abs().max())
    return float((recovered - exact).abs().max()) / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------------------------------
# Reversible backpropagation.


class _Run:
    """What the reversible forward and backward passes share (plain settings, no tensors of the user's)."""

    def __init__(self, denoiser, sigmas, solver, maps, coeffs, rebuild, num_conditioning, store_every, progress,
                 predicted, on_backward):
        self.denoiser, self.sigmas, self.solver, self.maps, self.coeffs = denoiser, sigmas, solver, maps, coeffs
        self.rebuild, self.num_conditioning, self.store_every = rebuild, num_conditioning, store_every
        self.progress, self.predicted, self.on_backward = progress, predicted, on_backward

    def problem(self, x, conditioning):
        class_labels, cond = self.rebuild(conditioning)
        return _solvers._Problem(self.denoiser, self.sigmas, x, class_labels, cond)


class _ReversibleBDIA(torch.autograd.Function):
    """``(x_0[, x_1], *conditioning, *params) -> (x_N, x_{N-1})`` through a BDIA solver; the backward pass
    recovers the states with the exact inverse instead of storing them (see the module notes)."""

    @staticmethod
    def forward(ctx, run: _Run, x_start, x_start_inner, *tensors):
        conditioning = tensors[: run.num_conditioning]
        p = run.problem(x_start, conditioning)
        coeffs, maps = run.coeffs, run.maps
        stored = {}
        if x_start_inner is None:  # the first step is a plain base step
            x_prev, x = x_start, maps(p, x_start, 0, need_back=False)[0]
            p.check(x, 0)
        else:
            x_prev, x = x_start, x_start_inner
        for k in _solvers._progress(range(1, p.num_steps), run.progress, run.solver):
            if _is_stored(coeffs, k, run.store_every):
                stored[k] = (x_prev, x)  # step k cannot give x_{k-1} back (a_k = 0), or kept to bound the drift
            x_fwd, x_back = maps(p, x, k, need_back=coeffs[k] != 0)
            x_next = x_fwd if coeffs[k] == 0 else _solvers.bdia_combine(x_prev, x_fwd, x_back, coeffs[k])
            x_prev, x = x, x_next
            p.check(x, k)
        ctx.run, ctx.stored, ctx.params = run, stored, tensors[run.num_conditioning:]  # params: the network's own
        ctx.save_for_backward(x_start, x_start_inner, x, x_prev, *conditioning)
        return x, x_prev

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_end, grad_inner):
        run, stored = ctx.run, ctx.stored
        x_start, x_start_inner, x_end, x_inner, *conditioning = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        # Conditioning enters the recomputed steps as fresh leaves, so the vector-Jacobian products stop at them;
        # parameters are the network's own tensors (their grads are returned, never accumulated here).
        conditioning = [t.detach().requires_grad_(bool(w) and t.is_floating_point())
                        for t, w in zip(conditioning, wanted)]
        params = list(ctx.params)
        targets = [t for t, w in zip(conditioning + params, wanted) if w]
        totals = [None] * len(targets)
        coeffs, maps = run.coeffs, run.maps
        p = run.problem(x_end, conditioning)

        def vjp(outputs, x, grad):
            """``J(outputs)(x)^T grad`` and the same product for every wanted input (accumulated in totals)."""
            grads = torch.autograd.grad(outputs, [x, *targets], grad, allow_unused=True)
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    totals[i] = g if totals[i] is None else totals[i] + g
            return grads[0] if grads[0] is not None else torch.zeros_like(x)

        # (x, x_next) = (x_k, x_{k+1}); g_next = dL/dx_{k+1} complete, g = dL/dx_k from the steps after k only.
        x_next, x = x_end.detach(), x_inner.detach()
        g_next, g = grad_end, grad_inner
        errors = {}
        for k in _solvers._progress(range(p.num_steps - 1, 0, -1), run.progress, f"backprop {run.solver}"):
            a = coeffs[k]
            if k in stored:  # the pair step k started from, as sampled: measure the drift, then continue exactly
                exact_prev, exact = stored[k]
                if k < p.num_steps - 1 and k not in errors:  # (x_k is known exactly when step k + 1 kept it)
                    errors[k] = _relative_error(x, exact)
                x = exact
            with torch.enable_grad():
                x_k = x.detach().requires_grad_(True)
                x_fwd, x_back = maps(p, x_k, k, need_back=a != 0)
                g = g + vjp(x_fwd if a == 0 else x_fwd - a * x_back, x_k, g_next)
            x_k = x_k.detach()
            if k in stored:
                x_prev = exact_prev
                if a != 0:
                    recovered = _solvers.bdia_uncombine(x_next, x_fwd.detach(), x_back.detach(), a)
                    errors[k - 1] = _relative_error(recovered, x_prev)
            else:
                x_prev = _solvers.bdia_uncombine(x_next, x_fwd.detach(), x_back.detach(), a)
                p.check(x_prev, k, action="reversible backprop step")
            g_prev = a * g_next if a != 0 else torch.zeros_like(g_next)
            x_next, x, g_next, g = x_k, x_prev, g, g_prev
        # Now x = x_0 (recovered), x_next = x_1, g_next = dL/dx_1 complete, g = dL/dx_0 from steps >= 1.
        errors.setdefault(0, _relative_error(x, x_start))
        if x_start_inner is None:  # the first, plain base step x_1 = F_0(x_0), at the x_0 we were given
            with torch.enable_grad():
                x_0 = x_start.detach().requires_grad_(True)
                g = g + vjp(maps(p, x_0, 0, need_back=False)[0], x_0, g_next)
            grad_start, grad_start_inner = g, None
        else:
            if p.num_steps > 2:
                errors.setdefault(1, _relative_error(x_next, x_start_inner))
            grad_start, grad_start_inner = g, g_next
        _report(run, errors)
        grads = iter(totals)
        tensor_grads = [next(grads) if w else None for w in wanted]
        return (None, grad_start, grad_start_inner, *tensor_grads)


def _report(run: _Run, errors: dict) -> None:
    worst = max(errors.values()) if errors else 0.0
    if worst > UNSTABLE_ROUNDTRIP_ERROR:
        warnings.warn(
            f"reversible backprop through {run.solver}: a state recovered by the exact inverse differs from the one "
            f"sampled by {worst:.1e} (relative, max-norm), so the gradients are inaccurate by about as much. Use "
            f"gamma closer to 1, float64 states, store_every=..., or backprop='checkpoint'.",
            ReversibleGradientWarning,
            stacklevel=2,
        )
    if run.on_backward is not None:
        run.on_backward({"recovery_error": worst, "recovery_errors": dict(sorted(errors.items())),
                         "predicted_error": run.predicted})


# --------------------------------------------------------------------------------------------------
# Per-step checkpointing (the memory baseline).


def _checkpointed(denoiser, x_init, sigmas, maps, coeffs, class_labels, cond, progress, solver):
    start = x_init[0] if isinstance(x_init, tuple) else x_init
    p = _solvers._Problem(denoiser, sigmas, start, class_labels, cond)

    def step(x_prev, x, k):
        x_fwd, x_back = maps(p, x, k, need_back=coeffs[k] != 0)
        return x_fwd if coeffs[k] == 0 else _solvers.bdia_combine(x_prev, x_fwd, x_back, coeffs[k])

    if isinstance(x_init, tuple):
        x_prev, x = x_init
    else:
        x_prev, x = start, checkpoint(lambda x0: maps(p, x0, 0, need_back=False)[0], start, use_reentrant=False)
    for k in _solvers._progress(range(1, p.num_steps), progress, solver):
        x_prev, x = x, checkpoint(step, x_prev, x, k, use_reentrant=False)
        p.check(x, k)
    return StatePair(x, x_prev)


# --------------------------------------------------------------------------------------------------
# The entry point.


def _default_params(denoiser) -> list[torch.Tensor]:
    if not isinstance(denoiser, nn.Module):
        return []
    return [param for param in denoiser.parameters() if param.requires_grad]


def sample_with_grad(
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
    backprop: str = "reversible",
    params: Sequence[torch.Tensor] | None = None,
    store_every: int | None = None,
    on_backward: Callable[[dict], None] | None = None,
    **solver_kwargs,
):
    """:func:`bdia.sample` with autograd: the same states, and ``loss(result).backward()`` gives gradients with
    respect to ``x_init`` (a tensor or the pair from :func:`bdia.invert`), the tensors in ``class_labels`` and
    ``cond`` (e.g. one-hot labels, text embeddings) and the network's parameters.

    Arguments as :func:`bdia.sample`, and:

    * ``backprop``: ``"reversible"`` (default; BDIA solvers: O(1) stored states, the backward pass recovers
      them with the exact inverse), ``"checkpoint"`` (per-step :func:`torch.utils.checkpoint.checkpoint`: O(N)
      stored states) or ``"autograd"`` (plain autograd: O(N) activations). See the module notes.
    * ``params``: the tensors besides ``x_init`` and the conditioning that ``"reversible"`` differentiates the
      run with respect to; default: the parameters of ``denoiser`` (an ``nn.Module``) that require grad. A
      denoiser that is not a module but uses tensors requiring grad must name them here, or they get no gradient
      (``"checkpoint"`` and ``"autograd"`` find them by themselves). ``params=()`` skips the weight gradients
      (noise optimisation: faster).
    * ``store_every``: ``"reversible"`` keeps the pair ``(x_{k-1}, x_k)`` every ``store_every`` steps (and always
      where ``gamma_k = 0``, which cannot be inverted); the walk back continues from it exactly, which bounds
      the drift of the recovered states at the cost of ``2 N / store_every`` stored states.
    * ``on_backward``: called after each backward pass of ``"reversible"`` with ``{"recovery_error": the largest
      relative (max-norm) error of a recovered state against the state it recovers where that one is known
      (the given start, kept states), "recovery_errors": per state index, "predicted_error": the round-off
      model's prediction}``.

    Warns (:class:`ReversibleGradientWarning`) when (gamma, N, dtype) predicts recovered states off by more than
    :data:`bdia.gammas.UNSTABLE_ROUNDTRIP_ERROR`, and again after the backward pass when the measured error is.
    Networks in training mode with dropout are refused by ``"reversible"`` (recomputed steps would draw other
    masks). ``edm`` with ``s_churn > 0`` is stochastic: ``"autograd"`` only.
    """
    if backprop not in BACKPROP:
        raise ValueError(f"backprop must be one of {', '.join(BACKPROP)}, got {backprop!r}")
    if store_every is not None and (isinstance(store_every, bool) or not isinstance(store_every, int)
                                    or store_every < 1):
        raise ValueError(f"store_every must be a positive integer or None, got {store_every!r}")
    sigmas = as_sigmas(sigmas)
    check_solver_options(solver, gamma, solver_kwargs, sigmas)
    bdia_solver = solver in _solvers.INVERTIBLE_SOLVERS
    if backprop == "reversible" and not bdia_solver:
        raise ValueError(f"backprop='reversible' needs a BDIA solver ({', '.join(_solvers.INVERTIBLE_SOLVERS)}); "
                         f"{solver!r} has no inverse (use backprop='checkpoint', or bdia_{solver})")
    if return_pair and not bdia_solver:
        raise ValueError(f"return_pair needs a BDIA solver ({', '.join(_solvers.INVERTIBLE_SOLVERS)}), not {solver!r}")
    x_init = _solvers._cast(x_init, dtype)
    if isinstance(x_init, tuple) and not bdia_solver:
        raise TypeError(f"{solver!r} starts from a single tensor; a state pair is BDIA state (use its x_end)")
    if not bdia_solver and backprop == "checkpoint" and any(solver_kwargs.get(k, 0) for k in ("s_churn",)):
        raise ValueError("edm with s_churn > 0 draws noise in every step; backprop='checkpoint' would draw it again "
                         "(use backprop='autograd')")
    gamma = _solvers.DEFAULT_GAMMA[solver] if bdia_solver and gamma is None else gamma

    if backprop == "autograd":
        with torch.enable_grad():
            common = dict(class_labels=class_labels, cond=cond, progress=progress)
            if bdia_solver:
                fn = _solvers.bdia_ddim if solver == "bdia_ddim" else _solvers.bdia_edm
                pair = fn(denoiser, x_init, sigmas, gamma=gamma, **common, **solver_kwargs)
                return pair if return_pair else pair.x_end
            fn = _solvers.ddim if solver == "ddim" else _solvers.edm
            return fn(denoiser, x_init, sigmas, **common, **solver_kwargs)

    maps, scale_fn = _maps_and_scale(solver, solver_kwargs)
    coordinates = _solvers.coordinates_of(denoiser)  # a flow model's factors are those written in its x_t
    gammas = gamma_schedule(gamma, sigmas, solver, scale_fn, coordinates) if bdia_solver else [0.0] * (len(sigmas) - 1)
    scale_fn = _solvers.scale_in(scale_fn, coordinates)
    levels = sigmas.tolist()
    coeffs = [0.0] + [gammas[k] * scale_fn(levels, k) for k in range(1, len(levels) - 1)]

    if backprop == "checkpoint":
        with torch.enable_grad():
            pair = _checkpointed(denoiser, x_init, sigmas, maps, coeffs, class_labels, cond, progress, solver)
        return pair if return_pair else pair.x_end

    _check_deterministic(denoiser)
    start = x_init[0] if isinstance(x_init, tuple) else x_init
    predicted = predicted_recovery_error(gammas, start.dtype, store_every)
    if predicted > UNSTABLE_ROUNDTRIP_ERROR:
        warnings.warn(
            f"reversible backprop through {solver} with gamma={gamma!r}, N={len(levels) - 1}, dtype={start.dtype}: "
            f"the recovered states are predicted to be off by ~{predicted:.1e} (relative), and the gradients as much. "
            f"Use gamma closer to 1, float64 states, store_every=..., or backprop='checkpoint'.",
            ReversibleGradientWarning,
            stacklevel=2,
        )
    conditioning, rebuild = _split_conditioning(class_labels, cond)
    tensors = [*conditioning, *(_default_params(denoiser) if params is None else list(params))]
    run = _Run(denoiser, sigmas, solver, maps, coeffs, rebuild, len(conditioning), store_every, progress, predicted,
               on_backward)
    inner = x_init[1] if isinstance(x_init, tuple) else None
    x_end, x_inner = _ReversibleBDIA.apply(run, start, inner, *tensors)
    return StatePair(x_end, x_inner) if return_pair else x_end
