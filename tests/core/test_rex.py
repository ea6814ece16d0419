"""Rex (bdia.rex): exact round trips in float64, a transcription in VP coordinates, convergence orders against a
fine reference, NFE, bad options. (Checked once against the reference implementation itself, zblasingame/Rex-solver:
``benchmarks/rex_reference_check.py``; it is not vendored here.)"""

import math

import pytest
import torch

import bdia
from bdia.rex import TABLEAUS, rex_nfe
from nets import TinyPrecondNet

F64 = torch.float64


def gmm_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    den = bdia.GaussianMixtureDenoiser(torch.randn(4, 2, 3, 3, generator=g, dtype=F64), [0.15, 0.3, 0.5, 0.25],
                                       weights=[0.1, 0.2, 0.3, 0.4])
    return den, torch.randn(5, 2, 3, 3, generator=g, dtype=F64)


def vp_grid(num_steps):
    """Stable Diffusion's DDIM grid: ends at sigma_0 ~ 0.029, not 0."""
    return bdia.vp_sigmas(bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012), num_steps, "leading", 1, False)


def roundtrip(den, x_init, sigmas, **kw):
    pair = bdia.sample(den, x_init, sigmas, solver="rex", return_pair=True, **kw)
    start = bdia.invert(den, pair, sigmas, solver="rex", **kw)
    again = bdia.sample(den, start, sigmas, solver="rex", return_pair=True, **kw)
    noise_err = (start.x_end - x_init).abs().max().item() / x_init.abs().max().item()
    regen_err = max((a - b).abs().max().item() for a, b in zip(again, pair))
    return noise_err, regen_err, pair, start


#: Relative error of the recovered noise in float64. Inversion runs the coupling backwards, where its companion
#: mode grows by about (sigma_k / sigma_{k+1})^2 per step below the data's scale (large log-steps of the Karras grid):
#: ~1e5 from sigma_min = 0.002 up, so float64 round-off (1e-16) ends near 1e-11 (BDIA-DDIM at gamma 1: ~1e-15).
ROUNDTRIP_RELATIVE = 1e-10


@pytest.mark.parametrize("tableau", list(TABLEAUS))
@pytest.mark.parametrize("zeta", [0.999, 1.0, 0.9])
def test_roundtrip_is_exact_in_float64(tableau, zeta):
    den, noise = gmm_problem(1)
    noise_err, regen_err, pair, start = roundtrip(den, noise * 80, bdia.karras_sigmas(20), tableau=tableau, zeta=zeta)
    # zeta < 1 divides by zeta once per step on the way back: 0.9^-19 ~ 7 more
    assert noise_err <= ROUNDTRIP_RELATIVE / zeta**20 and regen_err <= 1e-12, (noise_err, regen_err)
    # the recovered companion state at sigma_max is the noise too (both halves start there)
    assert (start.x_inner - noise * 80).abs().max().item() <= ROUNDTRIP_RELATIVE / zeta**20 * 80 * noise.abs().max()


@pytest.mark.parametrize("tableau", ["euler", "midpoint", "rk4"])
def test_roundtrip_exact_on_a_network_and_on_a_vp_grid(tableau):
    net = TinyPrecondNet(seed=3, dtype=F64)
    noise = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    noise_err, regen_err, *_ = roundtrip(net, noise * 80, bdia.karras_sigmas(30), tableau=tableau)
    assert noise_err <= ROUNDTRIP_RELATIVE and regen_err <= 1e-12, (noise_err, regen_err)
    den, noise = gmm_problem(2)
    sigmas = vp_grid(25)
    noise_err, regen_err, *_ = roundtrip(den, noise * sigmas[0].item(), sigmas, tableau=tableau)
    assert noise_err <= ROUNDTRIP_RELATIVE and regen_err <= 1e-12, (noise_err, regen_err)


def test_inverting_a_single_clean_state_then_regenerating_is_exact():
    den, _ = gmm_problem(3)
    sigmas = bdia.karras_sigmas(25)
    clean = den.sample_data(5, generator=torch.Generator().manual_seed(0))
    counted = bdia.CountingDenoiser(den)
    start = bdia.invert(counted, clean, sigmas, solver="rex", tableau="midpoint")
    assert counted.nfe == rex_nfe(25, "midpoint") + 1  # + the approximate first step
    regen = bdia.sample(den, start, sigmas, solver="rex", tableau="midpoint", return_pair=True)
    torch.testing.assert_close(regen.x_end, clean.to(F64), rtol=0, atol=1e-10)
    assert 0.5 < (start.x_end / sigmas[0]).std().item() < 1.5  # plausible noise at sigma_max


def rex_in_vp_coordinates(eps_model, z, sigmas, tableau, zeta):
    """Rex as the paper writes it for a VP model, transcribed independently of bdia.rex: latents
    ``z = alpha x``, data prediction ``x0 = (z - sigma_z eps) / alpha``, weight ``w = sigma_z``, time variable
    ``varsigma = alpha / sigma_z``, Lawson RK in ``(varsigma, z / sigma_z)``, the McCallum-Foster coupling; the grid's
    levels as given (every level > 0). Returns ``(z, z_hat)`` at the last level."""
    def alpha_of(sigma):
        return 1 / math.sqrt(1 + sigma**2)

    def weight(sigma):
        return sigma * alpha_of(sigma)

    def psi(zz, s_from, s_to):
        vs0, vs1 = alpha_of(s_from) / weight(s_from), alpha_of(s_to) / weight(s_to)
        h = vs1 - vs0
        tab = TABLEAUS[tableau]
        ks = []
        for c, row in zip(tab.c, tab.a):
            vs = vs0 + c * h
            sigma = 1 / vs  # varsigma = 1 / sigma for the VP schedule
            stage = zz / weight(s_from) + h * sum((a * k for a, k in zip(row, ks)), torch.zeros_like(zz))
            z_stage = weight(sigma) * stage
            ks.append((z_stage - weight(sigma) * eps_model(z_stage, sigma)) / alpha_of(sigma))
        return h * sum(b * k for b, k in zip(tab.b, ks))

    levels = sigmas.tolist()
    z_hat = z
    for s_from, s_to in zip(levels[:-1], levels[1:]):
        ratio = weight(s_to) / weight(s_from)
        z = ratio * (zeta * z + (1 - zeta) * z_hat) + weight(s_to) * psi(z_hat, s_from, s_to)
        z_hat = ratio * z_hat - weight(s_to) * psi(z, s_to, s_from)
    return z, z_hat


@pytest.mark.parametrize("tableau", ["euler", "midpoint", "ssprk3", "rk4"])
def test_rex_equals_its_vp_coordinate_transcription(tableau):
    den, noise = gmm_problem(4)

    def eps_model(z, sigma):  # the same mixture as a VP epsilon model
        x = z * math.sqrt(1 + sigma**2)
        return (x - den(x, torch.tensor(sigma, dtype=F64))) / sigma

    sigmas = vp_grid(12)  # every level > 0: our last step is the half step, so compare x_hat one level inside
    z0 = noise * weight_at(sigmas[0].item())
    z_ref, z_hat_ref = rex_in_vp_coordinates(eps_model, z0, sigmas[:-1], tableau, 0.99)
    pair = bdia.sample(den, z0 / bdia.vp_alpha(sigmas[0]), sigmas, solver="rex", tableau=tableau, zeta=0.99,
                       return_pair=True)
    z_hat = pair.x_inner * bdia.vp_alpha(sigmas[-2])
    assert (z_hat - z_hat_ref).abs().max() <= 1e-12 * z_hat_ref.abs().max()
    # ... and the last half step from (z, z_hat) at sigmas[-2], written here in x = z / alpha
    s_from, s_to = sigmas[-2].item(), sigmas[-1].item()
    x, x_hat = z_ref * math.sqrt(1 + s_from**2), z_hat_ref * math.sqrt(1 + s_from**2)
    eps = (x_hat - den(x_hat, sigmas[-2])) / s_from
    x_end = 0.99 * x + 0.01 * x_hat + (s_to - s_from) * eps
    assert (pair.x_end - x_end).abs().max() <= 1e-12 * x_end.abs().max()


def weight_at(sigma):
    return sigma / math.sqrt(1 + sigma**2)


@pytest.mark.filterwarnings("ignore:sigmas end at")  # a one-step grid ending at high noise, on purpose
def test_the_first_euler_step_is_ddim():
    """Both halves start at the noise, so Rex-Euler's first step is the exponential Euler step: DDIM."""
    den, noise = gmm_problem(5)
    sigmas = bdia.karras_sigmas(6)
    pair = bdia.sample(den, noise * 80, torch.cat([sigmas[:2], sigmas[1:2] / 2]), solver="rex", tableau="euler",
                       return_pair=True)
    x_0 = noise.to(F64) * 80
    x_1 = x_0 + (sigmas[1] - sigmas[0]) * (x_0 - den(x_0, sigmas[0])) / sigmas[0]  # DDIM (Euler in sigma)
    # x_hat_1 / sigma_1 = x_hat_0 / sigma_0 + h D(x_1): the same exponential Euler increment, taken at x_1
    ratio = sigmas[1] / sigmas[0]
    x_hat_expected = ratio * noise * 80 + (1 - ratio) * den(x_1, sigmas[1])
    torch.testing.assert_close(pair.x_inner, x_hat_expected, rtol=1e-13, atol=1e-12)
    # x_1 itself, recovered from the returned half step (zeta = 0.999): it is the DDIM step
    slope = (pair.x_inner - den(pair.x_inner, sigmas[1])) / sigmas[1]
    x_1_rex = (pair.x_end - 0.001 * pair.x_inner - (sigmas[1] / 2 - sigmas[1]) * slope) / 0.999
    torch.testing.assert_close(x_1_rex, x_1, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("tableau, order", [("euler", 2), ("midpoint", 2), ("heun", 2), ("ssprk3", 4), ("rk4", 4)])
def test_convergence_order_at_zeta_1(tableau, order):
    """At zeta = 1 the coupled scheme is symmetric in time, so its order is even: the tableau's order, rounded up
    (Euler and the two-stage tableaus 2, SSPRK3 and RK4 4). Measured on a 3-component mixture against Rex-RK4 with
    2000 steps (its own error ~5e-10), at the companion state on sigma_min, between N = 32 and 64."""
    g = torch.Generator().manual_seed(0)
    den = bdia.GaussianMixtureDenoiser(torch.randn(3, 6, generator=g, dtype=F64), [0.3, 0.5, 0.4])
    x_init = 80 * torch.randn(8, 6, generator=g, dtype=F64)
    ref = bdia.sample(den, x_init, bdia.karras_sigmas(600), solver="rex", tableau="rk4", zeta=1.0,
                      return_pair=True).x_inner
    errors = [(bdia.sample(den, x_init, bdia.karras_sigmas(n), solver="rex", tableau=tableau, zeta=1.0,
                           return_pair=True).x_inner - ref).abs().max().item() for n in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2], errors
    assert abs(math.log2(errors[1] / errors[2]) - order) < 0.35, errors


def test_zeta_below_1_biases_euler_by_one_order():
    """Characterisation: ``(1 - zeta)(x_hat - x)`` enters every step and ``x_hat - x`` is of the step's own error,
    so zeta < 1 costs an order; Rex-Euler at zeta = 0.9 does not converge at all."""
    g = torch.Generator().manual_seed(0)
    den = bdia.GaussianMixtureDenoiser(torch.randn(3, 6, generator=g, dtype=F64), [0.3, 0.5, 0.4])
    x_init = 80 * torch.randn(8, 6, generator=g, dtype=F64)
    ref = bdia.sample(den, x_init, bdia.karras_sigmas(600), solver="rex", tableau="rk4", zeta=1.0,
                      return_pair=True).x_inner
    errors = [(bdia.sample(den, x_init, bdia.karras_sigmas(n), solver="rex", tableau="euler", zeta=0.9,
                           return_pair=True).x_inner - ref).abs().max().item() for n in (32, 128)]
    assert errors[1] > 0.5 * errors[0] > 1e-3, errors


@pytest.mark.parametrize("tableau, stages", [("euler", 1), ("midpoint", 2), ("heun", 2), ("ssprk3", 3), ("rk4", 4)])
def test_nfe(tableau, stages):
    den, noise = gmm_problem(6)
    for n in (2, 7):
        counted = bdia.CountingDenoiser(den)
        pair = bdia.sample(counted, noise * 80, bdia.karras_sigmas(n), solver="rex", tableau=tableau, return_pair=True)
        assert counted.nfe == rex_nfe(n, tableau) == 2 * stages * (n - 1) + 1
        counted.reset()
        bdia.invert(counted, pair, bdia.karras_sigmas(n), solver="rex", tableau=tableau)
        assert counted.nfe == rex_nfe(n, tableau)


def test_float32_inversion_warns_and_is_far_from_exact():
    den, noise = gmm_problem(7)
    sigmas = bdia.karras_sigmas(12)
    pair = bdia.sample(den, noise * 80, sigmas, solver="rex", tableau="euler", return_pair=True, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="float32"):
        start = bdia.invert(den, pair, sigmas, solver="rex", tableau="euler", dtype=torch.float32)
    relative = ((start.x_end.double() - noise * 80).abs().max() / (noise * 80).abs().max()).item()
    assert relative > 1e-6  # characterisation: far above float32's own round-off (1e-7)


def test_bad_options():
    den, noise = gmm_problem()
    sigmas = bdia.karras_sigmas(4)
    with pytest.raises(ValueError, match="tableau"):
        bdia.sample(den, noise, sigmas, solver="rex", tableau="dopri5")
    for zeta in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="zeta"):
            bdia.sample(den, noise, sigmas, solver="rex", zeta=zeta)
    with pytest.raises(ValueError, match="'rex' has no gamma"):
        bdia.sample(den, noise, sigmas, solver="rex", gamma=0.5)
    with pytest.raises(ValueError, match="'rex' has no gamma"):
        bdia.invert(den, noise, sigmas, solver="rex", gamma=0.5)
