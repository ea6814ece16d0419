"""BDIA-DDIM's gamma schedules derived in DPM-Solver++'s variables (``obelm_ei``, ``obelm_mix``; bdia.gammas):
exactness where their derivation says so, their formula, order, round trips, and where they are refused."""

import math

import pytest
import torch

import bdia
from bdia.gammas import ddim_scale, ei_obelm_weight

F64 = torch.float64


class LinearInLambda(torch.nn.Module):
    """A 'denoiser' whose output does not depend on x and is linear in lambda = -log sigma: D = a + b lambda.
    Then y = x / sigma obeys dy/dlambda = e^lambda D, so y(lambda) = y_0 + F(lambda) - F(lambda_0) with
    F(lambda) = e^lambda (a + b (lambda - 1))."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sigma, class_labels=None):
        return (self.a + self.b * (-torch.log(torch.as_tensor(sigma, dtype=F64)))).expand_as(x)

    def exact(self, x0, sigma0, sigma):
        def F(lam):
            return math.exp(lam) * (self.a + self.b * (lam - 1))

        return sigma * (x0 / sigma0 + F(-math.log(sigma)) - F(-math.log(sigma0)))


def test_obelm_ei_is_exact_for_a_denoiser_linear_in_lambda():
    g = torch.Generator().manual_seed(0)
    den = LinearInLambda(torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64))
    sigmas = bdia.karras_sigmas(12)[:-1]  # every level > 0 (lambda finite)
    x0 = 80 * torch.randn(6, generator=g, dtype=F64)
    x1 = den.exact(x0, 80.0, sigmas[1].item())  # an exact pair: BDIA's plain first step is not exact
    out = bdia.sample(den, (x0, x1), sigmas, solver="bdia_ddim", gamma="obelm_ei")
    exact = den.exact(x0, 80.0, sigmas[-1].item())
    scale = exact.abs().max()
    assert (out - exact).abs().max() <= 1e-11 * scale
    # the sigma-expansion (O-BELM) is second order too, but not exact here: the assertion above can fail
    other = bdia.sample(den, (x0, x1), sigmas, solver="bdia_ddim", gamma="obelm")
    assert (other - exact).abs().max() > 1e-4 * scale


def test_schedules_follow_their_formulas():
    sigmas = bdia.karras_sigmas(10)
    levels = sigmas.tolist()
    obelm = bdia.gamma_schedule("obelm", sigmas, "bdia_ddim")
    ei = bdia.gamma_schedule("obelm_ei", sigmas, "bdia_ddim")
    mix = bdia.gamma_schedule("obelm_mix", sigmas, "bdia_ddim")
    for k in range(1, 10):
        c = ddim_scale(levels, k)
        r2 = ((levels[k] - levels[k + 1]) / (levels[k - 1] - levels[k])) ** 2
        if levels[k + 1] > 0:
            h_f, h_b = math.log(levels[k] / levels[k + 1]), math.log(levels[k - 1] / levels[k])
            phi = (math.exp(h_f) * (h_f - 1) + 1) / (math.exp(-h_b) * (-h_b - 1) + 1)
            assert ei_obelm_weight(levels, k) == pytest.approx(phi * levels[k + 1] / levels[k - 1], rel=1e-12)
        else:
            assert ei_obelm_weight(levels, k) == pytest.approx(r2, rel=1e-12)  # onto sigma = 0: O-BELM's
        w = levels[k] ** 2 / (1 + levels[k] ** 2)
        assert obelm[k] * c == pytest.approx(r2, rel=1e-12)
        assert ei[k] * c == pytest.approx(ei_obelm_weight(levels, k), rel=1e-12)
        assert mix[k] * c == pytest.approx(r2 ** (1 - w) * ei_obelm_weight(levels, k) ** w, rel=1e-12)
    assert obelm[0] == ei[0] == mix[0] == 0.0


@pytest.mark.parametrize("gamma", ["obelm_ei", "obelm_mix"])
def test_second_order_and_exact_round_trip(gamma):
    mu, s = 0.3, 0.5
    den = bdia.GaussianMixtureDenoiser(torch.full((1, 8), mu, dtype=F64), [s])
    x_init = 80 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = mu + (x_init - mu) * math.sqrt(s**2 + 0.002**2) / math.sqrt(s**2 + 80.0**2)
    errors = [(bdia.sample(den, x_init, bdia.karras_sigmas(n)[:-1], solver="bdia_ddim", gamma=gamma) - exact)
              .abs().max().item() for n in (64, 128)]
    assert abs(math.log2(errors[0] / errors[1]) - 2) < 0.3, errors
    g = torch.Generator().manual_seed(1)
    den = bdia.GaussianMixtureDenoiser(torch.randn(4, 2, 3, 3, generator=g, dtype=F64), [0.15, 0.3, 0.5, 0.25])
    noise = 80 * torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    for n in (5, 25):
        sigmas = bdia.karras_sigmas(n)
        pair = bdia.sample(den, noise, sigmas, solver="bdia_ddim", gamma=gamma, return_pair=True)
        start = bdia.invert(den, pair, sigmas, solver="bdia_ddim", gamma=gamma)
        # inversion divides by gamma_k; the schedule's smallest values (~0.01 at N = 5) cost ~1e2 of round-off
        assert (start.x_end - noise).abs().max() <= 1e-10 * noise.abs().max()


def test_refused_outside_bdia_ddim_on_edm_coordinates():
    sigmas = bdia.karras_sigmas(6)
    for gamma in ("obelm_ei", "obelm_mix"):
        with pytest.raises(ValueError, match="BDIA-DDIM on EDM's x"):
            bdia.gamma_schedule(gamma, sigmas, "bdia_edm")
        with pytest.raises(ValueError, match="BDIA-DDIM on EDM's x"):
            bdia.gamma_schedule(gamma, sigmas, "bdia_ddim", coordinates="flow")
