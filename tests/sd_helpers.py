"""Shared Stable Diffusion test helpers: the tiny random SD folder, built once per test session.

Use in a test module:

    from sd_helpers import tiny_sd_dir, tiny_sd  # noqa: F401  (fixtures)

``tiny_sd_dir`` is a session fixture: the folder is written once (a few seconds) into pytest's temporary
directory and shared by every module that imports it (or by all tests, once ``tests/conftest.py`` registers
this module with ``pytest_plugins = ["sd_helpers"]``). ``tiny_sd`` loads it (float32, CPU) once per session;
tests must not modify its modules (load your own with ``load_sd(path=tiny_sd_dir, dtype=...)`` for another
dtype).
"""

from __future__ import annotations

import pytest
import torch

import bdia
from bdia.networks.sd import z_to_x  # noqa: F401
from bdia.testing import build_tiny_clip  # noqa: F401  (re-exported for tests)

#: Prompts used across SD tests (the tiny tokenizer knows bytes and a few merges; any text works).
PROMPTS = ["a photo of the cat", "an oil painting of a mountain lake"]


_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Path of a tiny random SD diffusers folder (:func:`bdia.testing.build_tiny_sd`, seed 0, 32x32 pixels,
    8x8x4 latents). Built once per session even when several modules import the fixture (pytest would otherwise
    make one per importing module)."""
    if "dir" not in _CACHE:
        from bdia.testing import build_tiny_sd

        _CACHE["dir"] = build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", seed=0, sample_size=32)
    return _CACHE["dir"]


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """:class:`bdia.networks.sd.StableDiffusion` loaded from ``tiny_sd_dir`` (float32, CPU), once per session."""
    if "sd" not in _CACHE:
        from bdia.networks.sd import load_sd

        _CACHE["sd"] = load_sd(path=tiny_sd_dir, dtype=torch.float32)
    return _CACHE["sd"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def initial_latents(seeds, shape=(4, 8, 8)):
    """What diffusers draws with generator=[Generator().manual_seed(s) ...]: one float32 unit normal per row."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def our_sample(sd, prompts, seeds, num_steps, guidance_scale, solver="ddim", gamma=None, return_pair=False):
    """Our loop on ``sd.sigmas(num_steps)`` from diffusers' initial latents for ``seeds`` (x = z / alpha):
    returns ``(x_end or the pair, sigmas, measured NFE)``."""
    sigmas = sd.sigmas(num_steps)
    x_init = z_to_x(initial_latents(seeds, sd.latent_shape()), sigmas[0])
    counted = bdia.CountingDenoiser(sd.denoiser(guidance_scale))
    with torch.no_grad():
        out = bdia.sample(counted, x_init, sigmas, solver=solver, gamma=gamma, return_pair=return_pair,
                          cond={"encoder_hidden_states": sd.encode_prompts(prompts)})
    return out, sigmas, counted.nfe


