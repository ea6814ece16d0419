"""Shared Stable Diffusion test helpers: the tiny random SD folder, built once per test session.

Use in a test module:

    from sd_helpers import tiny_sd_dir, tiny_sd  # noqa: F401  (fixtures)

``tiny_sd_dir`` is a session fixture: the folder is written once (a few seconds) into pytest's temporary
directory and shared by every module that imports it. ``tiny_sd`` loads it (float32, CPU) once per session;
tests must not modify its modules (load your own with ``load_sd(path=tiny_sd_dir, dtype=...)`` for another
dtype).
"""

from __future__ import annotations

import pytest
import torch

#: Prompts used across SD tests (the tiny tokenizer knows bytes and a few merges; any text works).
PROMPTS = ["a photo of the cat", "an oil painting of a mountain lake"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Path of a tiny random SD diffusers folder (:func:`bdia.networks.sd.build_tiny_sd`, seed 0, 32x32 pixels,
    8x8x4 latents)."""
    from bdia.networks.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", seed=0, sample_size=32)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """:class:`bdia.networks.sd.StableDiffusion` loaded from ``tiny_sd_dir`` (float32, CPU)."""
    from bdia.networks.sd import load_sd

    return load_sd(path=tiny_sd_dir, dtype=torch.float32)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
