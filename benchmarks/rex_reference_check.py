"""bdia.rex against Rex's reference implementation (zblasingame/Rex-solver, MIT), a few steps in float64.

    python benchmarks/rex_reference_check.py --rex-repo /path/to/Rex-solver

Not vendored and not run by the test suite (no network here); this script imports ``RexTorchdynWrapper`` from a
checkout of that repository (``image-experiments/samplers/rex.py``). Both solvers integrate the same VP model: a
Gaussian mixture written as a noise-prediction network ``eps(t, x_vp)`` on DDPM's linear-beta schedule in the
reference's continuous time ``t`` (``alpha_t = exp(-(b1 - b0) t^2 / 4 - b0 t / 2)``). The reference steps uniformly
in ``t``; bdia.rex gets the EDM sigmas ``sigma_t / alpha_t`` of the same ``t``'s (its own grid plus one level for its
last half step). Printed: the largest relative difference of ``x`` and ``x_hat`` after the forward steps, and of the
reference's own backward solve from there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import bdia  # noqa: E402
from bdia.rex import TABLEAUS, _Rex, rex  # noqa: E402

F64 = torch.float64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rex-repo", required=True, help="a checkout of github.com/zblasingame/Rex-solver")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    experiments = Path(args.rex_repo) / "image-experiments"
    if not (experiments / "samplers" / "rex.py").is_file():
        print(f"error: no image-experiments/samplers/rex.py under {args.rex_repo}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(experiments))
    from diffusers import DDPMScheduler
    from samplers.rex import RexTorchdynWrapper

    torch.set_default_dtype(F64)
    scheduler = DDPMScheduler(beta_schedule="linear")
    scheduler.betas = scheduler.betas.double()
    b0, b1 = scheduler.betas[0] * 1000, scheduler.betas[-1] * 1000
    generator = torch.Generator().manual_seed(0)
    mixture = bdia.GaussianMixtureDenoiser(torch.randn(3, 2, 4, 4, generator=generator, dtype=F64), [0.3, 0.5, 0.4])

    def alpha_of(t):
        return torch.exp(-(b1 - b0) / 4 * t**2 - b0 / 2 * t)

    def sigma_of(t):
        return torch.sqrt(1 - alpha_of(t) ** 2)

    def eps_model(t, x_vp):  # the mixture as a VP noise-prediction network
        sigma = (sigma_of(t) / alpha_of(t)).reshape(())
        x = x_vp / alpha_of(t)
        return (x - mixture(x, sigma)) / sigma

    t0, t1 = 0.95, 0.3
    ts = torch.linspace(t0, t1, args.steps + 1, dtype=F64)
    print(f"{args.steps} steps, t {t0} -> {t1} (sigma {float(sigma_of(ts[0]) / alpha_of(ts[0])):.3g} -> "
          f"{float(sigma_of(ts[-1]) / alpha_of(ts[-1])):.3g}), float64")
    print("| tableau | zeta | x: max rel. diff | x_hat: max rel. diff | reference round trip |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for tableau in TABLEAUS:
        for zeta in (0.999, 0.9):
            reference = RexTorchdynWrapper(eps_model, tableau=tableau, n_steps=args.steps, schedule="vp",
                                           prediction_type="data", model_type="noise", zeta=zeta, scheduler=scheduler,
                                           sched_type="linear", eps=1e-12)
            x_vp = torch.randn(2, 2, 4, 4, generator=generator, dtype=F64) * sigma_of(ts[0])
            x_ref, x_hat_ref = reference.forward_solve(x_vp.clone(), x_vp.clone(), torch.tensor([t0, t1], dtype=F64))
            back, _ = reference.backward_solve(x_ref.clone(), x_hat_ref.clone(), torch.tensor([t1, t0], dtype=F64))
            sigmas = sigma_of(ts) / alpha_of(ts)
            grid = torch.cat([sigmas, sigmas[-1:] / 2])  # + one level for bdia.rex's last half step
            x_end, x_hat = rex(mixture, x_vp / alpha_of(ts[0]), grid, tableau=tableau, zeta=zeta)
            # undo the half step to get x at the last common level (its formula, bdia.rex module notes)
            half = _Rex(mixture, grid, x_end, TABLEAUS[tableau], None, None)
            x = (x_end - (1 - zeta) * x_hat - half.last_increment(x_hat, args.steps)) / zeta
            a_end = alpha_of(ts[-1])
            diff_x = float((x * a_end - x_ref).abs().max() / x_ref.abs().max())
            diff_hat = float((x_hat * a_end - x_hat_ref).abs().max() / x_hat_ref.abs().max())
            trip = float((back - x_vp).abs().max() / x_vp.abs().max())
            worst = max(worst, diff_x, diff_hat)
            print(f"| {tableau} | {zeta} | {diff_x:.1e} | {diff_hat:.1e} | {trip:.1e} |")
    print(f"largest relative difference: {worst:.1e}")
    return 0 if worst < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
