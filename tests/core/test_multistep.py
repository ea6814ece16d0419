"""DPM-Solver++(2M), UniPC and iPNDM (bdia.multistep) against independent implementations: diffusers'
multistep schedulers driving the same float64 epsilon network on a VP grid, a transcription of iPNDM, and the
single-Gaussian closed form."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler

import bdia
from bdia import multistep

F64 = torch.float64


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return model.double().eval()


def diffusers_loop(unet, scheduler, latents, num_steps, monkeypatch):
    """diffusers' own sampling loop, in float64 throughout.

    ``set_timesteps`` stores ``sigmas`` as float32 and ``DPMSolverMultistepScheduler.step`` casts the state to
    float32 ("upcast"); for a float64 comparison the table is rebuilt in float64 from the scheduler's own
    ``alphas_cumprod`` at its own timesteps (final level 0, or the first training level for
    ``final_sigmas_type="sigma_min"``), and that one cast keeps float64 while ``step`` runs.
    The network runs outside the patch (its float32 timestep embedding is the same in both loops).
    """
    scheduler.set_timesteps(num_steps)
    abar = scheduler.alphas_cumprod.to(F64)
    table = ((1 - abar) / abar).sqrt()
    final = table[:1] if scheduler.config.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=F64)
    scheduler.sigmas = torch.cat([table[scheduler.timesteps], final])
    z = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(z, t).sample
            with monkeypatch.context() as patch:
                patch.setattr(torch, "float32", F64)
                z = scheduler.step(eps, t, z).prev_sample
    return z, scheduler.sigmas


SCHEDULES = [
    (dict(), 12),  # DDPM's linear betas, "linspace" timesteps (diffusers' defaults)
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
          steps_offset=1), 20),  # Stable Diffusion's settings
    (dict(timestep_spacing="trailing"), 7),
]


def ours(unet, abar, latents, sigmas, solver, **kw):
    """Our solver on the same network through the VP adapter: x = z / alpha, D = x - sigma eps."""
    den = bdia.VPEpsDenoiser(unet, abar, model_dtype=F64)
    counted = bdia.CountingDenoiser(den)
    x = bdia.sample(counted, latents / bdia.vp_alpha(sigmas[0]), sigmas, solver=solver, **kw)
    assert counted.nfe == len(sigmas) - 1
    return x * bdia.vp_alpha(sigmas[-1])  # z at sigma = 0 is x


@pytest.mark.parametrize("config, num_steps", SCHEDULES)
def test_dpmpp_2m_matches_diffusers_multistep_scheduler(unet, config, num_steps, monkeypatch):
    scheduler = DPMSolverMultistepScheduler(**config, solver_order=2, algorithm_type="dpmsolver++",
                                            final_sigmas_type="zero")
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    reference, sigmas = diffusers_loop(unet, scheduler, latents, num_steps, monkeypatch)
    mine = ours(unet, scheduler.alphas_cumprod.to(F64), latents, sigmas, "dpmpp_2m")
    scale = reference.abs().max()
    assert (mine - reference).abs().max() <= 1e-10 * scale, (mine - reference).abs().max() / scale
    assert (reference - latents).abs().max() > 0.1  # the network moved the state: not trivially equal


@pytest.mark.parametrize("config, num_steps", SCHEDULES)
@pytest.mark.parametrize("order, variant", [(2, "bh2"), (3, "bh2"), (2, "bh1"), (1, "bh2")])
def test_unipc_matches_diffusers_multistep_scheduler(unet, config, num_steps, order, variant, monkeypatch):
    # diffusers' bh1 multiplies B(h) = h = -inf by 0 on a step onto sigma = 0 (NaN): compare it on a grid that
    # ends at the first training level instead (ours takes that step first order, finite).
    final = "sigma_min" if variant == "bh1" else "zero"
    scheduler = UniPCMultistepScheduler(**config, solver_order=order, solver_type=variant, predict_x0=True,
                                        final_sigmas_type=final)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    reference, sigmas = diffusers_loop(unet, scheduler, latents, num_steps, monkeypatch)
    mine = ours(unet, scheduler.alphas_cumprod.to(F64), latents, sigmas, "unipc", order=order, variant=variant)
    scale = reference.abs().max()
    assert (mine - reference).abs().max() <= 1e-10 * scale, (mine - reference).abs().max() / scale


def test_unipc_corrector_changes_the_result_and_unip2_is_dpmpp_2m():
    """UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M)'s update: UniPC differs from it only through the corrector."""
    den = bdia.GaussianMixtureDenoiser(torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64), 0.3)
    x = 80 * torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigmas = bdia.karras_sigmas(8)
    a, b = bdia.sample(den, x, sigmas, solver="unipc"), bdia.sample(den, x, sigmas, solver="dpmpp_2m")
    assert (a - b).abs().max() > 1e-4
    # no corrector: UniP-2 alone, transcribed with the loop's own predictor
    loop = multistep._Loop(den, sigmas, x, None, None, False, "unip")
    history, y = [], x
    for k in range(8):
        history = (history + [loop.denoised(y, k)])[-2:]
        y = multistep._unipc_update(loop, y, k, k + 1, history, min(2, 8 - k, k + 1), "bh2")
    torch.testing.assert_close(y, b, rtol=0, atol=1e-12)


def ipndm_transcription(den, x, sigmas, max_order=4):
    """zju-pi/diff-sampler's ipndm_sampler loop (as published), on our grid."""
    buffer = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d_cur = (x - den(x, t_cur)) / t_cur
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x = x + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x = x + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x = x + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer.append(d_cur)
        buffer = buffer[-(max_order - 1):] if max_order > 1 else []
    return x


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_matches_the_published_loop(max_order):
    den = bdia.GaussianMixtureDenoiser(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64),
                                       [0.2, 0.3, 0.4, 0.1])
    x = 80 * torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    sigmas = bdia.karras_sigmas(10)
    expected = ipndm_transcription(den, x, sigmas.to(F64), max_order)
    counted = bdia.CountingDenoiser(den)
    got = bdia.sample(counted, x, sigmas, solver="ipndm", max_order=max_order)
    assert counted.nfe == 10
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver, kw, order", [
    ("dpmpp_2m", {}, 2),
    ("unipc", {}, 3),  # UniP-2 + UniC: the corrector adds one order
    ("unipc", dict(order=3), 4),
    ("ipndm", {}, 2),  # constant-step Adams-Bashforth weights on a non-uniform grid: second order (measured 2.1)
])
def test_convergence_order_against_the_closed_form(solver, kw, order):
    """One Gaussian N(mu, s^2 I): x(sigma) - mu is proportional to sqrt(s^2 + sigma^2). On the Karras grid without
    its final 0 (a last step onto 0 has a fixed size, sigma_min, whatever N: its error would not shrink), against
    the closed form at sigma_min; orders measured between N = 64 and 128."""
    mu, s, sigma_min = 0.3, 0.5, 0.002
    den = bdia.GaussianMixtureDenoiser(torch.full((1, 8), mu, dtype=F64), [s])
    x_init = 80 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = mu + (x_init - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + 80.0**2)
    errors = [(bdia.sample(den, x_init, bdia.karras_sigmas(n, sigma_min)[:-1], solver=solver, **kw) - exact)
              .abs().max().item() for n in (16, 64, 128)]
    assert errors[0] > errors[1] > errors[2], errors
    measured = math.log2(errors[1] / errors[2])
    assert abs(measured - order) < 0.3, (measured, errors)


def test_bad_options():
    den = bdia.GaussianMixtureDenoiser(torch.zeros(1, 2, dtype=F64), 1.0)
    x = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="order"):
        bdia.sample(den, x, bdia.karras_sigmas(4), solver="unipc", order=4)
    with pytest.raises(ValueError, match="variant"):
        bdia.sample(den, x, bdia.karras_sigmas(4), solver="unipc", variant="bh3")
    with pytest.raises(ValueError, match="max_order"):
        bdia.sample(den, x, bdia.karras_sigmas(4), solver="ipndm", max_order=5)
    with pytest.raises(ValueError, match="gamma"):
        bdia.sample(den, x, bdia.karras_sigmas(4), solver="dpmpp_2m", gamma=0.5)
    with pytest.raises(ValueError, match="no exact inverse"):
        bdia.invert(den, x, bdia.karras_sigmas(4), solver="unipc")
    assert np.isfinite(bdia.sample(den, x, bdia.karras_sigmas(4), solver="ipndm").numpy()).all()
