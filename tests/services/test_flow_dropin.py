"""BDIAFlowMatchEulerScheduler as a drop-in for diffusers' FlowMatchEulerDiscreteScheduler, its exact inverse, and
both inside the real StableDiffusion3Pipeline and FluxPipeline on tiny random models.

The reference is diffusers' own FlowMatchEulerDiscreteScheduler: with gamma = 0 every step must be bit-identical
to it for every config key combination, alone and inside the pipelines (shift, dynamic shifting, custom sigmas).
BDIA steps are checked against the update written out in float64, inversion by float64 round trips through the
pipelines (with the network calls counted), and the core loop on the loaded model against the pipeline's own run.
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

import bdia
from bdia.flow_schedulers import BDIAFlowMatchEulerScheduler, BDIAFlowMatchInverseScheduler
from bdia.networks.flow import FluxVelocity, load_flow
from bdia.pipelines import _flow_latents, invert_with_pipeline, regenerate_with_pipeline
from bdia.schedulers import BDIAInvertedPair

PROMPT = "a photo of a cat"


def toy_velocity(sample, t):
    """A smooth non-linear stand-in for a network's velocity that depends on the label."""
    t = float(t) / 1000
    return torch.tanh(0.8 * sample) * (0.5 + t) - 0.3 * torch.sin(3 * sample + t) + 0.2


def latents(dtype=torch.float32, seed=0, shape=(2, 3, 4, 4)):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_loop(scheduler, sample, **set_kwargs):
    scheduler.set_timesteps(**set_kwargs)
    outputs = []
    for t in scheduler.timesteps:
        sample = scheduler.step(toy_velocity(sample, t).to(sample.dtype), t, sample).prev_sample
        outputs.append(sample)
    return outputs


# --- the scheduler alone ---------------------------------------------------------------------------------


def test_every_config_key_is_diffusers_with_its_default_plus_gamma():
    ours = inspect.signature(BDIAFlowMatchEulerScheduler.__init__).parameters
    theirs = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    for name, param in theirs.items():
        assert name in ours and ours[name].default == param.default, name
    assert set(ours) - set(theirs) == {"gamma"} and ours["gamma"].default == 0.0
    inverse = inspect.signature(BDIAFlowMatchInverseScheduler.__init__).parameters
    assert set(inverse) == set(ours) and inverse["gamma"].default == 1.0


CONFIGS = [dict(zip(("shift", "spacing", "terminal"), combo)) for combo in itertools.product(
    [{}, {"shift": 3.0}, {"use_dynamic_shifting": True, "time_shift_type": "exponential"},
     {"use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.3}],
    [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}],
    [{}, {"shift_terminal": 0.05}, {"invert_sigmas": True}])]


@pytest.mark.parametrize("combo", CONFIGS, ids=lambda c: "-".join(f"{k}{len(v)}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_zero_is_flow_euler_bit_for_bit_for_every_key_combination(combo, dtype):
    config = {**combo["shift"], **combo["spacing"], **combo["terminal"]}
    mu = 0.9 if config.get("use_dynamic_shifting") else None
    reference, ours = FlowMatchEulerDiscreteScheduler(**config), BDIAFlowMatchEulerScheduler(**config)
    for kwargs in (dict(num_inference_steps=7, mu=mu), dict(sigmas=[1.0, 0.7, 0.45, 0.2, 0.05], mu=mu)):
        expected, got = run_loop(reference, latents(dtype), **kwargs), run_loop(ours, latents(dtype), **kwargs)
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name in ("sigmas", "timesteps"):
            assert torch.equal(getattr(reference, name), getattr(ours, name)), name
        assert (reference.sigma_min, reference.sigma_max, reference.shift) == (ours.sigma_min, ours.sigma_max, ours.shift)


def test_from_a_diffusers_config_and_back():
    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    ours = BDIAFlowMatchEulerScheduler.from_config(config, gamma=0.5)
    assert type(ours) is BDIAFlowMatchEulerScheduler and ours.config.gamma == 0.5 and ours.config.shift == 3.0
    inverse = BDIAFlowMatchInverseScheduler.from_config(ours.config)
    assert type(inverse) is BDIAFlowMatchInverseScheduler and inverse.config.gamma == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: "gamma ... not expected and will be ignored"
        assert FlowMatchEulerDiscreteScheduler.from_config(ours.config).config.use_dynamic_shifting


@pytest.mark.parametrize("make,needle", [
    (lambda: BDIAFlowMatchEulerScheduler(stochastic_sampling=True), "stochastic_sampling"),
    (lambda: BDIAFlowMatchEulerScheduler(gamma=1.5), "gamma"),
    (lambda: BDIAFlowMatchEulerScheduler(gamma=float("nan")), "gamma"),
    (lambda: BDIAFlowMatchInverseScheduler(gamma=0.0), "divides"),
    (lambda: BDIAFlowMatchInverseScheduler(stochastic_sampling=True), "stochastic_sampling"),
])
def test_bad_settings_fail_in_one_line(make, needle):
    with pytest.raises(ValueError) as info:
        make()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_bdia_step_is_the_update_written_out():
    scheduler = BDIAFlowMatchEulerScheduler(shift=3.0, gamma=0.7)
    scheduler.set_timesteps(6)
    t = scheduler.sigmas.double()
    z = [latents(torch.float64)]
    for k, label in enumerate(scheduler.timesteps):
        z.append(scheduler.step(toy_velocity(z[-1], label), label, z[-1]).prev_sample)
    expected = [z[0]]
    for k, label in enumerate(scheduler.timesteps):
        v = toy_velocity(expected[-1], label)
        step = expected[-1] + (t[k + 1] - t[k]) * v
        if k > 0:
            step = step + 0.7 * (expected[-2] - (expected[-1] + (t[k - 1] - t[k]) * v))
        expected.append(step)
    assert max((a - b).abs().max() for a, b in zip(z, expected)) < 1e-14


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("config", [dict(shift=3.0), dict(use_dynamic_shifting=True)])
def test_the_inverse_scheduler_round_trips_in_float64(gamma, config):
    mu = 1.0 if config.get("use_dynamic_shifting") else None
    inverse = BDIAFlowMatchInverseScheduler(gamma=gamma, **config)
    inverse.set_timesteps(8, mu=mu)
    assert torch.equal(inverse.timesteps, torch.cat([inverse.grid_timesteps.flip(0)[:1], inverse.grid_timesteps.flip(0)[:-1]]))
    clean = latents(torch.float64)
    sample = clean
    for t in inverse.timesteps:
        sample = inverse.step(toy_velocity(sample, t), t, sample).prev_sample
    pair = inverse.inverted_pair
    assert torch.equal(pair.upper, sample) and pair.timestep == float(inverse.grid_timesteps[0])
    scheduler = BDIAFlowMatchEulerScheduler(gamma=gamma, **config)
    scheduler.regenerate_from(pair)
    scheduler.set_timesteps(8, mu=mu)
    sample = pair.upper
    for t in scheduler.timesteps:
        sample = scheduler.step(toy_velocity(sample, t), t, sample).prev_sample
    assert (sample - clean).abs().max() / clean.abs().max() < 1e-13


def test_regenerate_from_refuses_another_gamma():
    scheduler = BDIAFlowMatchEulerScheduler(gamma=0.5)
    pair = BDIAInvertedPair(latents(), latents(seed=1), 1000.0, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        scheduler.regenerate_from(pair)


# --- inside the pipelines ---------------------------------------------------------------------------------


def _load(folder, family, dtype=torch.float32):
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    pipe.to(dtype)  # from_pretrained leaves the SD3 transformer in float32
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipeline(request, tiny_sd3_dir, tiny_flux_dir):
    family = request.param
    return family, _load(tiny_sd3_dir if family == "sd3" else tiny_flux_dir, family)


def _generate(pipe, scheduler, **kwargs):
    pipe.scheduler = scheduler
    return pipe(PROMPT, num_inference_steps=5, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("setting", ["shift", "dynamic", "custom_sigmas"])
def test_gamma_zero_equals_flow_euler_bit_for_bit_inside_the_pipelines(pipeline, setting):
    family, pipe = pipeline
    base = dict(pipe.scheduler.config)
    config = {"shift": dict(shift=3.0, use_dynamic_shifting=False), "dynamic": dict(use_dynamic_shifting=True),
              "custom_sigmas": {}}[setting]
    kwargs = {"sigmas": [1.0, 0.75, 0.5, 0.3, 0.1]} if setting == "custom_sigmas" else {}
    original = pipe.scheduler
    try:
        expected = _generate(pipe, FlowMatchEulerDiscreteScheduler.from_config(base, **config), **kwargs)
        got = _generate(pipe, BDIAFlowMatchEulerScheduler.from_config(base, **config), **kwargs)
        bdia_run = _generate(pipe, BDIAFlowMatchEulerScheduler.from_config(base, gamma=0.5, **config), **kwargs)
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(bdia_run, expected)  # gamma > 0 does change the trajectory


class _CountCalls:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_a_photo_round_trips_through_the_pipelines_in_float64(family, gamma, tiny_sd3_dir, tiny_flux_dir):
    pipe = _load(tiny_sd3_dir if family == "sd3" else tiny_flux_dir, family, dtype=torch.float64)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    clean = _flow_latents(pipe, family, image)[0]
    counter = _CountCalls(pipe.transformer)
    pair = invert_with_pipeline(pipe, image, PROMPT, num_inference_steps=10, gamma=gamma)
    assert counter.calls == 10  # N network calls (SD3's guided halves run as one batch)
    counter.calls = 0
    again = regenerate_with_pipeline(pipe, pair, PROMPT, num_inference_steps=10, output_type="latent").images
    assert counter.calls == 10  # the first returns the pair's lower latent and is spent for nothing
    assert again.dtype == torch.float64 and again.shape == clean.shape
    assert (again - clean).abs().max() / clean.abs().max() < 1e-10
    edited = regenerate_with_pipeline(pipe, pair, "a photo of a dog", num_inference_steps=10, output_type="latent")
    assert not torch.allclose(edited.images, clean)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_core_loop_on_the_loaded_model_is_the_pipelines_flow_euler(family, tiny_sd3_dir, tiny_flux_dir):
    """bdia.sample(solver="ddim") with load_flow's denoiser against the pipeline's own float64 run: equal up to the
    float32 rounding FlowMatchEulerDiscreteScheduler applies to the sample each step (about 2^-24 relative)."""
    fm = load_flow(path=tiny_sd3_dir if family == "sd3" else tiny_flux_dir, dtype=torch.float64)
    prompts = [PROMPT, "a dog"]
    noise = torch.randn(2, *fm.latent_shape(32, 32), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = fm.sigmas(6, 32, 32)
    ours = bdia.sample(fm.denoiser(), noise, sigmas, solver="ddim", cond=fm.encode_prompts(prompts))
    packed = noise if family == "sd3" else FluxVelocity.pack(noise)
    theirs = fm.pipe(prompts, latents=packed, num_inference_steps=6, height=32, width=32, output_type="latent",
                     guidance_scale=fm.default_guidance_scale).images
    theirs = theirs if family == "sd3" else FluxVelocity.unpack(theirs, 16, 16)
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


def test_flux_images_must_pack(tiny_flux_dir):
    pipe = _load(tiny_flux_dir, "flux")
    with pytest.raises(ValueError, match="divisible by 4"):
        invert_with_pipeline(pipe, torch.zeros(1, 3, 30, 32), PROMPT, num_inference_steps=4)
