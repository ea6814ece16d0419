"""The web demo's numbers on the tiny random models: :func:`bdia.apps.demo.invert_photo` and two
:func:`bdia.apps.demo.edit_photo` calls (strength 1 and 0.5) on each model, with every comparison method of that
model's kind, as the page would run them.

    make tiny-sd tiny-flow && python benchmarks/demo_roundtrip.py            # prints a table
    python benchmarks/demo_roundtrip.py --models tiny-flux --steps 50 --size 32

A benchmark, not a test (tests/apps/test_demo.py asserts the properties at N = 4..10). scikit-learn's china.jpg at
``--size`` pixels, the models' default guidance (SD 7.5, SD3 7.0, FLUX.1-dev's embedding 3.5), gamma 0.96, float64
states beside float32 networks, one CPU thread. The error is the latent round trip ``|z_rec - z0| / |z0|``
(relative Frobenius norm, the page's "latent round-trip error").
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

SOURCE, EDIT = "a photo of a chinese temple", "a watercolor painting of a chinese temple"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sd3", "tiny-flux"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from bdia.apps.demo import Models, compare_methods, edit_photo, invert_photo, model_configs
    from bdia.download import AssetUnavailableError

    models = Models(model_configs(), args.models[0], image_size=args.size)
    print(f"china.jpg at {args.size} px, N = {args.steps}, gamma 0.96, {args.threads} thread(s)")
    print("| model | method | latent round trip (relative) | NFE invert / reconstruct | NFE edit s=1 | NFE edit s=0.5 |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        try:
            session = invert_photo(models, "china.jpg", name, SOURCE, num_steps=args.steps, gamma=0.96,
                                   compare=list(compare_methods(models.is_flow(name))))
        except (AssetUnavailableError, ValueError) as e:  # loaded on first use: a missing model ends here
            print(f"error: {str(e).splitlines()[0]} (make tiny-sd tiny-flow writes the tiny models)", file=sys.stderr)
            return 1
        edit_photo(models, session, EDIT, 1.0)
        edit_photo(models, session, EDIT, 0.5)
        full, half = session.edits
        for method, n in session.numbers.items():
            half_nfe = "-" if method not in half["costs"] else (
                f"{half['costs'][method]['nfe']} (+{half['prefix_cost']['nfe']} once)" if half["prefix_cost"]
                else str(half["costs"][method]["nfe"]))
            print(f"| {name} (guidance {session.guidance_scale:g}) | {session.label(method)} "
                  f"| {n['latent_relative_error']:.2g} | {n['nfe_inversion']} / {n['nfe_reconstruction']} "
                  f"| {full['costs'][method]['nfe']} | {half_nfe} |")
    print(f"demo_roundtrip: {len(args.models)} model(s), N = {args.steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
