"""Write a tiny random Stable Diffusion 3 and a tiny random FLUX.1 as local diffusers folders (no download), for
offline runs and tests of the flow-matching code (``configs/flow/model/tiny-sd3.yaml`` / ``tiny-flux.yaml``).

    python scripts/make_tiny_flow.py                    # -> results/tiny_sd3, results/tiny_flux
    python scripts/make_tiny_flow.py --sd3 /tmp/sd3 --flux /tmp/flux --seed 1 --sample-size 64

SD3: a random SD3Transformer2DModel, an AutoencoderKL with SD3's latent shift and scale, two CLIP text encoders with
a locally written tokenizer, no T5 (SD3 allows it), FlowMatchEulerDiscreteScheduler(shift=3)
(:func:`bdia.testing.build_tiny_sd3`). FLUX: a random FluxTransformer2DModel with a guidance embedding, the VAE, CLIP
and a tiny T5 with a tokenizer built here, FLUX.1-dev's dynamically shifted scheduler (:func:`bdia.testing.build_tiny_flux`).
Deterministic given the seed; the images are noise-like: they exercise the code paths, not image quality.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd3", default="results/tiny_sd3", help="SD3 folder to write (default results/tiny_sd3)")
    parser.add_argument("--flux", default="results/tiny_flux", help="FLUX folder to write (default results/tiny_flux)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--sample-size", type=int, default=32, help="image side in pixels, a multiple of 8 (default 32)")
    args = parser.parse_args(argv)
    from bdia.testing import build_tiny_flux, build_tiny_sd3

    for name, build, out in (("Stable Diffusion 3", build_tiny_sd3, args.sd3), ("FLUX.1", build_tiny_flux, args.flux)):
        started = time.perf_counter()
        try:
            path = build(out, seed=args.seed, sample_size=args.sample_size)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote a tiny {name} folder to {path} in {time.perf_counter() - started:.1f} s (model.path={path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
