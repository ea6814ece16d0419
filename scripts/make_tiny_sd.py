"""Write a tiny random Stable Diffusion as a local diffusers folder (no download), for offline runs of
``scripts/text2image.py model=tiny-sd`` and ``scripts/edit.py model=tiny-sd``.

    python scripts/make_tiny_sd.py                      # -> results/tiny_sd (what configs/sd/model/tiny-sd.yaml reads)
    python scripts/make_tiny_sd.py /tmp/my_tiny_sd --seed 1 --sample-size 64
    python scripts/make_tiny_sd.py results/tiny_sd --clip results/tiny_clip   # + a tiny random CLIP (CLIP-score plumbing)
    python scripts/text2image.py model=tiny-sd device=cpu seeds=0-3

The folder holds a random UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer built from a
locally written vocabulary and a DDIMScheduler with Stable Diffusion's settings
(:func:`bdia.testing.build_tiny_sd`); deterministic given the seed. Its images are noise-like: it exercises
the code paths, not image quality.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="results/tiny_sd", help="folder to write (default results/tiny_sd)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--sample-size", type=int, default=32, help="image side in pixels, a multiple of 8 (default 32)")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="also write a tiny random CLIP model here (for metrics=clip metrics.clip.path=DIR offline)")
    args = parser.parse_args(argv)
    from bdia.testing import build_tiny_clip, build_tiny_sd

    started = time.perf_counter()
    try:
        path = build_tiny_sd(args.out_dir, seed=args.seed, sample_size=args.sample_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote a tiny Stable Diffusion folder to {path} in {time.perf_counter() - started:.1f} s "
          f"(use model=tiny-sd, or model.path={path})")
    if args.clip:
        clip = build_tiny_clip(args.clip, image_size=args.sample_size)
        print(f"wrote a tiny random CLIP model to {clip} (metrics.clip.path={clip}); its scores carry no meaning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
