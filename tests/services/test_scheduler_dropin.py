"""BDIADDIMScheduler as a drop-in for diffusers' DDIMScheduler, and BDIADDIMInverseScheduler's exact inversion.

The reference is diffusers' own DDIMScheduler / DDIMInverseScheduler (an independent implementation): with
gamma = 0 every step output must be bit-identical to DDIM's for every combination of DDIM's config keys, since
the scheduler does the same float operations in the same order. BDIA steps (gamma > 0) are checked against the
update written out in float64, and the inverse by round trips (exact up to round-off) and by its first step,
which is DDIMInverseScheduler's.
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import bdia
import bdia.schedulers as schedulers
from bdia.schedulers import BDIADDIMInverseScheduler, BDIADDIMScheduler, BDIAInvertedPair

ATTRIBUTES = ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod")


def toy_model(sample, t):
    """A smooth non-linear stand-in for a network output that depends on the timestep label."""
    t = float(t)
    return torch.tanh(0.8 * sample) * (0.5 + t / 2000) + 0.1 * torch.sin(3 * sample + t / 100)


def latents(dtype=torch.float32, seed=0, shape=(2, 3, 4, 4)):
    return (1.5 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))).to(dtype)


def run_loop(scheduler, num_steps, sample, **step_kwargs):
    """A pipeline's denoising loop; returns every (prev_sample, pred_original_sample)."""
    scheduler.set_timesteps(num_steps)
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(toy_model(sample, t).to(sample.dtype), t, sample, **step_kwargs)
        outputs.append((out.prev_sample, out.pred_original_sample))
        sample = out.prev_sample
    return outputs


def assert_bitwise_equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN where DDIM makes NaN (see below)


# --- the config -------------------------------------------------------------------------------------------


def test_every_ddim_config_key_is_accepted_with_ddims_default():
    ours = inspect.signature(BDIADDIMScheduler.__init__).parameters
    for name, param in inspect.signature(DDIMScheduler.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].default == param.default or (param.default is None and ours[name].default is None), name
    assert set(ours) - set(inspect.signature(DDIMScheduler.__init__).parameters) == {"gamma"}
    inverse = inspect.signature(BDIADDIMInverseScheduler.__init__).parameters
    ddim_inverse = {k for k, p in inspect.signature(DDIMInverseScheduler.__init__).parameters.items()
                    if p.kind is not p.VAR_KEYWORD}
    assert ddim_inverse <= set(inverse)


def test_default_gamma_is_ddim_and_the_inverse_default_is_one():
    assert BDIADDIMScheduler().config.gamma == 0.0
    with pytest.warns(UserWarning, match="clip_sample"):  # DDIM's default clip_sample=True
        assert BDIADDIMInverseScheduler().config.gamma == 1.0
    assert BDIADDIMInverseScheduler(clip_sample=False).config.gamma == 1.0


def test_constructs_from_ddim_kwargs():
    for kwargs in (bdia.SD_SCHEDULE, dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=2.0),
                   dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
                   dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
                   dict(trained_betas=[0.01, 0.02, 0.03], num_train_timesteps=3)):
        scheduler = BDIADDIMScheduler(**kwargs)
        for key, value in kwargs.items():
            assert scheduler.config[key] == value, key


@pytest.mark.parametrize("kwargs", [
    dict(),
    bdia.SD_SCHEDULE,
    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False),
    dict(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(trained_betas=np.linspace(0.001, 0.2, 50), num_train_timesteps=50),
])
def test_public_attributes_equal_ddims(kwargs):
    ddim, ours = DDIMScheduler(**kwargs), BDIADDIMScheduler(**kwargs, gamma=0.5)
    for name in ATTRIBUTES:
        theirs, mine = getattr(ddim, name), getattr(ours, name)
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert ours.init_noise_sigma == ddim.init_noise_sigma and len(ours) == len(ddim)
    assert torch.equal(ours.timesteps, ddim.timesteps)
    for spacing in ("leading", "trailing", "linspace"):
        spaced = dict(kwargs, timestep_spacing=spacing)
        ddim, ours = DDIMScheduler(**spaced), BDIADDIMScheduler(**spaced)
        for n in (1, 7, 10):
            ddim.set_timesteps(n)
            ours.set_timesteps(n)
            assert torch.equal(ours.timesteps, ddim.timesteps), (spacing, n)


def test_rescaled_zero_snr_schedule_really_ends_at_zero():
    """Not only DDIM's attributes: the closed form of the rescaling (sqrt(abar) shifted to 0 at T, scaled back to
    its value at 0)."""
    plain = BDIADDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddim_rescaled = DDIMScheduler.from_config(plain.config, rescale_betas_zero_snr=True)
    rescaled = BDIADDIMScheduler.from_config(ddim_rescaled.config)
    assert rescaled.config.rescale_betas_zero_snr is True
    assert rescaled.alphas_cumprod[-1] == 0.0 and plain.alphas_cumprod[-1] > 1e-5
    root = plain.alphas_cumprod.to(torch.float64).sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    torch.testing.assert_close(rescaled.alphas_cumprod.to(torch.float64), expected, rtol=1e-5, atol=1e-7)


# --- gamma = 0 is DDIM, for every combination of DDIM's keys ---------------------------------------------------

BETAS = {
    "linear": dict(),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained": dict(trained_betas=np.linspace(0.0005, 0.03, 1000).tolist()),
}
X0_LIMITS = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
}


@pytest.mark.parametrize("betas", list(BETAS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_gamma_zero_is_bit_identical_to_ddim_for_every_config_combination(betas, prediction_type):
    """Every (x0 limit, rescale_betas_zero_snr, spacing, set_alpha_to_one, steps_offset, use_clipped_model_output,
    dtype) under this beta schedule and prediction type: each step's prev_sample and pred_original_sample equal
    DDIMScheduler's bit for bit. (With rescale_betas_zero_snr and epsilon/sample prediction, alpha_bar = 0 at
    t = 999 makes DDIM's x0 infinite: then both produce the same NaN/inf, which counts as equal.)"""
    combos = itertools.product(X0_LIMITS, [False, True], ["leading", "trailing", "linspace"], [True, False], [0, 1],
                               [False, True])
    checked = 0
    for limit, rescale, spacing, alpha_to_one, offset, clipped_eps in combos:
        if spacing != "leading" and offset:
            continue  # steps_offset only moves "leading" timesteps
        config = dict(**BETAS[betas], **X0_LIMITS[limit], prediction_type=prediction_type,
                      rescale_betas_zero_snr=rescale, timestep_spacing=spacing, set_alpha_to_one=alpha_to_one,
                      steps_offset=offset)
        dtypes = (torch.float32, torch.float64) if limit != "none" or rescale else (torch.float32, torch.float64,
                                                                                      torch.float16)
        for dtype in dtypes:
            ddim = DDIMScheduler(**config)
            ours = BDIADDIMScheduler.from_config(ddim.config)
            assert ours.config.gamma == 0.0
            sample = latents(dtype)
            expected = run_loop(ddim, 6, sample, eta=0.0, use_clipped_model_output=clipped_eps)
            got = run_loop(ours, 6, sample, eta=0.0, use_clipped_model_output=clipped_eps)
            for (prev_e, x0_e), (prev_g, x0_g) in zip(expected, got):
                assert prev_g.dtype == prev_e.dtype
                assert_bitwise_equal(prev_g, prev_e)
                assert_bitwise_equal(x0_g, x0_e)
            checked += 1
    # 96 configurations (3 x0 limits x 2 rescale x 4 spacing/offset x 2 final levels x 2 eps choices); float16 too
    # for the 16 without x0 limits and rescaling (half precision overflows the others the same way in both)
    assert checked == 96 * 2 + 16, checked


def test_the_x0_limits_are_active_in_those_checks():
    """So the bitwise check above covers clipping and thresholding actually changing x0."""
    sample = latents()
    plain = run_loop(DDIMScheduler(clip_sample=False), 6, sample)
    for limit in ("clip", "threshold"):
        limited = run_loop(DDIMScheduler(**X0_LIMITS[limit]), 6, sample)
        assert (plain[0][1] - limited[0][1]).abs().max() > 0.1, limit


# --- BDIA steps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(clip_sample=False), dict(**X0_LIMITS["threshold"]),
                                    dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                                         rescale_betas_zero_snr=True, set_alpha_to_one=False)])
def test_bdia_step_is_the_papers_update(config):
    """z_next = D_{t->t_next}(z_t) + gamma (z_{t_prev} - D_{t->t_prev}(z_t)), D(x0, eps) from DDIMScheduler's
    (x0 limited) output, written out in float64; the first step is DDIM's."""
    gamma, n = 0.7, 8
    ddim, ours = DDIMScheduler(**config), BDIADDIMScheduler(**config, gamma=gamma)
    ddim.set_timesteps(n)
    ours.set_timesteps(n)
    abar = ddim.alphas_cumprod.to(torch.float64)
    ratio = 1000 // n
    z_prev, t_prev, z = None, None, latents(torch.float64)
    for t in ours.timesteps.tolist():
        eps_model = toy_model(z, t)
        ddim_out = ddim.step(eps_model, t, z)
        x0 = ddim_out.pred_original_sample
        a_t = abar[t]
        if config.get("prediction_type") == "v_prediction":
            eps = a_t.sqrt() * eps_model + (1 - a_t).sqrt() * z
        else:
            eps = eps_model  # DDIM keeps the model's eps after limiting x0 (use_clipped_model_output=False)
        a_next = abar[t - ratio] if t - ratio >= 0 else ddim.final_alpha_cumprod.to(torch.float64)
        expected = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        # tolerance: DDIM takes sqrt of its float32 alpha_bar in float32 (1e-7 relative), we do it in float64
        if z_prev is None:
            torch.testing.assert_close(expected, ddim_out.prev_sample, rtol=1e-6, atol=1e-6)
        else:
            expected = expected + gamma * (z_prev - (abar[t_prev].sqrt() * x0 + (1 - abar[t_prev]).sqrt() * eps))
        got = ours.step(eps_model, t, z).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        z_prev, t_prev, z = z, t, got
    assert (z - run_loop(DDIMScheduler(**config), n, latents(torch.float64))[-1][0]).abs().max() > 1e-2


def test_state_is_reset_so_a_reused_scheduler_repeats_bit_for_bit():
    scheduler = BDIADDIMScheduler(gamma=1.0, clip_sample=False)
    first = run_loop(scheduler, 10, latents())
    assert scheduler.state is not None
    other = run_loop(scheduler, 4, latents(seed=5))  # a different trajectory in between
    second = run_loop(scheduler, 10, latents())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert not torch.equal(other[-1][0], first[-1][0])
    scheduler.set_timesteps(3)
    assert scheduler.state is None


def test_eta_other_than_zero_raises_with_a_reason():
    scheduler = BDIADDIMScheduler(gamma=0.5)
    scheduler.set_timesteps(10)
    sample = latents()
    for eta in (0.5, 1.0):
        with pytest.raises(ValueError, match="deterministic: eta must be 0"):
            scheduler.step(sample, scheduler.timesteps[0], sample, eta=eta)
    scheduler.step(sample, scheduler.timesteps[0], sample, eta=0.0, generator=torch.Generator())  # accepted


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        BDIADDIMScheduler(gamma=1.5)
    with pytest.raises(ValueError, match="gamma in \\(0, 1\\]"):
        BDIADDIMInverseScheduler(gamma=0.0, clip_sample=False)
    with pytest.raises(ValueError, match="beta_schedule"):
        BDIADDIMScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="set_timesteps"):
        BDIADDIMScheduler().step(torch.zeros(1), 10, torch.zeros(1))


# --- config round trips ----------------------------------------------------------------------------------


def test_gamma_and_every_key_survive_save_load_and_from_config(tmp_path):
    config = dict(**X0_LIMITS["threshold"], rescale_betas_zero_snr=True, prediction_type="v_prediction",
                  timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1, gamma=0.25)
    scheduler = BDIADDIMScheduler(**config)
    scheduler.save_pretrained(tmp_path)
    for loaded in (BDIADDIMScheduler.from_pretrained(tmp_path), BDIADDIMScheduler.from_config(scheduler.config),
                   # through DDIMScheduler: diffusers keeps the key it does not know as a hidden config entry
                   BDIADDIMScheduler.from_config(DDIMScheduler.from_config(scheduler.config).config)):
        for key, value in config.items():
            assert loaded.config[key] == value, key
    inverse = BDIADDIMInverseScheduler.from_config(dict(scheduler.config, gamma=0.9))
    assert BDIADDIMScheduler.from_config(inverse.config).config.gamma == 0.9
    trained = BDIADDIMScheduler(trained_betas=np.array([0.1, 0.3]), num_train_timesteps=2)
    trained.save_pretrained(tmp_path / "trained")
    assert BDIADDIMScheduler.from_pretrained(tmp_path / "trained").betas.tolist() == trained.betas.tolist()


def test_a_ddim_key_this_class_lacks_is_never_dropped_silently(monkeypatch):
    """diffusers' from_config drops keys of compatible classes without a word; a DDIMScheduler key we do not
    take (one a newer diffusers could add) warns instead. Today there is none: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BDIADDIMScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True, thresholding=True).config)
    monkeypatch.setattr(schedulers, "_ddim_init_keys", lambda: {"clip_sample", "future_ddim_option"})
    with pytest.warns(UserWarning, match="future_ddim_option"):
        BDIADDIMScheduler.from_config({"future_ddim_option": True, "clip_sample": False})


# --- the inverse scheduler ------------------------------------------------------------------------------------


def invert(inverse, num_steps, z0):
    """A pipeline's inversion loop (DiffEdit's / Pix2Pix-Zero's): the model sees each latent with its label."""
    inverse.set_timesteps(num_steps)
    z = z0
    for t in inverse.timesteps:
        z = inverse.step(toy_model(z, t), t, z).prev_sample
    return z


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("limit", ["none", "clip", "threshold"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_inverted_pair_regenerates_the_latent_exactly(spacing, set_alpha_to_one, limit, gamma):
    """float64 round trip: the error is round-off (~1e-15 here), amplified ~1/gamma per step."""
    config = dict(**X0_LIMITS[limit], timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, gamma=gamma,
                  steps_offset=1 if spacing == "leading" else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if limit != "none" else "error")
        inverse = BDIADDIMInverseScheduler(**config)
    num_steps, z0 = 12, latents(torch.float64)
    z_top = invert(inverse, num_steps, z0)
    pair = inverse.inverted_pair
    assert torch.equal(pair.upper, z_top) and pair.gamma == gamma
    sampler = BDIADDIMScheduler.from_config(inverse.config)
    sampler.regenerate_from(pair)
    outputs = run_loop(sampler, num_steps, pair.upper)
    assert sampler.timesteps[0] == pair.timestep
    assert torch.equal(outputs[0][0], pair.lower)  # the first step continues the pair
    error = (outputs[-1][0] - z0).abs().max().item()
    assert error < 1e-12, error
    assert (z_top - z0).abs().max() > 0.5  # the inversion went somewhere
    without_pair = BDIADDIMScheduler.from_config(inverse.config)
    assert (run_loop(without_pair, num_steps, pair.upper)[-1][0] - z0).abs().max() > 1e-3


def test_inverse_timesteps_and_first_step_are_ddim_inversion():
    """Timesteps [t_1, t_1, t_2, ..., t_{N-1}]; the first step is DDIMInverseScheduler's (same operations), the
    second is the BDIA inverse written out."""
    config = dict(bdia.SD_SCHEDULE)
    inverse, ddim_inverse = BDIADDIMInverseScheduler(**config, gamma=0.8), DDIMInverseScheduler(**config)
    sampler = BDIADDIMScheduler(**config)
    for n in (1, 2, 10):
        inverse.set_timesteps(n)
        sampler.set_timesteps(n)
        grid = sampler.timesteps.flip(0)
        assert inverse.timesteps.tolist() == [grid[0].item()] + grid[:-1].tolist()
    ddim_inverse.set_timesteps(10)
    assert ddim_inverse.timesteps[0] == inverse.timesteps[0] == 1
    z0 = latents()
    eps = toy_model(z0, 1)
    z1 = inverse.step(eps, 1, z0).prev_sample
    assert torch.equal(z1, ddim_inverse.step(eps, 1, z0).prev_sample)
    eps1 = toy_model(z1, 1).to(torch.float64)
    z2 = inverse.step(eps1.float(), 1, z1).prev_sample
    abar = inverse.alphas_cumprod.to(torch.float64)
    a1, a_final, a2 = abar[1], abar[0], abar[101]  # SD: set_alpha_to_one=False, the clean level is abar[0]
    x0 = (z1.double() - (1 - a1).sqrt() * eps1) / a1.sqrt()
    back = a_final.sqrt() * x0 + (1 - a_final).sqrt() * eps1
    expected = (z0.double() - back) / 0.8 + a2.sqrt() * x0 + (1 - a2).sqrt() * eps1
    torch.testing.assert_close(z2.double(), expected, rtol=1e-5, atol=1e-5)  # float32 latents


def test_regenerate_from_checks_gamma_and_grid():
    pair = BDIAInvertedPair(torch.zeros(1, 2), torch.ones(1, 2), 900, 0.9)
    with pytest.raises(ValueError, match="inverted with gamma=0.9"):
        BDIADDIMScheduler(gamma=1.0).regenerate_from(pair)
    sampler = BDIADDIMScheduler(gamma=0.9, clip_sample=False)
    sampler.regenerate_from(pair)
    sampler.set_timesteps(10)  # top timestep 900: the pair applies
    assert torch.equal(sampler.step(torch.zeros(1, 2), 900, torch.zeros(1, 2)).prev_sample, torch.ones(1, 2))
    sampler.set_timesteps(4)  # top timestep 750: a different grid, said out loud
    with pytest.warns(UserWarning, match="not an exact regeneration"):
        out = sampler.step(torch.zeros(1, 2), 750, torch.zeros(1, 2)).prev_sample
    assert not torch.equal(out, torch.ones(1, 2))
    sampler.regenerate_from(None)
    sampler.set_timesteps(10)
    assert not torch.equal(sampler.step(torch.zeros(1, 2), 900, torch.zeros(1, 2)).prev_sample, torch.ones(1, 2))


def test_inverse_warns_on_x0_clipping_and_thresholding():
    for option in (dict(clip_sample=True), dict(thresholding=True)):
        with pytest.warns(UserWarning, match="not an inversion of the sampling ODE"):
            BDIADDIMInverseScheduler(**option)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BDIADDIMInverseScheduler(**bdia.SD_SCHEDULE)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_diffedit_inversion_and_pipeline_regeneration_round_trip(tiny_sd_dir, gamma):
    """diffusers' own DiffEdit pipeline inverts with BDIADDIMInverseScheduler as its inverse_scheduler; a
    StableDiffusionPipeline with BDIADDIMScheduler regenerates from the pair. Float32 latents: the error is
    round-off, ~2e-6 relative measured, bounded at 1e-4; without the pair it is O(1)."""
    from diffusers import StableDiffusionDiffEditPipeline, StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        edit = StableDiffusionDiffEditPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, inverse_scheduler=None)
    edit.set_progress_bar_config(disable=True)
    edit.inverse_scheduler = BDIADDIMInverseScheduler.from_config(edit.scheduler.config, gamma=gamma)
    prompt, num_steps, guidance = "a photo of the cat", 10, 3.0
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inverted = edit.invert(prompt=prompt, image=z0, num_inference_steps=num_steps, inpaint_strength=1.0,
                           guidance_scale=guidance).latents
    pair = edit.inverse_scheduler.inverted_pair
    assert inverted.shape == (1, num_steps, 4, 8, 8) and torch.equal(inverted[:, 0], pair.upper)

    components = {k: v for k, v in edit.components.items() if k != "inverse_scheduler"}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for use_pair in (True, False):
        pipe.scheduler = BDIADDIMScheduler.from_config(edit.inverse_scheduler.config)
        pipe.scheduler.regenerate_from(pair if use_pair else None)
        again = pipe(prompt, latents=pair.upper, num_inference_steps=num_steps, guidance_scale=guidance,
                     output_type="latent").images
        results.append(((again - z0).abs().max() / z0.abs().max()).item())
    print(f"gamma={gamma}: relative error with the pair {results[0]:.1e}, without {results[1]:.1e}")
    assert results[0] < 1e-4 and results[1] > 1e-2, results


def test_package_exports_the_schedulers_lazily():
    assert bdia.BDIADDIMScheduler is BDIADDIMScheduler and bdia.BDIADDIMInverseScheduler is BDIADDIMInverseScheduler
    assert bdia.BDIAInvertedPair is BDIAInvertedPair


def test_invert_and_regenerate_with_a_loaded_pipeline_is_exact_in_float64(tiny_sd_dir):
    """bdia.pipelines.invert_with_pipeline on a real StableDiffusionPipeline object (float64): encode a photo,
    invert under the prompt with guidance, regenerate through the pipeline's own __call__: the latent comes back
    to float64 round-off; an edit prompt regenerates something else; the pipeline keeps its scheduler."""
    from diffusers import StableDiffusionPipeline

    from bdia.apps.edit import load_image
    from bdia.pipelines import invert_with_pipeline, regenerate_with_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    pixels = load_image("china.jpg", 32).to(torch.float64) / 127.5 - 1
    z0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    pair = invert_with_pipeline(pipe, pixels, "a photo of a temple", num_inference_steps=10, gamma=0.96,
                                guidance_scale=3.0)
    assert pair.upper.dtype == torch.float64 and (pair.upper - z0).abs().max() > 0.5
    again = regenerate_with_pipeline(pipe, pair, "a photo of a temple", num_inference_steps=10, guidance_scale=3.0,
                                     output_type="latent").images
    error = ((again - z0).abs().max() / z0.abs().max()).item()
    assert error < 1e-10, error
    edited = regenerate_with_pipeline(pipe, pair, "a watercolor of a temple", num_inference_steps=10,
                                      guidance_scale=3.0, output_type="latent").images
    assert ((edited - z0).abs().max() / z0.abs().max()).item() > 1e-3
    assert pipe.scheduler is scheduler
    assert torch.equal(invert_with_pipeline(pipe, z0, "a photo of a temple", 10, 0.96, 3.0).upper, pair.upper)


@pytest.mark.parametrize("timestep", [1, 10, 49, 999])
def test_gamma_zero_steps_from_any_training_timestep_as_ddim_does(timestep):
    """At gamma = 0 the drop-in is DDIMScheduler also off its inference grid (diffusers' own scheduler tests step
    from timesteps 1, 10, 49); BDIA (gamma > 0) pairs grid levels and refuses them (tests/core/test_bad_input_core.py);
    a negative timestep, which would index alphas_cumprod from its end, is refused either way."""
    ours, ddim = BDIADDIMScheduler(), DDIMScheduler()
    for scheduler in (ours, ddim):
        scheduler.set_timesteps(10)
    sample = latents()
    output = toy_model(sample, timestep)
    assert_bitwise_equal(ours.step(output, timestep, sample).prev_sample, ddim.step(output, timestep, sample).prev_sample)
    with pytest.raises(ValueError, match="outside the training timesteps"):
        ours.step(output, -1, sample)


def test_ddim_variance_matches_ddim_scheduler():
    ours, ddim = BDIADDIMScheduler(), DDIMScheduler()
    for t, prev in ((0, 0), (420, 400), (980, 960), (487, 486), (999, 998), (20, -10)):
        assert_bitwise_equal(ours._get_variance(t, prev), ddim._get_variance(t, prev))
