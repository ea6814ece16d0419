"""Stable Diffusion through diffusers (bdia.networks.sd) on a tiny random SD built locally: loading, encode /
decode, the schedule, our DDIM loop against diffusers' own StableDiffusionPipeline + DDIMScheduler, the exact
BDIA round trip through the full classifier-free-guidance path, and the offline failure."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from sd_helpers import PROMPTS, initial_latents, our_sample, relative_error

import bdia
from bdia.download import AssetUnavailableError
from bdia.networks import sd as sdmod
from bdia.networks.sd import SD_MODELS, StableDiffusion, load_sd, x_to_z, z_to_x
from bdia.testing import build_tiny_sd


def _pipeline(folder, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


# --------------------------------------------------------------------------------------------------
# The tiny folder and loading.


def test_tiny_folder_is_a_diffusers_sd_folder_and_deterministic(tiny_sd_dir, tmp_path):
    assert (tiny_sd_dir / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_dir / sub).is_dir(), sub
    again = build_tiny_sd(tmp_path / "again", seed=0)
    other = build_tiny_sd(tmp_path / "other", seed=1)

    def digest(folder):
        return hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_sd_dir) != digest(other)
    pipe = _pipeline(tiny_sd_dir)  # diffusers' own loader accepts it
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.safety_checker is None
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_sd(tmp_path / "bad", sample_size=30)


def test_tiny_model_size(tiny_sd):
    # Its speed (a few ms per UNet call) is not asserted here: wall-clock limits fail on busy machines.
    params = {name: sum(p.numel() for p in getattr(tiny_sd, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert params["unet"] < 500_000 and params["vae"] < 200_000 and params["text_encoder"] < 100_000, params
    z = torch.randn(1, 4, 8, 8)
    embeds = tiny_sd.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        eps = tiny_sd.unet(z, 500, encoder_hidden_states=embeds)
    eps = getattr(eps, "sample", eps)
    assert eps.shape == z.shape and bool(torch.isfinite(eps).all())


def test_scheduler_numbers_come_from_the_checkpoint_config(tiny_sd):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(**bdia.SD_SCHEDULE)
    assert tiny_sd.alphas_cumprod.dtype == torch.float64
    # diffusers builds its betas in float32; ours are float64: equal to float32 round-off
    torch.testing.assert_close(tiny_sd.alphas_cumprod, reference.alphas_cumprod.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tiny_sd.alphas_cumprod, bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012))
    assert tiny_sd.prediction_type == "epsilon" and tiny_sd.latent_scaling == pytest.approx(0.18215)
    sigmas = tiny_sd.sigmas(10)
    abar = tiny_sd.alphas_cumprod
    reference.set_timesteps(10)
    expected = ((1 - abar[reference.timesteps]) / abar[reference.timesteps]).sqrt()
    torch.testing.assert_close(sigmas[:-1], expected)
    assert sigmas[-1].item() == pytest.approx(((1 - abar[0]) / abar[0]).sqrt().item())  # set_alpha_to_one False
    assert sigmas[-1].item() == pytest.approx(0.0292, abs=1e-4)


def test_encode_and_decode_shapes_ranges_and_dtypes(tiny_sd):
    embeds = tiny_sd.encode_prompts(PROMPTS)
    assert embeds.shape == (2, 77, 32) and embeds.dtype == torch.float32
    torch.testing.assert_close(tiny_sd.encode_prompts(PROMPTS[1:]), embeds[1:])  # rows independent of the batch
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = tiny_sd.encode_images(images)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float64
    with torch.no_grad():  # the posterior mean times the scaling factor, computed directly
        direct = tiny_sd.vae.encode(images).latent_dist.mean * tiny_sd.vae.config.scaling_factor
    torch.testing.assert_close(latents, direct.double())
    decoded = tiny_sd.decode_latents(latents)
    assert decoded.shape == (3, 3, 32, 32) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        direct = tiny_sd.vae.decode(latents.float() / tiny_sd.latent_scaling).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, direct)
    assert tiny_sd.latent_shape() == (4, 8, 8) and tiny_sd.latent_shape(64, 32) == (4, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        tiny_sd.latent_shape(30, 32)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_sd.encode_images(images[:, :1])


def test_denoiser_guidance_and_coordinates(tiny_sd):
    assert isinstance(tiny_sd.denoiser(1.0), bdia.VPEpsDenoiser)  # no guidance: the plain conditional denoiser
    guided = tiny_sd.denoiser(3.0)
    assert isinstance(guided, bdia.ClassifierFreeGuidance)
    embeds = tiny_sd.encode_prompts(PROMPTS[:1])
    uncond = tiny_sd.encode_prompts([""])
    sigma = tiny_sd.sigmas(10)[3]
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    plain = tiny_sd.denoiser(1.0)
    with torch.no_grad():
        expected = plain(x, sigma, encoder_hidden_states=uncond) + 3.0 * (
            plain(x, sigma, encoder_hidden_states=embeds) - plain(x, sigma, encoder_hidden_states=uncond))
        torch.testing.assert_close(guided(x, sigma, encoder_hidden_states=embeds), expected, rtol=1e-5, atol=1e-5)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(x_to_z(z_to_x(z, sigma), sigma), z.double())
    assert z_to_x(z, 0.0).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Parity with diffusers' own pipeline.


def test_our_ddim_loop_equals_diffusers_pipeline_with_ddim_scheduler(tiny_sd, tiny_sd_dir):
    from diffusers import DDIMScheduler

    pipe = _pipeline(tiny_sd_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    seeds, num_steps, guidance = [0, 1], 8, 3.0
    reference = pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    x_final, sigmas, nfe = our_sample(tiny_sd, PROMPTS, seeds, num_steps, guidance, solver="ddim")
    z_final = x_to_z(x_final, sigmas[-1])
    error = relative_error(z_final, reference)
    assert error <= 1e-5, error
    assert nfe == num_steps
    assert relative_error(initial_latents(seeds), reference) > 0.1  # the network moved the latents


# --------------------------------------------------------------------------------------------------
# Exact inversion through the full CFG path.


@pytest.mark.parametrize("gamma", [0.92, 1.0])
def test_bdia_round_trip_is_exact_in_float64_through_classifier_free_guidance(tiny_sd_dir, gamma):
    sd64 = load_sd(path=tiny_sd_dir, dtype=torch.float64)
    assert sd64.unet.dtype == torch.float64 and sd64.encode_prompts(PROMPTS).dtype == torch.float64
    num_steps, guidance = 10, 3.0
    pair, sigmas, _ = our_sample(sd64, PROMPTS, [0, 1], num_steps, guidance, "bdia_ddim", gamma, return_pair=True)
    denoiser = sd64.denoiser(guidance)
    cond = {"encoder_hidden_states": sd64.encode_prompts(PROMPTS)}
    with torch.no_grad():
        noise_pair = bdia.invert(denoiser, pair, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
        again = bdia.sample(denoiser, noise_pair, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond, return_pair=True)
    x_init = z_to_x(initial_latents([0, 1]), sigmas[0])
    error_noise = relative_error(noise_pair.x_end, x_init)
    error_data = relative_error(x_to_z(again.x_end, sigmas[-1]), x_to_z(pair.x_end, sigmas[-1]))
    assert error_noise <= 1e-10 and error_data <= 1e-10, (gamma, error_noise, error_data)


def test_bdia_round_trip_in_float32(tiny_sd):
    """float32 networks with the default float64 state are exact too (the network is only evaluated, never
    inverted); a float32 state carries float32 round-off amplified by ~1/gamma per step (figure recorded)."""
    num_steps, guidance, gamma = 10, 3.0, 0.95
    pair, sigmas, _ = our_sample(tiny_sd, PROMPTS, [0, 1], num_steps, guidance, "bdia_ddim", gamma, return_pair=True)
    denoiser = tiny_sd.denoiser(guidance)
    cond = {"encoder_hidden_states": tiny_sd.encode_prompts(PROMPTS)}
    x_init = z_to_x(initial_latents([0, 1]), sigmas[0])
    with torch.no_grad():
        back64 = bdia.invert(denoiser, pair, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
        pair32 = bdia.sample(denoiser, x_init.float(), sigmas, solver="bdia_ddim", gamma=gamma, cond=cond, return_pair=True)
        back32 = bdia.invert(denoiser, pair32, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
    error64 = relative_error(back64.x_end, x_init)
    error32 = relative_error(back32.x_end, x_init)
    print(f"round trip, gamma={gamma}, N={num_steps}: float32 network + float64 state {error64:.1e}; "
          f"float32 state {error32:.1e}")
    assert error64 <= 1e-10
    assert error32 <= 1e-4


# --------------------------------------------------------------------------------------------------
# Offline failures.


def test_offline_hub_model_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        load_sd("sd15")
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert elapsed < 15, elapsed  # no retry loop (huggingface_hub's takes tens of seconds); generous for busy CPUs
    assert "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert str(tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5") in message
    assert "model.path=" in message and "HF_HUB_OFFLINE" in message


def test_unreachable_hub_fails_at_once_without_download_retries(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("BDIA_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sdmod, "hub_reachable", lambda timeout=3.0: "cannot reach huggingface.co (test)")
    calls = []
    real = sdmod._load_components
    monkeypatch.setattr(sdmod, "_load_components", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(AssetUnavailableError, match="unreachable.*cannot reach huggingface.co") as info:
        load_sd("sd21_base")
    assert calls == [{"local_files_only": True}]  # no online attempt
    assert SD_MODELS["sd21_base"] in str(info.value) and "model.path=" in str(info.value)


def test_bad_names_and_paths_give_one_clear_error(tmp_path):
    with pytest.raises(AssetUnavailableError, match="no such folder") as info:
        load_sd(path=tmp_path / "missing")
    assert "model.path" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetUnavailableError, match="not a complete Stable Diffusion diffusers folder"):
        load_sd(path=tmp_path / "empty")
    with pytest.raises(ValueError, match="neither one of sd15, sd14, sd21_base nor a Hub id"):
        load_sd("sd99")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_sd(path=tmp_path / "empty", dtype="float8")


def test_container_holds_no_solver_state(tiny_sd):
    assert isinstance(tiny_sd, StableDiffusion)
    assert not any(isinstance(v, torch.Tensor) and v.ndim == 4 for v in vars(tiny_sd).values())


def test_sample_app_points_stable_diffusion_models_to_text2image():
    from bdia.models import load_model

    with pytest.raises(ValueError, match="scripts/text2image.py"):
        load_model({"_target_": "bdia.networks.sd.load_sd", "name": "sd15", "path": None, "dtype": "float32"})
