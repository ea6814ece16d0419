"""Shared Stable Diffusion test helpers: prompts, the diffusers-style initial latents, our sampling loop and a
relative error. The tiny random SD folder and its loaded model are the session fixtures ``tiny_sd_dir`` and
``tiny_sd`` of ``tests/conftest.py``."""

from __future__ import annotations

import torch

import bdia
from bdia.networks.sd import z_to_x  # noqa: F401
from bdia.testing import build_tiny_clip  # noqa: F401  (re-exported for tests)

#: Prompts used across SD tests (the tiny tokenizer knows bytes and a few merges; any text works).
PROMPTS = ["a photo of the cat", "an oil painting of a mountain lake"]


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


