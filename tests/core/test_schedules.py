import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import bdia
from bdia.schedules import as_sigmas, sigmas_from_alphas_cumprod, vp_timesteps


def test_karras_grid_matches_edm_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    sigmas = bdia.karras_sigmas(n, smin, smax, rho)
    expected = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    assert sigmas.dtype == torch.float64 and sigmas.shape == (n + 1,)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-14, atol=0)
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-14) and sigmas[-2].item() == pytest.approx(0.002, rel=1e-12)


def test_karras_grid_applies_round_sigma_before_terminal_zero():
    sigmas = bdia.karras_sigmas(5, round_sigma=lambda s: s.round())
    assert torch.equal(sigmas[:-1], sigmas[:-1].round()) and sigmas[-1] == 0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule):
    kwargs = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    sched = DDIMScheduler(beta_schedule=schedule, **kwargs)
    ours = bdia.make_alphas_cumprod(schedule, **(kwargs or dict(beta_start=0.0001, beta_end=0.02)), dtype=torch.float32)
    torch.testing.assert_close(ours, sched.alphas_cumprod, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 30, 50, 333])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_equal_diffusers(spacing, num_steps, steps_offset):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    sched.set_timesteps(num_steps)
    ours = vp_timesteps(num_steps, 1000, spacing, steps_offset)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_vp_sigmas_sd_configuration(set_alpha_to_one):
    sched = DDIMScheduler(**bdia.SD_SCHEDULE | dict(set_alpha_to_one=set_alpha_to_one))
    sched.set_timesteps(20)
    abar = sched.alphas_cumprod.to(torch.float64)
    sigmas = bdia.vp_sigmas(abar, 20, "leading", steps_offset=1, set_alpha_to_one=set_alpha_to_one)
    assert sigmas.shape == (21,) and sigmas.dtype == torch.float64
    expected = ((1 - abar[sched.timesteps]) / abar[sched.timesteps]).sqrt()
    torch.testing.assert_close(sigmas[:-1], expected, rtol=0, atol=0)
    final_abar = sched.final_alpha_cumprod.to(torch.float64)
    torch.testing.assert_close(sigmas[-1], ((1 - final_abar) / final_abar).sqrt(), rtol=0, atol=0)
    if not set_alpha_to_one:
        assert sigmas[-1].item() == pytest.approx(0.0292, abs=1e-4)


def test_sigma_to_timestep_exact_on_grid_and_interpolated_between():
    abar = bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012)
    table = sigmas_from_alphas_cumprod(abar)
    t = torch.tensor([0, 1, 17, 500, 981, 999])
    labels = bdia.sigma_to_timestep(table[t], table)
    assert torch.equal(labels, t.to(torch.float64))
    mid = (table[100].log() * 0.25 + table[101].log() * 0.75).exp()
    assert bdia.sigma_to_timestep(mid, table).item() == pytest.approx(100.75, abs=1e-9)
    with pytest.raises(ValueError, match="outside the model's trained range"):
        bdia.sigma_to_timestep(torch.tensor(table[-1].item() * 1.01), table)
    with pytest.raises(ValueError, match="outside"):
        bdia.sigma_to_timestep(torch.tensor(0.0), table)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1.0, 0.5], "at least 2 steps"),
        ([1.0, 2.0, 0.0], "strictly descending"),
        ([1.0, 1.0, 0.0], "strictly descending"),
        ([2.0, float("nan"), 0.0], "NaN"),
        ([2.0, 0.0, -1.0], "strictly descending|positive"),
        ([2.0, 1.0, 0.0, 0.0], "strictly descending"),
    ],
)
def test_as_sigmas_rejects_bad_grids(bad, match):
    with pytest.raises(ValueError, match=match):
        as_sigmas(bad)


def test_vp_alpha_relation():
    sigma = torch.tensor([0.0, 0.5, 80.0], dtype=torch.float64)
    alpha = bdia.vp_alpha(sigma)
    torch.testing.assert_close(alpha**2 * (1 + sigma**2), torch.ones(3, dtype=torch.float64))
    assert bdia.vp_alpha(0.5) == pytest.approx(1 / math.sqrt(1.25))
