"""Solver maths in float64: identities, independent transcriptions, exact round trips, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

import bdia
from bdia.schedules import vp_alpha
from nets import TinyPrecondNet

F64 = torch.float64


def gmm_problem(seed=0, channels=2, size=3):
    g = torch.Generator().manual_seed(seed)
    den = bdia.GaussianMixtureDenoiser(
        torch.randn(4, channels, size, size, generator=g), [0.15, 0.3, 0.5, 0.25], weights=[0.1, 0.2, 0.3, 0.4]
    )
    noise = torch.randn(5, channels, size, size, generator=g, dtype=F64)
    return den, noise


def vp_grid(num_steps):
    return bdia.vp_sigmas(bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012), num_steps, "leading", 1, False)


# --------------------------------------------------------------------------------------------------
# Independent transcriptions (written from the equations, not sharing the solvers' code).


def edm_algorithm(net, x, sigmas, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, randn_like=None):
    """Karras et al. (2022) Algorithm 2 (Algorithm 1 when S_churn = 0), as EDM's generate.py writes it."""
    t_steps = torch.as_tensor(sigmas, dtype=F64)
    num_steps = len(t_steps) - 1
    x_next = x.to(F64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur) if S_churn > 0 else x_cur
        denoised = net(x_hat, t_hat).to(F64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(F64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def bdia_ddim_in_z(den, x_init, sigmas, gamma):
    """The paper's BDIA-DDIM literally on VP latents z = alpha x; returns (x_N, x_{N-1})."""
    sig = [float(s) for s in sigmas]
    alpha = [1 / math.sqrt(1 + s * s) for s in sig]
    sigma_z = [s * a for s, a in zip(sig, alpha)]

    def eps(z, i):
        x = z / alpha[i]
        return (x - den(x, torch.tensor(sig[i], dtype=F64))) / sig[i]

    def ddim_map(z, e, i, j):
        return alpha[j] * (z - sigma_z[i] * e) / alpha[i] + sigma_z[j] * e

    z = [alpha[0] * x_init]
    z.append(ddim_map(z[0], eps(z[0], 0), 0, 1))
    for k in range(1, len(sig) - 1):
        e = eps(z[k], k)
        z.append(gamma * z[k - 1] - gamma * ddim_map(z[k], e, k, k - 1) + ddim_map(z[k], e, k, k + 1))
    return z[-1] / alpha[-1], z[-2] / alpha[-2]


def obelm_in_x(den, x_init, sigmas):
    """O-BELM (Wang et al. 2024) in x-bar = z / alpha, s = sigma coordinates, first step Euler:
    x_{i-1} = (h_i/h_{i+1})^2 x_{i+1} + (1 - (h_i/h_{i+1})^2) x_i - h_i (h_i + h_{i+1}) / h_{i+1} eps_i."""
    sig = [float(s) for s in sigmas]

    def eps(x, k):
        return (x - den(x, torch.tensor(sig[k], dtype=F64))) / sig[k]

    xs = [x_init, x_init + (sig[1] - sig[0]) * eps(x_init, 0)]
    for k in range(1, len(sig) - 1):
        h_i, h_ip1 = sig[k] - sig[k + 1], sig[k - 1] - sig[k]
        r = (h_i / h_ip1) ** 2
        xs.append(r * xs[k - 1] + (1 - r) * xs[k] - h_i * (h_i + h_ip1) / h_ip1 * eps(xs[k], k))
    return xs[-1]


def bdia_edm_reference(den, x_init, sigmas, gamma, backward="euler"):
    """BDIA over EDM's Heun (docs/design.md's BDIA recurrence), written as one plain loop."""
    sig = [float(s) for s in sigmas]

    def d(x, k):
        return (x - den(x, torch.tensor(sig[k], dtype=F64))) / sig[k]

    def heun(x, i, j):
        d_i = d(x, i)
        x_j = x + (sig[j] - sig[i]) * d_i
        return x + (sig[j] - sig[i]) * 0.5 * (d_i + d(x_j, j)) if sig[j] > 0 else x_j

    xs = [x_init, heun(x_init, 0, 1)]
    for k in range(1, len(sig) - 1):
        back = heun(xs[k], k, k - 1) if backward == "heun" else xs[k] + (sig[k - 1] - sig[k]) * d(xs[k], k)
        xs.append(gamma * (xs[k - 1] - back) + heun(xs[k], k, k + 1))
    return xs[-1], xs[-2]


# --------------------------------------------------------------------------------------------------
# gamma = 0 is the base solver, to the last bit.


@pytest.mark.parametrize("family", ["ddim", "edm"])
@pytest.mark.parametrize("gamma", [0.0, "zeros"])
def test_gamma_zero_is_base_solver_bit_for_bit(family, gamma):
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(12)
    gamma = [0.0] * 11 if gamma == "zeros" else gamma
    base = bdia.sample(den, noise * 80, sigmas, solver=family)
    bdia_out = bdia.sample(den, noise * 80, sigmas, solver=f"bdia_{family}", gamma=gamma)
    assert torch.equal(base, bdia_out)


def test_gamma_zero_is_base_solver_on_a_network():
    net = TinyPrecondNet()
    x = torch.randn(3, 2, 5, 5, dtype=F64) * 80
    sigmas = bdia.karras_sigmas(8)
    assert torch.equal(bdia.sample(net, x, sigmas, solver="edm"), bdia.sample(net, x, sigmas, solver="bdia_edm", gamma=0))
    assert torch.equal(bdia.sample(net, x, sigmas, solver="ddim"), bdia.sample(net, x, sigmas, solver="bdia_ddim", gamma=0))


# --------------------------------------------------------------------------------------------------
# Against independent transcriptions.


def test_edm_equals_algorithm_1_on_a_network():
    net = TinyPrecondNet(label_dim=0)
    x = torch.randn(4, 2, 6, 6, dtype=F64) * 80
    sigmas = bdia.karras_sigmas(18)
    torch.testing.assert_close(bdia.sample(net, x, sigmas, solver="edm"), edm_algorithm(net, x, sigmas), rtol=0, atol=0)


def test_edm_churn_equals_algorithm_2_with_the_same_noise_stream():
    net = TinyPrecondNet()
    x = torch.randn(2, 2, 4, 4, dtype=F64) * 80
    sigmas = bdia.karras_sigmas(10)
    churn = dict(S_churn=30.0, S_min=0.01, S_max=1.0, S_noise=1.007)

    def noise_stream():
        g = torch.Generator().manual_seed(123)
        return lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)

    ours = bdia.edm(net, x, sigmas, s_churn=30.0, s_min=0.01, s_max=1.0, s_noise=1.007, randn_like=noise_stream())
    ref = edm_algorithm(net, x, sigmas, randn_like=noise_stream(), **churn)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.equal(ours, bdia.edm(net, x, sigmas))


def test_ddim_is_the_z_space_ddim_update():
    den, noise = gmm_problem()
    sigmas = vp_grid(15)
    x_init = noise / vp_alpha(sigmas[0].item())
    ours = bdia.sample(den, x_init, sigmas, solver="ddim")
    ref, _ = bdia_ddim_in_z(den, x_init, sigmas, gamma=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("grid", ["karras", "vp"])
def test_bdia_ddim_matches_the_papers_z_space_recurrence(gamma, grid):
    den, noise = gmm_problem(1)
    sigmas = bdia.karras_sigmas(10) if grid == "karras" else vp_grid(10)
    x_init = noise * sigmas[0].item()
    pair = bdia.sample(den, x_init, sigmas, solver="bdia_ddim", gamma=gamma, return_pair=True)
    ref = bdia_ddim_in_z(den, x_init, sigmas, gamma)
    for ours, theirs in zip(pair, ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)


def test_bdia_in_x_space_without_the_alpha_factor_differs():
    """The BDIA combination is not coordinate-free: x-space BDIA over Euler is a different sampler."""
    den, noise = gmm_problem(1)
    sigmas = vp_grid(10)
    x_init = noise * sigmas[0].item()
    z_space = bdia.sample(den, x_init, sigmas, solver="bdia_ddim", gamma=0.5)
    # BDIA-EDM's Euler backward map with an Euler forward map would be BDIA in x-space; emulate it with the
    # O-BELM-free constant-gamma x-space loop.
    sig = [float(s) for s in sigmas]
    eps = lambda x, k: (x - den(x, torch.tensor(sig[k], dtype=F64))) / sig[k]  # noqa: E731
    xs = [x_init, x_init + (sig[1] - sig[0]) * eps(x_init, 0)]
    for k in range(1, len(sig) - 1):
        e = eps(xs[k], k)
        xs.append(0.5 * (xs[k - 1] - (xs[k] + (sig[k - 1] - sig[k]) * e)) + xs[k] + (sig[k + 1] - sig[k]) * e)
    assert (z_space - xs[-1]).abs().max() > 1e-3


def test_obelm_schedule_makes_bdia_ddim_the_obelm_sampler():
    den, noise = gmm_problem(2)
    for sigmas in (bdia.karras_sigmas(12), vp_grid(12)):
        x_init = noise * sigmas[0].item()
        ours = bdia.sample(den, x_init, sigmas, solver="bdia_ddim", gamma="obelm")
        torch.testing.assert_close(ours, obelm_in_x(den, x_init, sigmas), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backward", ["euler", "heun"])
def test_bdia_edm_matches_plain_loop(backward):
    den, noise = gmm_problem(3)
    sigmas = bdia.karras_sigmas(9)
    pair = bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", gamma=0.7, backward=backward, space="x", return_pair=True)
    for ours, ref in zip(pair, bdia_edm_reference(den, noise * 80, sigmas, 0.7, backward)):
        torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)


def test_per_step_gamma_list_is_applied_in_sampling_order():
    den, noise = gmm_problem(4)
    sigmas = bdia.karras_sigmas(6)
    # A schedule that is 0 for every step but the last equals the base solver up to the last step.
    gammas = [0.0, 0.0, 0.0, 0.0, 0.8]
    pair = bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", gamma=gammas, return_pair=True)
    base_pair = bdia.sample(den, noise * 80, sigmas[:-1], solver="edm")
    assert torch.equal(pair.x_inner, base_pair)
    assert not torch.equal(pair.x_end, bdia.sample(den, noise * 80, sigmas, solver="edm"))


# --------------------------------------------------------------------------------------------------
# Exact round trips.


def roundtrip(den, x_init, sigmas, solver, gamma, **kw):
    pair = bdia.sample(den, x_init, sigmas, solver=solver, gamma=gamma, return_pair=True, **kw)
    start = bdia.invert(den, pair, sigmas, solver=solver, gamma=gamma, **kw)
    again = bdia.sample(den, start, sigmas, solver=solver, gamma=gamma, return_pair=True, **kw)
    noise_err = (start.x_end - x_init).abs().max().item()
    regen_err = max((a - b).abs().max().item() for a, b in zip(again, pair))
    return noise_err, regen_err


@pytest.mark.parametrize("solver", ["bdia_ddim", "bdia_edm"])
@pytest.mark.parametrize("gamma", [1.0, 0.94])
@pytest.mark.parametrize("model", ["gmm", "network"])
def test_roundtrip_is_exact_at_50_steps(solver, gamma, model):
    if model == "gmm":
        den, noise = gmm_problem(5)
    else:
        den, noise = TinyPrecondNet(seed=5, dtype=F64), torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas = bdia.karras_sigmas(50)
    noise_err, regen_err = roundtrip(den, noise * 80, sigmas, solver, gamma)
    assert noise_err <= 1e-10 and regen_err <= 1e-10, (noise_err, regen_err)


@pytest.mark.parametrize("solver,kw", [("bdia_edm", dict(backward="heun")), ("bdia_ddim", {}),
                                       ("bdia_edm", dict(space="x", backward="euler"))])
def test_roundtrip_exact_on_vp_grid_obelm_and_heun_backward(solver, kw):
    den, noise = gmm_problem(6)
    sigmas = vp_grid(30)
    gamma = 0.97 if kw.get("backward") == "heun" else "obelm"
    noise_err, regen_err = roundtrip(den, noise * sigmas[0].item(), sigmas, solver, gamma, **kw)
    assert noise_err <= 1e-10 and regen_err <= 1e-10, (noise_err, regen_err)


@pytest.mark.parametrize("solver", ["bdia_ddim", "bdia_edm"])
def test_inverting_a_single_clean_state_then_regenerating_is_exact(solver):
    den, noise = gmm_problem(7)
    sigmas = bdia.karras_sigmas(25)
    clean = den.sample_data(5, generator=torch.Generator().manual_seed(0))
    start = bdia.invert(den, clean, sigmas, solver=solver, gamma=0.96)
    assert isinstance(start, bdia.StatePair) and start.x_end.shape == clean.shape
    regen = bdia.sample(den, start, sigmas, solver=solver, gamma=0.96, return_pair=True)
    torch.testing.assert_close(regen.x_end, clean.to(F64), rtol=0, atol=1e-10)
    # the inverted noise is plausible noise at sigma_max: about unit variance after dividing by sigma_max
    assert 0.5 < (start.x_end / sigmas[0]).std().item() < 1.5


def test_float32_network_recovers_the_pair_exactly_but_regeneration_sees_its_rounding():
    """Characterisation. Inversion evaluates the network at the very states sampling produced, so a float32
    network still gives back the starting pair to float64 round-off. Regenerating from that pair feeds the
    network inputs that differ by ~1e-14 relative; now and then one float32 cast rounds the other way, and
    that ~1e-7 relative change is carried undamped at gamma = 1. Exact round trips want a float64 network."""
    net = TinyPrecondNet(seed=5)
    noise = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    noise_err, regen_err = roundtrip(net, noise * 80, bdia.karras_sigmas(50), "bdia_edm", 1.0)
    assert noise_err <= 1e-10
    assert regen_err <= 1e-5


def test_roundtrip_in_float32_at_gamma_094_is_small_but_not_exact():
    net = TinyPrecondNet(seed=8)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float32) * 80
    sigmas = bdia.karras_sigmas(20)
    noise_err, regen_err = roundtrip(net, x, sigmas, "bdia_edm", 0.94, dtype=torch.float32)
    assert regen_err < 1e-3 and noise_err / 80 < 1e-4


@pytest.mark.parametrize("solver", ["bdia_ddim", "bdia_edm"])
def test_roundtrip_error_grows_like_inverse_gamma_power(solver):
    """Characterisation: round-trip error in float64 over N = 20 steps vs gamma.

    Inversion amplifies round-off by about 1/gamma per BDIA step (N - 1 of them), so the error of the
    recovered noise between two gammas scales like (gamma_1 / gamma_2)^(N - 1). Measured here on the
    Gaussian mixture: gamma 1 -> ~1e-15 relative, 0.5 -> 1e-14 (EDM) / 5e-11 (DDIM), 0.2 -> 4e-7 / 1e-3.
    The eps * prod(1/gamma) estimate that `invert` warns with stays an upper bound.
    """
    den, noise = gmm_problem(9)
    sigmas = bdia.karras_sigmas(20)
    measured = {}
    for gamma in (1.0, 0.5, 0.3, 0.2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            err, _ = roundtrip(den, noise * 80, sigmas, solver, gamma)
        measured[gamma] = err / 80
    assert measured[1.0] < 1e-14, measured
    for g1, g2 in ((0.5, 0.3), (0.3, 0.2)):
        growth = measured[g2] / measured[g1]
        expected = (g1 / g2) ** 19
        assert expected / 10 < growth < expected * 10, (g1, g2, growth, expected)
    for gamma in (0.5, 0.3, 0.2):
        predicted = bdia.solvers.predicted_roundtrip_error(bdia.gamma_schedule(gamma, sigmas), F64)
        assert measured[gamma] < 10 * predicted, (gamma, measured[gamma], predicted)


@pytest.mark.parametrize(
    "gamma, steps, dtype, warns",
    [(0.94, 50, F64, False), (1.0, 200, torch.float32, False), (0.1, 20, F64, True), (0.5, 20, torch.float32, True)],
)
def test_invert_warns_when_roundtrip_is_known_unstable(gamma, steps, dtype, warns):
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(steps)
    pair = bdia.StatePair(noise.to(dtype), noise.to(dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bdia.invert(den, pair, sigmas, solver="bdia_ddim", gamma=gamma, dtype=None)
    unstable = [w for w in caught if issubclass(w.category, RuntimeWarning) and "round-trip" in str(w.message)]
    assert bool(unstable) == warns


# --------------------------------------------------------------------------------------------------
# Cost: NFE measured.


@pytest.mark.parametrize(
    "solver, kw, expected",
    [
        ("ddim", {}, lambda n: n),
        ("bdia_ddim", dict(gamma=0.5), lambda n: n),
        ("edm", {}, lambda n: 2 * n - 1),
        ("bdia_edm", dict(gamma=0.5), lambda n: 2 * n - 1),
        ("bdia_edm", dict(gamma=0.5, backward="heun"), lambda n: 2 * n - 1 + (n - 1)),
    ],
)
def test_nfe_is_measured(solver, kw, expected):
    den, noise = gmm_problem()
    counted = bdia.CountingDenoiser(den)
    bdia.sample(counted, noise * 80, bdia.karras_sigmas(18), solver=solver, **kw)
    assert counted.nfe == expected(18)


def test_inversion_nfe():
    den, noise = gmm_problem()
    counted = bdia.CountingDenoiser(den)
    sigmas = bdia.karras_sigmas(10)
    bdia.invert(counted, (noise, noise), sigmas, solver="bdia_ddim", gamma=1.0)
    assert counted.nfe == 9
    counted.reset()
    bdia.invert(counted, noise, sigmas, solver="bdia_ddim", gamma=1.0)
    assert counted.nfe == 10
    counted.reset()
    bdia.invert(counted, (noise, noise), sigmas, solver="bdia_edm", gamma=1.0)
    assert counted.nfe == 2 * 9 - 1  # Heun at each middle state; the last forward map lands on 0 (Euler)


# --------------------------------------------------------------------------------------------------
# Accuracy: every solver converges to the probability-flow ODE solution.


@pytest.mark.parametrize(
    "solver, gamma, kw, order",
    [
        ("ddim", None, {}, 1),
        ("bdia_ddim", 0.5, {}, 1),
        ("bdia_ddim", 1.0, {}, 2),  # gamma = 1 cancels Euler's leading local error on a smooth grid
        ("bdia_ddim", "obelm", {}, 2),
        ("edm", None, {}, 2),
        ("bdia_edm", 0.5, dict(space="x", backward="euler"), 1),  # the Euler backward map costs Heun's second order
        ("bdia_edm", 0.5, dict(backward="heun"), 2),
        ("bdia_edm", 0.5, {}, 2),  # the default: VP coordinates, second-order `exp` backward map
    ],
)
def test_convergence_order_against_the_closed_form(solver, gamma, kw, order):
    """For one Gaussian N(mu, s^2 I) the ODE solution is closed form, x(sigma) - mu proportional to
    sqrt(s^2 + sigma^2). Error falls with N for every solver, at the order each is expected to have
    (measured between 128 and 256 Karras steps)."""
    mu, s = 0.3, 0.5
    den = bdia.GaussianMixtureDenoiser(torch.full((1, 8), mu, dtype=F64), [s])
    x_init = 80 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = mu + (x_init - mu) * s / math.sqrt(s**2 + 80.0**2)
    errors = []
    for n in (32, 128, 256):
        out = bdia.sample(den, x_init, bdia.karras_sigmas(n), solver=solver, gamma=gamma, **kw)
        errors.append((out - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors
    measured_order = math.log2(errors[1] / errors[2])
    assert abs(measured_order - order) < 0.3, (measured_order, errors)


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors at the entry point.


def test_unknown_solver_lists_valid_ones():
    den, noise = gmm_problem()
    with pytest.raises(ValueError, match="valid solvers: ddim, bdia_ddim, edm, bdia_edm"):
        bdia.sample(den, noise, bdia.karras_sigmas(4), solver="dpm")
    with pytest.raises(ValueError, match="no exact inverse; invertible solvers: bdia_ddim, bdia_edm"):
        bdia.invert(den, noise, bdia.karras_sigmas(4), solver="ddim")


@pytest.mark.parametrize("gamma", [1.5, -0.1, float("nan"), [0.5, 2.0, 0.5]])
def test_gamma_out_of_range(gamma):
    den, noise = gmm_problem()
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        bdia.sample(den, noise, bdia.karras_sigmas(4), solver="bdia_edm", gamma=gamma)


def test_gamma_errors():
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(4)
    with pytest.raises(ValueError, match="one value per BDIA step: 3 for 4 steps"):
        bdia.sample(den, noise, sigmas, solver="bdia_edm", gamma=[0.5, 0.5])
    with pytest.raises(ValueError, match="unknown gamma schedule"):
        bdia.sample(den, noise, sigmas, solver="bdia_edm", gamma="cosine")
    with pytest.raises(ValueError, match="gamma = 0 is the base solver, which is not invertible"):
        bdia.invert(den, noise, sigmas, solver="bdia_edm", gamma=0.0)
    with pytest.raises(ValueError, match="BDIA solvers only"):
        bdia.sample(den, noise, sigmas, solver="ddim", gamma=0.5)
    with pytest.raises(ValueError, match="backward must be one of"):
        bdia.sample(den, noise, sigmas, solver="bdia_edm", backward="rk4")


@pytest.mark.parametrize("sigmas, match", [([80.0, 0.0], "at least 2 steps"), ([1.0, 5.0, 0.0], "strictly descending")])
def test_bad_grids(sigmas, match):
    den, noise = gmm_problem()
    with pytest.raises(ValueError, match=match):
        bdia.sample(den, noise, sigmas, solver="bdia_edm")
    with pytest.raises(ValueError, match=match):
        bdia.invert(den, noise, sigmas, solver="bdia_edm")


@pytest.mark.parametrize("solver", ["ddim", "bdia_ddim", "edm", "bdia_edm"])
def test_non_finite_state_is_reported_with_its_step(solver):
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(8)
    bad_level = sigmas[3].item()

    def broken(x, sigma, class_labels=None):
        out = den(x, sigma)
        return out * float("nan") if abs(float(sigma) - bad_level) < 1e-12 else out

    broken.sigma_min, broken.sigma_max, broken.round_sigma = 0.0, math.inf, lambda s: s
    with pytest.raises(FloatingPointError, match=r"after step [23] \(sigma"):
        bdia.sample(broken, noise * 80, sigmas, solver=solver)


# --------------------------------------------------------------------------------------------------
# bdia_edm's design space (issue 13): coordinates, backward maps, gamma schedules.

SPACES = [("x", 1.0), ("vp", 1.0), ("vp", 0.5)]
BACKWARDS = ["euler", "heun", "taylor", "exp"]


def bdia_edm_in_z(den, x_init, sigmas, gamma, backward, space, sigma_data):
    """BDIA over Heun written literally on z = alpha x (alpha = 1 / sqrt(sigma_data^2 + sigma^2); alpha = 1 for
    x-space), the backward maps from their equations: Taylor in sigma with the slope change Heun measured, or
    the u = 1/sigma expansion of x / sigma = integral of D du with D linear in u. Returns (x_N, x_{N-1})."""
    sig = [float(s) for s in sigmas]
    alpha = [1.0 if space == "x" else 1 / math.sqrt(sigma_data**2 + s * s) for s in sig]
    gammas = bdia.gamma_schedule(gamma, sigmas) if not isinstance(gamma, (int, float)) else [gamma] * len(sig)

    def D(x, k):
        return den(x, torch.tensor(sig[k], dtype=F64))

    def heun_parts(x, i, j):
        d_i = (x - D(x, i)) / sig[i]
        pred = x + (sig[j] - sig[i]) * d_i
        if sig[j] == 0:
            return pred, d_i, None, None
        denoised_j = D(pred, j)
        d_j = (pred - denoised_j) / sig[j]
        return x + (sig[j] - sig[i]) * 0.5 * (d_i + d_j), d_i, d_j, denoised_j

    def backward_map(x, k, d_k, d_pred, denoised_pred):
        h_b = sig[k - 1] - sig[k]
        if backward == "heun":
            return heun_parts(x, k, k - 1)[0]
        if backward == "euler" or d_pred is None:
            return x + h_b * d_k
        if backward == "taylor":
            return x + h_b * d_k + h_b**2 / 2 * (d_pred - d_k) / (sig[k + 1] - sig[k])
        u = [1 / s for s in sig[k - 1 : k + 2]]  # u_{k-1}, u_k, u_{k+1}
        denoised_k = x - sig[k] * d_k
        du_b, du_f = u[0] - u[1], u[2] - u[1]
        return sig[k - 1] * (x / sig[k] + denoised_k * du_b + du_b**2 / 2 * (denoised_pred - denoised_k) / du_f)

    z = [alpha[0] * x_init, alpha[1] * heun_parts(x_init, 0, 1)[0]]
    for k in range(1, len(sig) - 1):
        x_k = z[k] / alpha[k]
        fwd, d_k, d_pred, denoised_pred = heun_parts(x_k, k, k + 1)
        g = gammas[k]
        z.append(g * (z[k - 1] - alpha[k - 1] * backward_map(x_k, k, d_k, d_pred, denoised_pred)) + alpha[k + 1] * fwd)
    return z[-1] / alpha[-1], z[-2] / alpha[-2]


@pytest.mark.parametrize("space, sigma_data", SPACES)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_every_bdia_edm_option_at_gamma_zero_is_edm_bit_for_bit(space, sigma_data, backward):
    den, noise = gmm_problem(11)
    sigmas = bdia.karras_sigmas(9)
    edm = bdia.sample(den, noise * 80, sigmas, solver="edm")
    for gamma in (0.0, [0.0] * 8):
        out = bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", gamma=gamma, backward=backward, space=space,
                          sigma_data=sigma_data)
        assert torch.equal(out, edm)


@pytest.mark.parametrize("space, sigma_data", SPACES)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_bdia_edm_options_match_the_z_space_transcription(space, sigma_data, backward):
    den, noise = gmm_problem(12)
    sigmas = bdia.karras_sigmas(9)
    pair = bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", gamma=0.6, backward=backward, space=space,
                       sigma_data=sigma_data, return_pair=True)
    ref = bdia_edm_in_z(den, noise * 80, sigmas, 0.6, backward, space, sigma_data)
    for ours, theirs in zip(pair, ref):
        # Same maths, different operation order: float64 round-off (~1e-16 relative) on states of size <= 80,
        # amplified by at most the step count.
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("space, sigma_data", SPACES)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_every_bdia_edm_option_round_trips_exactly(space, sigma_data, backward, gamma):
    """Inversion evaluates every map at the middle state, as sampling did: the round trip reproduces the pair
    up to float64 round-off amplified by about prod 1/gamma (1.0^-17 .. 0.9^-17 = 6)."""
    den, noise = gmm_problem(13)
    kw = dict(backward=backward, space=space, sigma_data=sigma_data)
    noise_err, regen_err = roundtrip(den, noise * 80, bdia.karras_sigmas(18), "bdia_edm", gamma, **kw)
    assert noise_err <= 1e-10 and regen_err <= 1e-10, (noise_err, regen_err)


def test_lte_schedule_round_trips_and_equals_its_formula():
    den, noise = gmm_problem(14)
    sigmas = bdia.karras_sigmas(12)
    s = sigmas.tolist()
    from bdia.solvers import _vp_scale

    gammas = bdia.gamma_schedule("lte", sigmas, "bdia_edm", _vp_scale(0.5))
    for k in range(1, 12):
        r = (s[k] - s[k + 1]) / (s[k - 1] - s[k])
        c = math.sqrt((0.25 + s[k + 1] ** 2) / (0.25 + s[k - 1] ** 2))
        assert gammas[k] == pytest.approx(min(1.0, r**3 / c), rel=1e-14)
    assert bdia.gamma_schedule("lte", sigmas) == [0.0] + [min(1.0, ((s[k] - s[k + 1]) / (s[k - 1] - s[k])) ** 3) for k in range(1, 12)]
    # gamma shrinks to ~1e-3 near the data on 12 Karras steps: inversion amplifies round-off by prod 1/gamma,
    # so the round trip is checked on a grid where the schedule stays >= 0.1 (a fine grid).
    fine = bdia.karras_sigmas(60)
    kw = dict(backward="exp", space="vp", sigma_data=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        predicted = bdia.solvers.predicted_roundtrip_error(bdia.gamma_schedule("lte", fine, "bdia_edm", _vp_scale(0.5)), F64)
        noise_err, regen_err = roundtrip(den, noise * 80, fine, "bdia_edm", "lte", **kw)
    assert noise_err / 80 <= 10 * predicted and regen_err <= 10 * predicted * 80, (noise_err, regen_err, predicted)
    with pytest.raises(ValueError, match="bdia_edm only"):
        bdia.sample(den, noise, sigmas, solver="bdia_ddim", gamma="lte")


@pytest.mark.parametrize("backward", ["taylor", "exp"])
def test_second_order_backward_maps_cost_no_extra_nfe(backward):
    den, noise = gmm_problem()
    counted = bdia.CountingDenoiser(den)
    bdia.sample(counted, noise * 80, bdia.karras_sigmas(18), solver="bdia_edm", gamma=0.5, backward=backward, space="vp")
    assert counted.nfe == 2 * 18 - 1


@pytest.mark.parametrize(
    "backward, space, gamma, order",
    [("euler", "vp", 0.5, 1), ("taylor", "x", 0.5, 2), ("exp", "x", 0.5, 2), ("exp", "vp", 0.5, 2), ("exp", "vp", 1.0, 2)],
)
def test_bdia_edm_convergence_order_by_backward_map(backward, space, gamma, order):
    """The backward map sets the order: Euler's O(h^2) local error makes BDIA-EDM first order in any
    coordinates; the two second-order maps keep Heun's second order (closed-form Gaussian, 128 vs 256 steps)."""
    mu, s = 0.3, 0.5
    den = bdia.GaussianMixtureDenoiser(torch.full((1, 8), mu, dtype=F64), [s])
    x_init = 80 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = mu + (x_init - mu) * s / math.sqrt(s**2 + 80.0**2)
    errors = [
        (bdia.sample(den, x_init, bdia.karras_sigmas(n), solver="bdia_edm", gamma=gamma, backward=backward, space=space)
         - exact).abs().max().item()
        for n in (128, 256)
    ]
    assert abs(math.log2(errors[0] / errors[1]) - order) < 0.3, errors


def test_bad_space_and_sigma_data():
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(4)
    with pytest.raises(ValueError, match="space must be one of"):
        bdia.sample(den, noise, sigmas, solver="bdia_edm", space="z")
    with pytest.raises(ValueError, match="sigma_data must be a positive number"):
        bdia.invert(den, noise, sigmas, solver="bdia_edm", space="vp", sigma_data=0)


def test_bdia_edm_defaults_agree_between_code_config_sample_and_invert():
    """One default formulation (chosen by `make study`): the function signatures, `bdia.sample` / `bdia.invert`
    with no options, and configs/sample/solver/bdia_edm.yaml all say the same."""
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    defaults = bdia.solvers.BDIA_EDM_DEFAULTS
    for fn in (bdia.bdia_edm, bdia.invert_bdia_edm):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults
    config = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "sample" / "solver" / "bdia_edm.yaml")
    assert {k: config[k] for k in defaults} == defaults
    den, noise = gmm_problem(15)
    sigmas = bdia.karras_sigmas(8)
    pair = bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", return_pair=True)
    assert torch.equal(pair.x_end, bdia.sample(den, noise * 80, sigmas, solver="bdia_edm", **defaults))
    start = bdia.invert(den, pair, sigmas, solver="bdia_edm")
    assert torch.equal(start.x_end, bdia.invert(den, pair, sigmas, solver="bdia_edm", **defaults).x_end)
