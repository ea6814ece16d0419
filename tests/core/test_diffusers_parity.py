"""Our DDIM against diffusers' DDIMScheduler driving the same epsilon network (an independent implementation)."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import bdia


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return model.eval()


def diffusers_ddim(unet, scheduler, latents, num_steps):
    scheduler.set_timesteps(num_steps)
    z = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(z, t).sample
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


@pytest.mark.parametrize(
    "config, num_steps",
    [
        (bdia.SD_SCHEDULE, 20),  # Stable Diffusion: scaled_linear, leading, steps_offset 1, final abar = abar_0
        (dict(beta_schedule="linear", timestep_spacing="trailing", clip_sample=False), 10),  # DDPM betas, final abar = 1
        (dict(beta_schedule="linear", timestep_spacing="leading", steps_offset=0, clip_sample=False), 7),
    ],
)
def test_ddim_matches_diffusers_scheduler(unet, config, num_steps):
    scheduler = DDIMScheduler(**config)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = diffusers_ddim(unet, scheduler, latents, num_steps)

    abar = scheduler.alphas_cumprod.to(torch.float64)  # the same (float32-built) schedule diffusers uses
    sigmas = bdia.vp_sigmas(
        abar,
        num_steps,
        timestep_spacing=scheduler.config.timestep_spacing,
        steps_offset=scheduler.config.steps_offset,
        set_alpha_to_one=scheduler.config.set_alpha_to_one,
    )
    counted = bdia.CountingDenoiser(bdia.VPEpsDenoiser(unet, abar, model_dtype=torch.float32))
    x_init = latents.to(torch.float64) / bdia.vp_alpha(sigmas[0])  # x = z / alpha
    with torch.no_grad():
        x_final = bdia.sample(counted, x_init, sigmas, solver="ddim")
    z_final = x_final * bdia.vp_alpha(sigmas[-1])
    assert counted.nfe == num_steps
    # float32 round-off relative to the latents (a random UNet drives them to |z| ~ 100 without clipping)
    torch.testing.assert_close(z_final.float(), reference, rtol=1e-5, atol=1e-5)
    # and it is not trivially close: the network moved the latents by O(1)
    assert (reference - latents).abs().max() > 0.1


def test_vp_adapter_feeds_diffusers_timesteps(unet):
    """The labels the adapter passes are exactly the scheduler's integer timesteps."""
    scheduler = DDIMScheduler(**bdia.SD_SCHEDULE)
    scheduler.set_timesteps(10)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    sigmas = bdia.vp_sigmas(abar, 10, "leading", 1, False)
    seen = []

    def spy(z, timestep, **cond):
        seen.append(timestep[0].item())
        return unet(z.float(), timestep).sample

    den = bdia.VPEpsDenoiser(spy, abar)
    with torch.no_grad():
        bdia.sample(den, torch.randn(1, 3, 8, 8, dtype=torch.float64) * sigmas[0], sigmas, solver="bdia_ddim", gamma=0.5)
    assert seen == [float(t) for t in scheduler.timesteps]
