"""The shipped embedded digits model reproduces: a few seeds sampled now equal the images stored when the
weights were trained (tests/data/digits_expected.npz, written by running this file as a script).

Tolerance: on the platform that wrote the file (x86-64 CPU, 2 torch threads, the pinned torch) the uint8
images are expected to be identical; elsewhere float32 convolutions may round differently, so the test allows
float states within 1e-3 and uint8 pixels within one level, on at most 1% of the pixels.
"""

from pathlib import Path

import numpy as np
import torch

import bdia
from bdia.models import DIGITS_WEIGHTS, digits_network
from bdia.imageio import quantize

EXPECTED = Path(__file__).resolve().parents[1] / "data" / "digits_expected.npz"
SEEDS = list(range(8))


def sample_seeds(net, seeds=SEEDS, num_steps=18, gamma=0.5):
    latents = torch.stack([torch.randn([1, 16, 16], generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds])
    sigmas = bdia.karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0)
    # The formulation the stored images were made with (bdia_edm's default then): x-space, Euler backward map.
    return bdia.sample(net, latents * sigmas[0], sigmas, solver="bdia_edm", gamma=gamma, space="x", backward="euler")


def test_shipped_weights_reproduce_the_stored_images():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the setting that wrote the file
    try:
        stored = np.load(EXPECTED)
        states = sample_seeds(digits_network())
    finally:
        torch.set_num_threads(threads)
    images = quantize(states).numpy()
    np.testing.assert_allclose(states.numpy(), stored["states"], rtol=0, atol=1e-3)
    diff = np.abs(images.astype(int) - stored["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def test_shipped_weights_have_their_card_and_log():
    import json

    card = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    assert card["parameters"] == sum(p.numel() for p in digits_network().parameters())
    assert DIGITS_WEIGHTS.with_name("digits_edm_training_log.jsonl").is_file()
    assert DIGITS_WEIGHTS.stat().st_size < 5_000_000


if __name__ == "__main__":
    torch.set_num_threads(2)
    states = sample_seeds(digits_network())
    np.savez(EXPECTED, seeds=np.array(SEEDS), states=states.numpy().astype(np.float32), images=quantize(states).numpy())
    print(f"wrote {EXPECTED}")
