"""Gradients through the sampler (bdia.reversible): reversible backprop and per-step checkpointing against plain
autograd through the unrolled solver functions, gradcheck, O(1) stored states, drift warnings, refusals.

Tolerance: in float64 the recovered states carry round-off amplified by about prod(1/gamma) (< 200 for
gamma >= 0.9, N <= 50, i.e. ~1e-13 relative); the gradients inherit that times the network's Lipschitz
constant over the run, far below the 1e-8 relative (max-norm) the issue asks for, which the tests assert.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref

import pytest
import torch
from torch import nn

import bdia
from bdia.reversible import ReversibleGradientWarning, predicted_recovery_error, sample_with_grad
from nets import TinyPrecondNet

F64 = torch.float64
TOL = 1e-8  # relative, max-norm (see the module notes)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class ShiftedMixture(nn.Module):
    """A Gaussian mixture moved by a learnable ``offset`` (a parameter) and a conditioning tensor ``shift``
    (per row): ``D(x) = GMM(x - offset - shift) + offset + shift``, the mixture's exact denoiser for the moved
    data. Non-linear in x, offset and shift."""

    def __init__(self, seed=0, channels=2, size=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(4, channels, size, size, generator=g, dtype=F64)
        self.gmm = bdia.GaussianMixtureDenoiser(means, [0.15, 0.3, 0.5, 0.25], weights=[0.1, 0.2, 0.3, 0.4])
        self.offset = nn.Parameter(0.3 * torch.randn(channels, size, size, generator=g, dtype=F64))
        self.sigma_min, self.sigma_max = 0.0, math.inf

    def round_sigma(self, sigma):
        return sigma

    def forward(self, x, sigma, class_labels=None, shift=None):
        move = self.offset if shift is None else self.offset + shift
        return self.gmm(x - move, sigma) + move


class Float64EDM(nn.Module):
    """EDMPrecond's formulas in float64 around a float64 copy of an EDM network's inner U-Net (EDM's
    preconditioners always run the network in float32, which is not smooth at float64 round-off)."""

    def __init__(self, net):
        super().__init__()
        self.model = copy.deepcopy(net.model).double().eval().requires_grad_(True)
        self.sigma_data, self.sigma_min, self.sigma_max = float(net.sigma_data), 0.0, math.inf

    def round_sigma(self, sigma):
        return sigma

    def forward(self, x, sigma, class_labels=None, **cond):
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels=class_labels)


def _digits64():
    from bdia.models import digits_network

    return Float64EDM(digits_network())


def _reference(denoiser, x_init, sigmas, solver, gamma, cond=None, class_labels=None, **kwargs):
    """Plain autograd through the solver functions of bdia.solvers (they do not disable autograd)."""
    fn = {"bdia_ddim": bdia.bdia_ddim, "bdia_edm": bdia.bdia_edm, "ddim": bdia.ddim, "edm": bdia.edm}[solver]
    if solver in ("ddim", "edm"):
        return fn(denoiser, x_init, sigmas, cond=cond, class_labels=class_labels, **kwargs)
    return fn(denoiser, x_init, sigmas, gamma=gamma, cond=cond, class_labels=class_labels, **kwargs)


def _grads(den, noise, shift, weights, sigmas, solver, gamma, backprop, **kwargs):
    """Gradients of ``sum(weights * x_N)`` w.r.t. (noise, shift, offset) by ``backprop`` (None: the reference)."""
    den.zero_grad(set_to_none=True)
    x = (noise * sigmas[0]).requires_grad_(True)
    shift = shift.clone().requires_grad_(True)
    if backprop is None:
        out = _reference(den, x, sigmas, solver, gamma, cond={"shift": shift}, **kwargs)
        out = out.x_end if isinstance(out, tuple) else out
    else:
        out = sample_with_grad(den, x, sigmas, solver=solver, gamma=gamma, cond={"shift": shift},
                               backprop=backprop, **kwargs)
    (weights * out).sum().backward()
    return out.detach(), (x.grad, shift.grad, den.offset.grad)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    den = ShiftedMixture(seed)
    noise = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    shift = 0.2 * torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    weights = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    return den, noise, shift, weights


FORMULATIONS = [("bdia_ddim", {})] + [
    ("bdia_edm", dict(backward=b, space=s)) for b in bdia.solvers.BACKWARD_MAPS for s in bdia.solvers.SPACES
]


# --------------------------------------------------------------------------------------------------
# Gradients equal plain autograd (float64).


@pytest.mark.parametrize("solver,options", FORMULATIONS)
def test_reversible_gradients_equal_autograd_for_every_formulation(solver, options, one_thread):
    den, noise, shift, weights = _problem()
    sigmas = bdia.karras_sigmas(8)
    ref_out, ref = _grads(den, noise, shift, weights, sigmas, solver, 0.95, None, **options)
    for backprop in ("reversible", "checkpoint"):
        out, got = _grads(den, noise, shift, weights, sigmas, solver, 0.95, backprop, **options)
        assert torch.equal(out, ref_out)  # the same states as the solver function, bit for bit
        for g, r in zip(got, ref):
            assert rel(g, r) <= TOL, (backprop, rel(g, r))


@pytest.mark.parametrize("num_steps,gamma", [(5, 0.9), (18, 1.0), (50, 0.95)])
def test_reversible_gradients_over_steps_and_gamma(num_steps, gamma, one_thread):
    den, noise, shift, weights = _problem(1)
    for solver in ("bdia_ddim", "bdia_edm"):
        sigmas = bdia.karras_sigmas(num_steps)
        _, ref = _grads(den, noise, shift, weights, sigmas, solver, gamma, None)
        _, got = _grads(den, noise, shift, weights, sigmas, solver, gamma, "reversible")
        for g, r in zip(got, ref):
            assert rel(g, r) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [5, 10, 20, 35, 50])
@pytest.mark.parametrize("gamma", [0.9, 0.95, 1.0])
def test_reversible_gradients_full_sweep(num_steps, gamma, one_thread):
    den, noise, shift, weights = _problem(2)
    for solver, options in FORMULATIONS:
        sigmas = bdia.karras_sigmas(num_steps)
        _, ref = _grads(den, noise, shift, weights, sigmas, solver, gamma, None, **options)
        _, got = _grads(den, noise, shift, weights, sigmas, solver, gamma, "reversible", **options)
        for g, r in zip(got, ref):
            assert rel(g, r) <= TOL


@pytest.mark.parametrize("gamma", ["obelm", "lte", "zeros"])
def test_gamma_schedules_and_steps_with_gamma_zero(gamma, one_thread):
    """Named schedules, and a per-step list with zeros: steps that cannot be inverted keep their state."""
    den, noise, shift, weights = _problem(3)
    sigmas = bdia.karras_sigmas(10)
    solver = "bdia_ddim" if gamma == "obelm" else "bdia_edm"
    if gamma == "zeros":
        gamma = [0.95, 0.0, 0.9, 1.0, 0.0, 0.0, 0.97, 0.93, 0.0]
    _, ref = _grads(den, noise, shift, weights, sigmas, solver, gamma, None)
    _, got = _grads(den, noise, shift, weights, sigmas, solver, gamma, "reversible")
    for g, r in zip(got, ref):
        assert rel(g, r) <= TOL


def test_vp_grid_and_state_pair_start_and_both_outputs(one_thread):
    """Start from the pair bdia.invert returns (both tensors get gradients), a VP grid that does not end at 0,
    and a loss on both returned states."""
    den, noise, shift, weights = _problem(4)
    sigmas = bdia.vp_sigmas(bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012), 12, "leading", 1, False)
    start = bdia.sample(den, noise * sigmas[0], sigmas, solver="bdia_ddim", gamma=0.95, return_pair=True,
                        cond={"shift": shift})
    start = bdia.invert(den, start, sigmas, solver="bdia_ddim", gamma=0.95, cond={"shift": shift})
    results = []
    for backprop in (None, "reversible", "checkpoint"):
        x0, x1 = (t.clone().requires_grad_(True) for t in start)
        if backprop is None:
            pair = bdia.bdia_ddim(den, (x0, x1), sigmas, gamma=0.95, cond={"shift": shift})
        else:
            pair = sample_with_grad(den, (x0, x1), sigmas, solver="bdia_ddim", gamma=0.95, cond={"shift": shift},
                                    return_pair=True, backprop=backprop)
        (weights * pair.x_end + (weights**2) * pair.x_inner).sum().backward()
        results.append((x0.grad, x1.grad))
    for got in results[1:]:
        for g, r in zip(got, results[0]):
            assert rel(g, r) <= TOL


def test_digits_network_gradients_wrt_noise_and_weights(one_thread):
    """The embedded digits network (float64 copy): gradients w.r.t. the noise and all 317k weights."""
    den = _digits64()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 16, 16, generator=g, dtype=F64)
    weights = torch.randn(2, 1, 16, 16, generator=g, dtype=F64)
    for solver, num_steps, gamma in (("bdia_edm", 5, 0.9), ("bdia_ddim", 12, 1.0)):
        sigmas = bdia.karras_sigmas(num_steps)
        grads = []
        for backprop in (None, "reversible"):
            den.zero_grad(set_to_none=True)
            x = (noise * sigmas[0]).requires_grad_(True)
            if backprop is None:
                out = _reference(den, x, sigmas, solver, gamma).x_end
            else:
                out = sample_with_grad(den, x, sigmas, solver=solver, gamma=gamma, backprop=backprop)
            (weights * out).sum().backward()
            grads.append([x.grad] + [p.grad for p in den.parameters()])
        assert all(p is not None for p in grads[1])
        for got, ref in zip(grads[1], grads[0]):
            if ref.abs().max() > 0:
                assert rel(got, ref) <= TOL
            else:
                assert got.abs().max() == 0


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [5, 20, 50])
def test_digits_network_sweep(num_steps, one_thread):
    den = _digits64()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 1, 16, 16, generator=g, dtype=F64)
    weights = torch.randn(1, 1, 16, 16, generator=g, dtype=F64)
    for solver in ("bdia_ddim", "bdia_edm"):
        for gamma in (0.9, 1.0):
            sigmas = bdia.karras_sigmas(num_steps)
            grads = []
            for backprop in (None, "reversible"):
                den.zero_grad(set_to_none=True)
                x = (noise * sigmas[0]).requires_grad_(True)
                out = (_reference(den, x, sigmas, solver, gamma).x_end if backprop is None else
                       sample_with_grad(den, x, sigmas, solver=solver, gamma=gamma, backprop=backprop))
                (weights * out).sum().backward()
                grads.append(torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in den.parameters()]))
            assert rel(grads[1], grads[0]) <= TOL


def test_class_label_conditioning_on_a_network(one_thread):
    """Gradients w.r.t. (soft) class labels and the weights of a conditional network (float64)."""
    net = TinyPrecondNet(channels=2, hidden=8, label_dim=3, seed=1, dtype=F64)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 4, 4, generator=g, dtype=F64)
    labels0 = torch.softmax(torch.randn(2, 3, generator=g, dtype=F64), dim=1)
    weights = torch.randn(2, 2, 4, 4, generator=g, dtype=F64)
    sigmas = bdia.karras_sigmas(10)
    grads = []
    for backprop in (None, "reversible", "checkpoint"):
        net.zero_grad(set_to_none=True)
        x = (noise * sigmas[0]).requires_grad_(True)
        labels = labels0.clone().requires_grad_(True)
        if backprop is None:
            out = bdia.bdia_edm(net, x, sigmas, gamma=0.95, class_labels=labels).x_end
        else:
            out = sample_with_grad(net, x, sigmas, solver="bdia_edm", gamma=0.95, class_labels=labels,
                                   backprop=backprop)
        (weights * out).sum().backward()
        grads.append([x.grad, labels.grad] + [p.grad for p in net.parameters()])
    for got in grads[1:]:
        for g_, r in zip(got, grads[0]):
            assert rel(g_, r) <= TOL


def test_gradcheck_small_case(one_thread):
    """torch.autograd.gradcheck (finite differences) w.r.t. noise, conditioning and a parameter."""
    den = ShiftedMixture(5, channels=1, size=2)
    sigmas = bdia.karras_sigmas(4)
    g = torch.Generator().manual_seed(5)
    noise = (torch.randn(2, 1, 2, 2, generator=g, dtype=F64) * sigmas[0]).requires_grad_(True)
    shift = (0.2 * torch.randn(2, 1, 2, 2, generator=g, dtype=F64)).requires_grad_(True)

    def run(x, s, offset):
        assert offset is den.offset  # gradcheck perturbs the parameter in place
        return sample_with_grad(den, x, sigmas, solver="bdia_edm", gamma=0.9, cond={"shift": s}, return_pair=True)

    assert torch.autograd.gradcheck(run, (noise, shift, den.offset), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_base_solvers_checkpoint_equals_autograd(one_thread):
    den, noise, shift, weights = _problem(6)
    sigmas = bdia.karras_sigmas(6)
    for solver in ("ddim", "edm"):
        _, ref = _grads(den, noise, shift, weights, sigmas, solver, None, None)
        _, got = _grads(den, noise, shift, weights, sigmas, solver, None, "checkpoint")
        for g, r in zip(got, ref):
            assert rel(g, r) <= TOL


# --------------------------------------------------------------------------------------------------
# Memory: what the forward pass keeps for the backward pass.


def _saved_bytes(num_steps, backprop):
    """Bytes of the tensors autograd saves for the backward pass (each storage counted once), by
    torch.autograd.graph.saved_tensors_hooks."""
    den, noise, shift, _ = _problem(7)
    sigmas = bdia.karras_sigmas(num_steps)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = (noise * sigmas[0]).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sample_with_grad(den, x, sigmas, solver="bdia_edm", gamma=0.95, cond={"shift": shift},
                               backprop=backprop)
    out.sum().backward()
    return sum(storages.values())


def test_reversible_forward_keeps_constant_memory(one_thread):
    state = 3 * 2 * 3 * 3 * 8
    reversible = [_saved_bytes(n, "reversible") for n in (5, 40)]
    assert reversible[0] == reversible[1] <= 5 * state  # start, final pair, shift (the params are not copied)
    checkpointed = [_saved_bytes(n, "checkpoint") for n in (5, 40)]
    autograd = [_saved_bytes(n, "autograd") for n in (5, 40)]
    assert checkpointed[1] > 5 * checkpointed[0] and autograd[1] > 5 * autograd[0]  # O(N)
    assert autograd[1] > checkpointed[1] > 10 * reversible[1]


def test_no_gradient_graph_is_kept_beyond_one_step(one_thread):
    """During the backward pass only one step's graph is alive: when the network is recomputed for a step, the
    outputs of the earlier recomputations (and with them their graphs) are gone."""
    den, noise, shift, _ = _problem(8)
    sigmas = bdia.karras_sigmas(30)
    outputs, alive = [], []

    def probe(x, sigma, class_labels=None, **cond):
        out = den(x, sigma, class_labels, **cond)
        if out.requires_grad:
            alive.append(sum(ref() is not None for ref in outputs))
            outputs.append(weakref.ref(out))
        return out

    x = (noise * sigmas[0]).requires_grad_(True)
    out = sample_with_grad(probe, x, sigmas, solver="bdia_ddim", gamma=0.95, cond={"shift": shift},
                           params=[den.offset])
    out.sum().backward()
    assert len(alive) == 30 and max(alive) == 0


# --------------------------------------------------------------------------------------------------
# Drift: predicted, measured, warned about.


def test_float64_near_one_is_silent_and_reports_a_tiny_error(one_thread):
    den, noise, shift, weights = _problem(9)
    sigmas = bdia.karras_sigmas(30)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = (noise * sigmas[0]).requires_grad_(True)
        out = sample_with_grad(den, x, sigmas, solver="bdia_edm", gamma=0.95, cond={"shift": shift},
                               on_backward=reports.append)
        (weights * out).sum().backward()
    assert len(reports) == 1 and reports[0]["recovery_error"] < 1e-12
    assert reports[0]["predicted_error"] == pytest.approx(predicted_recovery_error([0.0] + [0.95] * 29, F64))


def test_small_gamma_in_float32_warns_before_and_after_and_store_every_bounds_it(one_thread):
    den, noise, shift, weights = _problem(10)
    sigmas = bdia.karras_sigmas(40)
    x = (noise.float() * sigmas[0]).requires_grad_(True)
    reports = []
    with pytest.warns(ReversibleGradientWarning) as caught:
        out = sample_with_grad(den, x, sigmas, solver="bdia_ddim", gamma=0.3, dtype=torch.float32,
                               cond={"shift": shift.float()}, on_backward=reports.append)
        (weights.float() * out).sum().backward()
    texts = [str(w.message) for w in caught]
    assert any("predicted" in t for t in texts) and any("recovered by the exact inverse" in t for t in texts)
    assert reports[0]["recovery_error"] > 1e-4
    # Keeping every 4th pair bounds the drift: 4 steps at gamma 0.3 amplify float32 round-off by ~1e2, no warning.
    reports.clear()
    x = (noise.float() * sigmas[0]).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sample_with_grad(den, x, sigmas, solver="bdia_ddim", gamma=0.3, dtype=torch.float32,
                               cond={"shift": shift.float()}, on_backward=reports.append, store_every=4)
        (weights.float() * out).sum().backward()
    assert reports[0]["recovery_error"] < 1e-4 and reports[0]["predicted_error"] < 1e-4


# --------------------------------------------------------------------------------------------------
# Refusals and options.


def test_refusals(one_thread):
    den, noise, _, _ = _problem(11)
    sigmas = bdia.karras_sigmas(5)
    x = noise * sigmas[0]
    with pytest.raises(ValueError, match="needs a BDIA solver"):
        sample_with_grad(den, x, sigmas, solver="ddim")
    with pytest.raises(ValueError, match="backprop must be one of"):
        sample_with_grad(den, x, sigmas, backprop="adjoint")
    with pytest.raises(ValueError, match="store_every"):
        sample_with_grad(den, x, sigmas, store_every=0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        sample_with_grad(den, x, sigmas, gamma=1.5)
    with pytest.raises(ValueError, match="s_churn"):
        sample_with_grad(den, x, sigmas, solver="edm", backprop="checkpoint", s_churn=10.0)
    net = TinyPrecondNet(channels=2, hidden=4, dtype=F64)
    net.drop = nn.Dropout(0.1)
    net.train()
    with pytest.raises(ValueError, match="training mode with dropout"):
        sample_with_grad(net, torch.randn(1, 2, 4, 4, dtype=F64), sigmas)


def test_params_default_and_explicit(one_thread):
    """Default: the denoiser's parameters that require grad; params=() leaves them without a gradient."""
    den, noise, shift, weights = _problem(12)
    sigmas = bdia.karras_sigmas(5)
    x = (noise * sigmas[0]).requires_grad_(True)
    sample_with_grad(den, x, sigmas, cond={"shift": shift}).sum().backward()
    assert den.offset.grad is not None and x.grad is not None
    den.zero_grad(set_to_none=True)
    x = (noise * sigmas[0]).requires_grad_(True)
    sample_with_grad(den, x, sigmas, cond={"shift": shift}, params=()).sum().backward()
    assert den.offset.grad is None and x.grad is not None


def test_values_equal_bdia_sample_and_float32_noise_gets_a_float32_gradient(one_thread):
    den, noise, shift, _ = _problem(13)
    sigmas = bdia.karras_sigmas(7)
    expected = bdia.sample(den, noise * sigmas[0], sigmas, solver="bdia_edm", cond={"shift": shift})
    x = (noise.float() * float(sigmas[0])).requires_grad_(True)
    out = sample_with_grad(den, x.double(), sigmas, solver="bdia_edm", cond={"shift": shift})
    got = sample_with_grad(den, noise * sigmas[0], sigmas, solver="bdia_edm", cond={"shift": shift})
    assert torch.equal(got, expected) and out.dtype == F64
    out.sum().backward()
    assert x.grad.dtype == torch.float32
