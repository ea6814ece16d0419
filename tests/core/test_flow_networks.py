"""bdia.networks.flow: loading SD3 / FLUX folders (tiny random ones written here), the registry failing offline in one
go, the container's grid (the pipelines' own), and exact float64 round trips through the solvers on both models."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler

import bdia
from bdia.download import AssetUnavailableError
from bdia.networks.flow import FLOW_MODELS, FlowModel, load_flow
from bdia.schedules import flow_time

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "flow" / "model"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model64(request, tiny_sd3_dir, tiny_flux_dir):
    return load_flow(path=tiny_sd3_dir if request.param == "sd3" else tiny_flux_dir, dtype=torch.float64)


def test_the_tiny_folders_load_as_their_family(model64):
    fm = model64
    assert isinstance(fm, FlowModel) and fm.family in ("sd3", "flux")
    assert fm.transformer.dtype == torch.float64 and fm.vae.dtype == torch.float64
    assert fm.latent_shape(32, 32) == (4, 16, 16) and fm.image_seq_len(32, 32) == 64
    assert fm.guidance == ("cfg" if fm.family == "sd3" else "embedded")
    with pytest.raises(ValueError, match="multiples"):
        fm.latent_shape(30, 32)


def test_the_grid_is_the_one_the_pipeline_runs(model64):
    fm = model64
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(fm.pipe.scheduler.config)
    if fm.family == "flux":  # FluxPipeline: custom linspace sigmas and mu from the token count
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 9, 9), mu=calculate_shift(64, 256, 4096, 0.5, 1.15))
    else:
        scheduler.set_timesteps(9)
    sigmas = fm.sigmas(9, 32, 32)
    assert sigmas[0] == math.inf and torch.equal(flow_time(sigmas).float(), scheduler.sigmas)


def test_images_encode_and_decode(model64):
    fm = model64
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = fm.encode_images(images)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float64
    decoded = fm.decode_latents(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    with pytest.raises(ValueError, match="3, H, W"):
        fm.encode_images(images[:, :1])


@pytest.mark.parametrize("gamma", [1.0, 0.96])
def test_a_photo_round_trips_exactly_with_n_network_calls(model64, gamma):
    fm = model64
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clean = fm.encode_images(images)
    cond = fm.encode_prompts(["a photo of a cat", "a red house"])
    sigmas = fm.sigmas(10, 32, 32)
    den = bdia.CountingDenoiser(fm.denoiser())
    calls = []
    handle = fm.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        pair = bdia.invert(den, clean, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
        assert den.nfe == len(calls) == 10  # N network calls for N steps (SD3's guided halves in one batch)
        again = bdia.sample(den, pair, sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
    finally:
        handle.remove()
    assert den.nfe == 19  # + N - 1 to regenerate: 2N - 1 in all
    assert (again - clean).abs().max() / clean.abs().max() <= 1e-10
    # the noise side is where pure noise lives: the pair's first state is at t = 1
    assert pair.x_end.shape == clean.shape and torch.isfinite(pair.x_end).all()


def test_guidance_and_conditioning(model64):
    fm = model64
    cond = fm.encode_prompts(["a photo of a cat"])
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    den = fm.denoiser()
    assert den.coordinates == "flow"
    if fm.family == "sd3":
        assert isinstance(den, bdia.ClassifierFreeGuidance) and den.guidance_scale == fm.default_guidance_scale
        assert not isinstance(fm.denoiser(guidance_scale=1.0), bdia.ClassifierFreeGuidance)
    else:
        assert not isinstance(den, bdia.ClassifierFreeGuidance)  # FLUX.1-dev: the scale is an embedding
        z = torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        sigma = torch.tensor(1.0, dtype=torch.float64)
        assert not torch.equal(fm.denoiser(2.0)(z, sigma, **cond), fm.denoiser(5.0)(z, sigma, **cond))
    with pytest.raises(ValueError, match="finite"):
        fm.denoiser(guidance_scale=math.nan)


@pytest.mark.parametrize("name", sorted(FLOW_MODELS))
def test_registry_checkpoints_fail_offline_at_once_naming_url_cache_and_key(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        load_flow(name)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    repo_id = FLOW_MODELS[name]["repo_id"]
    assert f"https://huggingface.co/{repo_id}" in message and "model.path" in message
    assert f"models--{repo_id.replace('/', '--')}" in message


def test_bad_paths_and_names(tmp_path, tiny_sd_dir):
    with pytest.raises(AssetUnavailableError, match="no such folder"):
        load_flow(path=tmp_path / "missing")
    with pytest.raises(AssetUnavailableError, match="SD3 / FLUX"):
        load_flow(path=tiny_sd_dir)  # a Stable Diffusion 1.x folder is not a flow model
    with pytest.raises(ValueError, match="Hub id"):
        load_flow("not-a-model")


def test_every_flow_model_config_names_the_loader_and_its_arguments():
    import inspect

    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert set(FLOW_MODELS) <= set(names) and {"tiny-sd3", "tiny-flux"} <= set(names)
    parameters = set(inspect.signature(load_flow).parameters)
    for name in names:
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert config.pop("_target_") == "bdia.networks.flow.load_flow"
        assert set(config) <= parameters, name
        assert config["name"] in FLOW_MODELS or config["path"], name
