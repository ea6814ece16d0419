"""Measured cost and reconstruction error of real-image inversion: DDIM inversion, BDIA-DDIM (several gamma),
EDICT and null-text inversion, on one tiny Stable Diffusion, in float64 and float32.

    .venv/bin/python benchmarks/editing_cost.py                      # -> results/editing/cost.{md,csv,png}
    .venv/bin/python benchmarks/editing_cost.py --num-steps 50 --guidance-scale 7.5 --repeats 1

For one image: encode scikit-learn's china.jpg with the tiny VAE, invert it under a source prompt, regenerate it
(:func:`bdia.apps.edit.invert_and_edit`, no edit prompt), and record the NFE counted by
:class:`bdia.denoisers.RowCountingDenoiser`, the network rows (a guided call on one image = 2 rows), backward passes
(null-text), wall and CPU time (fastest of ``--repeats`` interleaved runs, and as ratios to DDIM inversion +
regeneration with the same dtypes in the same run) and the latent round-trip error. Rows: network and solver state both float64, both float32,
and (DDIM, BDIA, EDICT) float32 network with float64 state -- scripts/edit.py's default.

The tiny model (:func:`bdia.testing.build_tiny_sd`, seed 0) has random weights: its errors show the methods'
numerics, not SD's image quality. Its VAE's latents have std ~0.04 where SD's scaled latents have std ~1, so the
encoded latent is rescaled to unit std before inversion (relative errors then read on SD's scale).
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bdia  # noqa: E402
from bdia.apps.edit import invert_and_edit, load_image  # noqa: E402
from bdia.inversion import latent_to_state, state_to_latent
from bdia.metrics.reconstruction import latent_metrics  # noqa: E402
from bdia.solvers import gamma_schedule, predicted_roundtrip_error  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/editing_cost.py"
GAMMAS = (0.92, 0.94, 0.96, 0.98, 1.0)
SOURCE_PROMPT = "a photo of a chinese temple"
CSV_FIELDS = ("method", "gamma", "p", "network_dtype", "state_dtype", "num_steps", "guidance_scale", "nfe_inversion",
              "nfe_reconstruction", "nfe_total", "network_rows_total", "backward_passes", "seconds_inversion",
              "seconds_reconstruction", "seconds_total", "time_vs_ddim", "cpu_seconds_total", "cpu_time_vs_ddim", "latent_relative_error",
              "latent_max_abs_error", "inner_steps")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def measure(sd, z0, args, network_dtype, state_dtype, runs):
    """Every method's row for one (network dtype, state dtype); ``runs`` lists (label, method, kwargs). The
    repeats go round-robin over the methods (load changes on a shared machine hit all of them alike); each phase
    keeps its fastest wall and CPU time."""
    sigmas = sd.sigmas(args.num_steps)
    x = latent_to_state(z0, sigmas).to(state_dtype)
    source, uncond = sd.encode_prompts([SOURCE_PROMPT]), sd.encode_prompts([""])
    base = sd.eps_denoiser()
    results = [[] for _ in runs]
    for _ in range(args.repeats):
        for i, (label, method, kwargs) in enumerate(runs):
            results[i].append(invert_and_edit(method, base, x, sigmas, source, uncond, None, args.guidance_scale,
                                                  num_inner_steps=args.num_inner_steps, **kwargs))
    rows = []
    for (label, method, kwargs), repeats in zip(runs, results):
        result = repeats[0]

        def fastest(phase, key):
            return min(r.cost[phase][key] for r in repeats)

        err = latent_metrics(state_to_latent(x, sigmas), state_to_latent(result.reconstruction, sigmas), per_image=False)
        c_inv, c_rec = result.cost["inversion"], result.cost["reconstruction"]
        rows.append({
            "method": label, "gamma": kwargs.get("gamma", ""), "p": 0.93 if method == "edict" else "",
            "network_dtype": _dtype_name(network_dtype), "state_dtype": _dtype_name(state_dtype),
            "num_steps": args.num_steps, "guidance_scale": args.guidance_scale,
            "nfe_inversion": c_inv["nfe"], "nfe_reconstruction": c_rec["nfe"], "nfe_total": c_inv["nfe"] + c_rec["nfe"],
            "network_rows_total": c_inv["network_rows"] + c_rec["network_rows"],
            "backward_passes": c_inv["backward_passes"],
            "seconds_inversion": fastest("inversion", "seconds"), "seconds_reconstruction": fastest("reconstruction", "seconds"),
            "seconds_total": fastest("inversion", "seconds") + fastest("reconstruction", "seconds"),
            "cpu_seconds_total": fastest("inversion", "cpu_seconds") + fastest("reconstruction", "cpu_seconds"),
            "latent_relative_error": err["relative_error"], "latent_max_abs_error": err["max_abs_error"],
            "inner_steps": sum(result.settings.get("inner_steps", [])) or "",
        })
    ddim = next(r for r in rows if r["method"] == "ddim")
    for r in rows:
        r["time_vs_ddim"] = r["seconds_total"] / ddim["seconds_total"]
        r["cpu_time_vs_ddim"] = r["cpu_seconds_total"] / ddim["cpu_seconds_total"]
    return rows


def all_runs(gammas):
    bdia_runs = [("bdia", "bdia", {"gamma": g}) for g in gammas]
    return ([("ddim", "ddim", {}), ("ddim_w1", "ddim", {"ddim_inversion_guidance": 1.0})] + bdia_runs
            + [("edict", "edict", {}), ("null_text", "null_text", {})]), [("ddim", "ddim", {})] + bdia_runs + [("edict", "edict", {})]


def _fmt(value, digits=3):
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if value != 0 else "0"
    return str(value)


def summary(rows, budget: int) -> list[str]:
    """What the table shows, with the numbers read from it (float64 network and state unless said)."""
    def pick(method, net="float64", state="float64"):
        return [r for r in rows if r["method"] == method and r["network_dtype"] == net and r["state_dtype"] == state]

    def worst(method, net="float64", state="float64"):
        return max(r["latent_relative_error"] for r in pick(method, net, state))

    ddim, ddim_w1, null_text = (pick(m)[0] for m in ("ddim", "ddim_w1", "null_text"))
    edict = pick("edict")[0]
    out = [
        f"* Exact methods: BDIA's round trip errs by at most {worst('bdia'):.1e} (relative, float64, every gamma) and "
        f"EDICT's by {worst('edict'):.1e}; with a float32 network and a float64 state by {worst('bdia', 'float32', 'float64'):.1e} "
        f"and {worst('edict', 'float32', 'float64'):.1e} (regeneration feeds the network the states inversion fed it, so the "
        f"same noise estimates come back); all-float32 by {worst('bdia', 'float32', 'float32'):.1e} and "
        f"{worst('edict', 'float32', 'float32'):.1e}.",
        f"* Cost: BDIA makes {pick('bdia')[0]['nfe_total']} calls for inversion + regeneration (DDIM: {ddim['nfe_total']}), "
        f"EDICT {edict['nfe_total']}, null-text {null_text['nfe_total']} forward calls plus {null_text['backward_passes']} "
        f"backward passes; wall time {edict['time_vs_ddim']:.1f}x and {null_text['time_vs_ddim']:.1f}x DDIM's "
        "(ratios within this run; expect +-20% from the shared machine).",
        f"* Approximate methods: DDIM inversion errs by {ddim['latent_relative_error']:.2g} at guidance {ddim['guidance_scale']}, "
        f"{ddim_w1['latent_relative_error']:.2g} when inverted at guidance 1 (null-text's pivot); null-text inversion "
        f"{'reduces' if null_text['latent_relative_error'] < ddim_w1['latent_relative_error'] else 'does not reduce'} "
        f"its pivot's error to {null_text['latent_relative_error']:.2g}"
        + (f", though not below DDIM inverted at the reconstruction's guidance ({ddim['latent_relative_error']:.2g})"
           if null_text["latent_relative_error"] >= ddim["latent_relative_error"] else "")
        + "."
        + (" On this random model the errors are O(1): its noise estimates change fast with the latent, so "
           "DDIM inversion's eps(z_k) ~ eps(z_(k-1)) is poor." if ddim["latent_relative_error"] > 0.1 else "")
        + (" Null-text's per-step optimisation used its whole iteration budget at every step (it never reached its "
           "loss target)." if null_text["inner_steps"] == null_text["num_steps"] * budget else ""),
    ]
    return out


def write_outputs(rows, args, out_dir: Path, wall: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    lines = [
        "# Real-image inversion: cost and round-trip error (tiny Stable Diffusion)",
        "",
        f"Generated by `{COMMAND}` with `--num-steps {args.num_steps} --guidance-scale {args.guidance_scale} "
        f"--num-inner-steps {args.num_inner_steps} --repeats {args.repeats}`; do not edit by hand. Raw numbers: "
        "`cost.csv`; plot: `roundtrip_vs_gamma.png`.",
        f"Run: {wall:.1f} s wall time; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} torch thread(s), CPU ({platform.machine()}).",
        "",
        "## Setup",
        "",
        "* Model: `bdia.testing.build_tiny_sd(seed=0)` (random weights: UNet2DConditionModel 16/32 channels, "
        "8x8x4 latents, tiny VAE and CLIP text encoder), SD's scheduler settings, DDIM grid `sd.sigmas(N)` "
        "(leading spacing, last level sigma ~0.0292).",
        f"* One image: scikit-learn's `china.jpg`, centre-cropped to 32x32, encoded by the tiny VAE, the latent rescaled "
        f"to unit std (SD's scale; the tiny VAE's is ~0.04). Source prompt \"{SOURCE_PROMPT}\", guidance "
        f"{args.guidance_scale} (empty-prompt unconditional half), N = {args.num_steps} steps, full strength.",
        "* Inversion + regeneration of that one image per method (`bdia.apps.edit.invert_and_edit`). NFE = network calls "
        "counted by `RowCountingDenoiser` (a guided call, batched over both halves, counts 1; so does an unguided "
        "call); `rows` = batch rows the UNet ran (a guided call on one image = 2). Null-text's backward passes are "
        "counted separately (each costs about two forward passes); Adam learning rate 1e-2 decayed 1% per step, "
        f"at most {args.num_inner_steps} iterations per step, early stop at a latent MSE of 1e-5 + 2e-5 k (the "
        "authors' settings).",
        "* `ddim`: DDIM inversion and regeneration at the same guidance; `ddim_w1`: inversion at guidance 1 (null-text's "
        "pivot), regeneration at the guidance above -- the baseline null-text corrects. BDIA's inversion starts with "
        "one approximate DDIM step and regenerates from the pair (so N + (N - 1) calls); EDICT takes 2 calls per step.",
        "* Error: latent round trip `||z_rec - z0|| / ||z0||` and max |z_rec - z0| (float64 arithmetic on the results).",
        f"* Time: fastest of {args.repeats} runs per phase (the runs interleaved over methods) on a 2-core CPU shared "
        "with other jobs, one torch thread; `seconds` is wall time, `CPU` this process's CPU time (steadier under "
        "load). The ratios divide by DDIM's inversion + regeneration with the same dtypes in the same run; they are "
        "the portable numbers.",
        "",
        "## Results",
        "",
        "| method | gamma | network / state dtype | NFE inv + rec | rows | backward | seconds | wall vs ddim | "
        "CPU vs ddim | latent rel. error | max abs error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['gamma'])} | {r['network_dtype']} / {r['state_dtype']} | "
            f"{r['nfe_inversion']} + {r['nfe_reconstruction']} = {r['nfe_total']} | {r['network_rows_total']} | "
            f"{r['backward_passes'] or 0} | {_fmt(r['seconds_total'])} | {_fmt(r['time_vs_ddim'], 2)} | "
            f"{_fmt(r['cpu_time_vs_ddim'], 2)} | "
            f"{_fmt(r['latent_relative_error'])} | {_fmt(r['latent_max_abs_error'])} |")
    lines += ["", *summary(rows, args.num_inner_steps), ""]
    (out_dir / "cost.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (net, state), marker in ((("float64", "float64"), "o"), (("float32", "float32"), "s"), (("float32", "float64"), "^")):
        pts = [(r["gamma"], r["latent_relative_error"]) for r in rows
               if r["method"] == "bdia" and r["network_dtype"] == net and r["state_dtype"] == state]
        if pts:
            g, e = zip(*pts)
            ax.semilogy(g, [max(v, 1e-18) for v in e], marker=marker, label=f"BDIA, network {net} / state {state}")
    grid = bdia.vp_sigmas(bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012), args.num_steps, "leading", 1, False)
    gs = [0.9 + 0.1 * i / 40 for i in range(41)]
    for dtype, style in ((torch.float64, ":"), (torch.float32, "--")):
        model = [predicted_roundtrip_error(gamma_schedule(g, grid, "bdia_ddim"), dtype) for g in gs]
        ax.semilogy(gs, model, style, color="gray", label=f"round-off model eps({_dtype_name(dtype)}) prod 1/gamma")
    ax.set_xlabel("gamma")
    ax.set_ylabel("latent round-trip relative error")
    ax.set_title(f"BDIA-DDIM invert -> regenerate, tiny SD, N = {args.num_steps}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "roundtrip_vs_gamma.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--num-inner-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results" / "editing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from bdia.networks.sd import load_sd
    from bdia.testing import build_tiny_sd

    start = time.perf_counter()
    everything, exact_only = all_runs(args.gammas)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd(Path(tmp) / "tiny-sd", seed=0, sample_size=32)
        sd = load_sd(path=folder, dtype=torch.float64)
        z0 = sd.encode_images(load_image("china.jpg", sd.image_size).to(torch.float64) / 127.5 - 1)
        z0 = z0 / z0.std()  # one latent for every row, on SD's scale
        for network_dtype, state_dtype, runs in ((torch.float64, torch.float64, everything),
                                                 (torch.float32, torch.float32, everything),
                                                 (torch.float32, torch.float64, exact_only)):
            sd = load_sd(path=folder, dtype=network_dtype)
            rows += measure(sd, z0, args, network_dtype, state_dtype, runs)
    write_outputs(rows, args, args.out_dir, time.perf_counter() - start)
    print(f"wrote {args.out_dir / 'cost.md'}, cost.csv, roundtrip_vs_gamma.png")


if __name__ == "__main__":
    main()
