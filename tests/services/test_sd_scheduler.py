"""BDIADDIMScheduler (bdia.schedulers) inside a real diffusers StableDiffusionPipeline built from the tiny SD
folder, against our own BDIA-DDIM loop (bdia.sample) and, for gamma = 0, against diffusers' DDIMScheduler."""

from __future__ import annotations

import pytest
import torch
from sd_helpers import PROMPTS, our_sample, relative_error

from bdia.networks.sd import x_to_z
from bdia.schedulers import BDIADDIMScheduler

SEEDS, NUM_STEPS, GUIDANCE = [0, 1], 8, 3.0


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = dict(pipe.scheduler.config)  # the tests swap pipe.scheduler
    return pipe


def run_pipeline(pipe, scheduler, num_steps=NUM_STEPS):
    pipe.scheduler = scheduler
    return pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=GUIDANCE, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images


@pytest.fixture(scope="module")
def ddim_reference(pipe):
    from diffusers import DDIMScheduler

    return run_pipeline(pipe, DDIMScheduler.from_config(pipe.folder_scheduler_config))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_scheduler_in_a_diffusers_pipeline_equals_our_bdia_ddim_loop(pipe, tiny_sd, ddim_reference, gamma):
    scheduler = BDIADDIMScheduler.from_config(pipe.folder_scheduler_config, gamma=gamma)
    assert scheduler.config.gamma == gamma and scheduler.config.steps_offset == 1
    assert scheduler.config.set_alpha_to_one is False and scheduler.config.beta_schedule == "scaled_linear"
    latents = run_pipeline(pipe, scheduler)
    pair, sigmas, nfe = our_sample(tiny_sd, PROMPTS, SEEDS, NUM_STEPS, GUIDANCE, "bdia_ddim", gamma, return_pair=True)
    error = relative_error(latents, x_to_z(pair.x_end, sigmas[-1]))
    print(f"scheduler vs our loop, gamma={gamma}: {error:.1e}")
    assert error <= 1e-5, error
    assert relative_error(latents, ddim_reference) > 1e-3  # BDIA is not DDIM here
    # the scheduler remembers exactly the state our pair holds one step before the end
    torch.testing.assert_close(scheduler.state.sample.to(torch.float64), x_to_z(pair.x_inner, sigmas[-2]),
                               rtol=1e-5, atol=1e-5)


def test_gamma_zero_equals_diffusers_ddim_scheduler(pipe, ddim_reference):
    """gamma = 0 (the default) does DDIMScheduler's float operations one for one: bit-identical latents."""
    scheduler = BDIADDIMScheduler.from_config(pipe.folder_scheduler_config)
    assert scheduler.config.gamma == 0.0
    assert torch.equal(run_pipeline(pipe, scheduler), ddim_reference)


def test_set_timesteps_resets_the_state_so_pipeline_calls_repeat(pipe):
    scheduler = BDIADDIMScheduler.from_config(pipe.folder_scheduler_config, gamma=0.7)
    first = run_pipeline(pipe, scheduler)
    assert scheduler.state is not None
    second = run_pipeline(pipe, scheduler)
    assert torch.equal(first, second)
    scheduler.set_timesteps(4)
    assert scheduler.state is None and scheduler.timesteps.tolist() == [751, 501, 251, 1]


def test_a_new_trajectory_without_set_timesteps_starts_with_a_plain_step():
    scheduler = BDIADDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, gamma=1.0,
                                  set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(4)
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    first = scheduler.step(eps, 751, z).prev_sample
    scheduler.step(eps, 501, first)
    again = scheduler.step(eps, 751, z).prev_sample  # not below the remembered timestep: a fresh start
    torch.testing.assert_close(again, first)


def test_drop_in_from_other_configs_and_bad_input():
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)
    scheduler = BDIADDIMScheduler.from_config(pndm.config, gamma=0.5)
    assert (scheduler.config.gamma, scheduler.config.steps_offset, scheduler.config.beta_end) == (0.5, 1, 0.012)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        BDIADDIMScheduler(gamma=1.5)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="deterministic"):
        scheduler.step(torch.zeros(1, 4, 2, 2), scheduler.timesteps[0], torch.zeros(1, 4, 2, 2), eta=0.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        BDIADDIMScheduler().step(torch.zeros(1), 10, torch.zeros(1))


def test_config_round_trip(tmp_path):
    scheduler = BDIADDIMScheduler(gamma=0.25, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.save_pretrained(tmp_path)
    loaded = BDIADDIMScheduler.from_pretrained(tmp_path)
    assert loaded.config.gamma == 0.25 and loaded.config.steps_offset == 1
