"""Wall time of each BDIA solver relative to its base solver at equal NFE, with a small real network.

    make bench                           # = .venv/bin/python benchmarks/bench_solvers.py
    python benchmarks/bench_solvers.py --batch 4 --steps 10 --repeats 11 --device cpu --threads 1

A benchmark, not a test: it prints a table and writes ``<out-dir>/solver_overhead.{md,json}`` (default
``results/bench/``); it asserts nothing about speed. The issue's goal is a BDIA/base ratio <= 1.02.

Set-up: a randomly initialised diffusers ``UNet2DModel`` (eps prediction), wrapped in ``bdia.VPEpsDenoiser`` with
DDPM's linear alphas. Pairs compared at the same grid, hence the same NFE (counted with ``bdia.CountingDenoiser``):

* ``bdia_ddim`` (gamma 0.5) vs ``ddim`` on ``bdia.vp_sigmas(alphas, N)``;
* ``bdia_edm`` (gamma 0.5) vs ``edm`` on a Karras grid clipped to the model's sigma range.

Each repeat runs the two solvers of a pair back to back, alternating which goes first (ABBA...), and the
ratio reported is the median over repeats of the per-repeat ratio. The same runs with the UNet replaced by a
near-free model (``zeros_like``; the adapter and solver code unchanged) give the time spent outside the network.
Solver state is float64 (bdia's default); the network runs in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import bdia  # noqa: E402
from bdia.schedules import DDPM_SCHEDULE  # noqa: E402

COMMAND = "make bench  (= .venv/bin/python benchmarks/bench_solvers.py)"
GAMMA = 0.5
TARGET_RATIO = 1.02


@dataclass(frozen=True)
class Pair:
    """A base solver and its BDIA version, run on the same grid."""

    base: str
    bdia: str
    grid: str  # "vp" or "karras"


PAIRS = (Pair("ddim", "bdia_ddim", "vp"), Pair("edm", "bdia_edm", "karras"))


class ZeroEps(nn.Module):
    """A near-free stand-in for the network: predicts eps = 0 (so denoised = x)."""

    def forward(self, z, timestep, **cond):
        return torch.zeros_like(z)


def make_unet(image_size: int, seed: int) -> nn.Module:
    """A small UNet2DModel (about 1.1 M parameters at these widths), random weights from ``seed``."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval().requires_grad_(False)


def make_grid(kind: str, denoiser, alphas_cumprod, num_steps: int) -> torch.Tensor:
    if kind == "vp":
        return bdia.vp_sigmas(alphas_cumprod, num_steps)
    return bdia.karras_sigmas(num_steps, sigma_min=max(0.002, denoiser.sigma_min), sigma_max=min(80.0, denoiser.sigma_max))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gamma(solver: str):
    return GAMMA if solver in bdia.INVERTIBLE_SOLVERS else None  # base solvers take no gamma (gamma = 0)


def timed_sample(denoiser, latents, sigmas, solver: str, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for one full ``bdia.sample`` run, the device synchronised around it.

    The CPU time counts only this process, so on a shared CPU it is a cross-check less disturbed by other jobs."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    bdia.sample(denoiser, latents * sigmas[0], sigmas, solver=solver, gamma=_gamma(solver))
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def count_nfe(denoiser, latents, sigmas, solver: str) -> int:
    counter = bdia.CountingDenoiser(denoiser)
    bdia.sample(counter, latents * sigmas[0], sigmas, solver=solver, gamma=_gamma(solver))
    return counter.nfe


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(batch=4, steps=10, repeats=11, image_size=32, device="cpu", out_dir=REPO_ROOT / "results" / "bench", seed=0) -> dict:
    """Time every pair with the UNet and with the null network; write the markdown and JSON; return the results."""
    device = torch.device(device)
    alphas_cumprod = bdia.make_alphas_cumprod(**DDPM_SCHEDULE)
    networks = {
        "unet": bdia.VPEpsDenoiser(make_unet(image_size, seed), alphas_cumprod, model_dtype=torch.float32).to(device),
        "null": bdia.VPEpsDenoiser(ZeroEps(), alphas_cumprod, model_dtype=torch.float32).to(device),
    }
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, 3, image_size, image_size), generator=generator, dtype=torch.float64).to(device)

    results = []
    progress = tqdm(total=len(PAIRS) * repeats, desc="bench solvers", unit="repeat", dynamic_ncols=True)
    with torch.inference_mode():
        for pair in PAIRS:
            progress.set_postfix_str(f"{pair.bdia} vs {pair.base}")
            sigmas = make_grid(pair.grid, networks["unet"], alphas_cumprod, steps)
            nfe = {s: count_nfe(networks["unet"], latents, sigmas, s) for s in (pair.base, pair.bdia)}  # also warms up
            times = {(net, s): [] for net in networks for s in (pair.base, pair.bdia)}
            cpu_times = {key: [] for key in times}
            for r in range(repeats):
                order = (pair.base, pair.bdia) if r % 2 == 0 else (pair.bdia, pair.base)
                for net_name, denoiser in networks.items():
                    for solver in order:
                        wall, cpu = timed_sample(denoiser, latents, sigmas, solver, device)
                        times[net_name, solver].append(wall)
                        cpu_times[net_name, solver].append(cpu)
                progress.update()
            results.append(summarise(pair, sigmas, nfe, times, cpu_times))

    progress.close()
    report = {
        "command": COMMAND,
        "settings": {"batch": batch, "num_steps": steps, "repeats": repeats, "image_size": image_size, "gamma": GAMMA,
                     "seed": seed, "solver_dtype": "float64", "network_dtype": "float32"},
        "machine": machine_info(device),
        "target_ratio": TARGET_RATIO,
        "pairs": results,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "solver_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "solver_overhead.md").write_text(markdown(report))
    return report


def _ratios(times: dict, net: str, pair: Pair) -> list[float]:
    """Per-repeat BDIA / base time ratios."""
    return [b / a for a, b in zip(times[net, pair.base], times[net, pair.bdia])]


def summarise(pair: Pair, sigmas, nfe: dict, times: dict, cpu_times: dict) -> dict:
    """Medians per solver; the ratio is the median of per-repeat ratios BDIA / base (wall time unless named cpu)."""
    steps = len(sigmas) - 1
    ratios = _ratios(times, "unet", pair)
    null_ratios = _ratios(times, "null", pair)
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "base": pair.base,
        "bdia": pair.bdia,
        "gamma": GAMMA,
        "grid": pair.grid,
        "sigma_first": float(sigmas[0]),
        "sigma_last_positive": float(sigmas[-2]),
        "num_steps": steps,
        "nfe_base": nfe[pair.base],
        "nfe_bdia": nfe[pair.bdia],
        "ms_per_step_base": 1e3 * median["unet", pair.base] / steps,
        "ms_per_step_bdia": 1e3 * median["unet", pair.bdia] / steps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_time_ratio_median": statistics.median(_ratios(cpu_times, "unet", pair)),
        # The same runs with the null network: what the solver (and the eps adapter) cost by themselves.
        "null_ms_per_step_base": 1e3 * median["null", pair.base] / steps,
        "null_ms_per_step_bdia": 1e3 * median["null", pair.bdia] / steps,
        "null_ratio_median": statistics.median(null_ratios),
        "outside_network_share_base": median["null", pair.base] / median["unet", pair.base],
        "outside_network_share_bdia": median["null", pair.bdia] / median["unet", pair.bdia],
        "bdia_extra_ms_per_step": 1e3 * (median["null", pair.bdia] - median["null", pair.base]) / steps,
        # BDIA's extra solver work added to a base step: the ratio expected once timing noise is averaged out.
        "expected_ratio": 1 + (median["null", pair.bdia] - median["null", pair.base]) / median["unet", pair.base],
        "times_s": {f"{net}/{solver}": values for (net, solver), values in times.items()},
        "cpu_times_s": {f"{net}/{solver}": values for (net, solver), values in cpu_times.items()},
    }


TABLE_COLUMNS = (
    # (header, cell from one pair's results)
    ("BDIA solver (gamma)", lambda p: f"{p['bdia']} ({p['gamma']})"),
    ("base", lambda p: p["base"]),
    ("grid", lambda p: p["grid"]),
    ("steps", lambda p: str(p["num_steps"])),
    ("NFE base / BDIA", lambda p: f"{p['nfe_base']} / {p['nfe_bdia']}"),
    ("ms/step base", lambda p: f"{p['ms_per_step_base']:.2f}"),
    ("ms/step BDIA", lambda p: f"{p['ms_per_step_bdia']:.2f}"),
    ("ratio (median)", lambda p: f"**{p['ratio_median']:.3f}**"),
    ("ratio range", lambda p: f"{p['ratio_min']:.3f}–{p['ratio_max']:.3f}"),
    ("CPU-time ratio", lambda p: f"{p['cpu_time_ratio_median']:.3f}"),
    ("outside-network share base / BDIA",
     lambda p: f"{100 * p['outside_network_share_base']:.1f}% / {100 * p['outside_network_share_bdia']:.1f}%"),
    ("BDIA extra ms/step (null net)", lambda p: f"{p['bdia_extra_ms_per_step']:.3f}"),
    ("expected ratio", lambda p: f"{p['expected_ratio']:.4f}"),
)


def table(report: dict) -> list[str]:
    lines = [
        "| " + " | ".join(header for header, _ in TABLE_COLUMNS) + " |",
        "|---|---|---|" + "---:|" * (len(TABLE_COLUMNS) - 3),
    ]
    for p in report["pairs"]:
        lines.append("| " + " | ".join(cell(p) for _, cell in TABLE_COLUMNS) + " |")
    return lines


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    goal = report["target_ratio"]
    verdicts = [
        f"{p['bdia']}/{p['base']}: measured median ratio {p['ratio_median']:.3f} "
        f"({'within' if p['ratio_median'] <= goal else 'above'} the {goal} goal; per-repeat range "
        f"{p['ratio_min']:.3f}–{p['ratio_max']:.3f}). Timed with the null network, the BDIA step's extra solver work costs "
        f"{p['bdia_extra_ms_per_step']:.3f} ms per step (null-network run time {p['null_ratio_median']:.2f}x the base's) against "
        f"{p['ms_per_step_base']:.2f} ms per step in total, so the expected ratio is {p['expected_ratio']:.4f}"
        f" ({'within' if p['expected_ratio'] <= goal else 'above'} the goal)"
        for p in report["pairs"]
    ]
    machine = ", ".join(f"{k} {v}" for k, v in m.items())
    return f"""# BDIA solver overhead vs base solver (equal NFE)

Generated by `{report['command']}`; do not edit by hand. Raw times: `solver_overhead.json`.

Network: random-init diffusers `UNet2DModel` (block widths 32/64/64, one attention level, {s['image_size']}x{s['image_size']}x3),
eps prediction through `bdia.VPEpsDenoiser` with DDPM's linear alphas; network in {s['network_dtype']}, solver state
{s['solver_dtype']}. Batch {s['batch']}, {s['num_steps']} steps, gamma {s['gamma']}, {s['repeats']} interleaved repeats
(ABBA order), run under `torch.inference_mode()`.
`ddim`/`bdia_ddim` on `bdia.vp_sigmas(alphas, N)`; `edm`/`bdia_edm` on `bdia.karras_sigmas(N)` clipped to the
model's sigma range. "ratio" = median over repeats of (BDIA run time / base run time), wall clock; goal <=
{report['target_ratio']}. "CPU-time ratio": the same with this process's CPU time, less disturbed by other jobs on a
shared CPU (meaningless on CUDA, where the work is asynchronous).
"outside-network share" = run time with the UNet replaced by a `zeros_like` model / run time with the UNet.
"expected ratio" = 1 + (BDIA - base run time with that null network) / base run time with the UNet: BDIA's extra
solver work relative to a whole step, free of most of the timing noise that the measured ratio carries.

Machine: {machine}.

{chr(10).join(table(report))}

{chr(10).join(f"* {v}." for v in verdicts)}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps N (both solvers of a pair)")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repeats per solver")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU, oversubscribed threads make timings erratic)")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results" / "bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = run(batch=args.batch, steps=args.steps, repeats=args.repeats, image_size=args.image_size,
                 device=args.device, out_dir=args.out_dir)
    print("\n".join(table(report)))
    print(f"wrote {Path(args.out_dir) / 'solver_overhead.md'} (+ .json) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
