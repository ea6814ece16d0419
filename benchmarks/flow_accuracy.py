"""BDIA over flow Euler against flow Euler and flow Heun at equal NFE, on a rectified-flow Gaussian mixture, against
a high-accuracy reference solution of the flow ODE.

    make flow-accuracy                 # = .venv/bin/python benchmarks/flow_accuracy.py --out-dir results/local/flow
    make flow-accuracy REGENERATE=1    # the tracked results/flow/accuracy.{md,csv,png}
    python benchmarks/flow_accuracy.py --num-samples 256 --nfe 10 20 50 --out-dir /tmp/flow

The model is :class:`bdia.analytic.FlowGaussianMixture`: a mixture of isotropic Gaussians under the path
``x_t = (1 - t) x0 + t eps`` with its exact, non-linear velocity. Every solver starts from the same noise ``x_t`` at
``t = 1`` and runs on diffusers' ``FlowMatchEulerDiscreteScheduler`` grid (:func:`bdia.flow_sigmas`), unshifted
(``shift = 1``) and with SD3's ``shift = 3``; ``ddim`` is flow Euler, ``edm`` is flow Heun
(``FlowMatchHeunDiscreteScheduler``'s steps, Euler onto t = 0), ``bdia_ddim`` is BDIA over flow Euler in ``x_t``.
The reference is scipy's DOP853 on ``dx_t/dt = v(x_t, t)`` from t = 1 to 0 with a closed-form velocity written here
in numpy (checked against the model, sharing none of bdia's solver code).

Writes ``<out-dir>/accuracy.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import bdia  # noqa: E402
from bdia.analytic import FlowGaussianMixture  # noqa: E402

COMMAND = "make flow-accuracy REGENERATE=1  (= .venv/bin/python benchmarks/flow_accuracy.py --out-dir results/flow)"

NUM_COMPONENTS = 4
EVENT_SHAPE = (1, 4, 4)
COMPONENT_STDS = (0.5, 0.6, 0.7, 0.8)
REFERENCE_RTOL = 1e-12
CHECK_RTOL = 1e-10
DEFAULT_NFE_TARGETS = (10, 20, 50, 100, 200, 400)
#: The budgets the measured order is fitted over (before the last step's floor, see ``findings``).
ORDER_TARGETS = (20, 50, 100)
GRIDS = {"unshifted": dict(shift=1.0), "shift 3 (SD3)": dict(shift=3.0)}
CSV_FIELDS = ("grid", "solver", "gamma", "num_steps", "nfe", "rms_error", "max_abs_error")


@dataclass(frozen=True)
class SolverConfig:
    solver: str
    gamma: float | str | None = None

    @property
    def label(self) -> str:
        names = {"ddim": "flow Euler", "edm": "flow Heun", "bdia_ddim": "BDIA-flow", "bdia_edm": "BDIA-flow-Heun"}
        name = names[self.solver]
        return name if self.gamma is None else f"{name} γ={self.gamma}"

    @property
    def is_base(self) -> bool:
        return self.gamma is None

    def nfe(self, num_steps: int) -> int:
        return num_steps if self.solver in ("ddim", "bdia_ddim") else 2 * num_steps - 1

    def steps_for(self, nfe_target: int) -> int:
        num_steps = 2
        while self.nfe(num_steps + 1) <= nfe_target:
            num_steps += 1
        return num_steps


SOLVER_CONFIGS = (
    SolverConfig("ddim"),
    SolverConfig("bdia_ddim", 0.5),
    SolverConfig("bdia_ddim", 1.0),
    SolverConfig("bdia_ddim", "obelm"),
    SolverConfig("edm"),
    SolverConfig("bdia_edm", 0.5),
)


# --------------------------------------------------------------------------------------------------
# Problem and reference.


def make_problem(num_samples: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn((NUM_COMPONENTS, *EVENT_SHAPE), generator=generator, dtype=torch.float64)
    model = FlowGaussianMixture(means, torch.tensor(COMPONENT_STDS, dtype=torch.float64))
    noise = torch.randn((num_samples, *EVENT_SHAPE), generator=generator, dtype=torch.float64)
    return model, noise


class FlowVelocity:
    """``dx_t/dt`` of the mixture under ``x_t = (1 - t) x0 + t eps``, in numpy on flattened states: with ``a = 1 - t``,
    ``q_k = a^2 s_k^2 + t^2`` and ``r_k ∝ w_k N(x_t; a mu_k, q_k I)``,
    ``v = sum_k r_k [(t - a s_k^2) / q_k (x_t - a mu_k) - mu_k]``."""

    def __init__(self, model: FlowGaussianMixture):
        self.means = model.means.reshape(NUM_COMPONENTS, -1).numpy()
        self.variances = (model.stds**2).numpy()
        self.log_weights = model.weights.log().numpy()
        self.dim = self.means.shape[1]

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        a = 1.0 - t
        diff = y.reshape(-1, 1, self.dim) - a * self.means  # [B, K, dim]
        q = a**2 * self.variances + t**2
        log_resp = self.log_weights - 0.5 * (diff**2).sum(-1) / q - 0.5 * self.dim * np.log(q)
        log_resp -= log_resp.max(axis=1, keepdims=True)
        resp = np.exp(log_resp)
        resp /= resp.sum(axis=1, keepdims=True)
        per_component = ((t - a * self.variances) / q)[None, :, None] * diff - self.means[None]
        return (resp[:, :, None] * per_component).sum(axis=1).ravel()


def check_velocity(velocity: FlowVelocity, model, noise) -> None:
    for t in (1.0, 0.7, 0.2, 0.0):
        z = noise * t + (1 - t) * model.means[0]
        ours = model(z, torch.tensor(bdia.flow_sigma(t), dtype=torch.float64))
        gap = np.abs(ours.reshape(-1).numpy() - velocity(t, z.reshape(-1).numpy())).max()
        if gap > 1e-10:
            raise AssertionError(f"reference velocity differs from the model's by {gap:.2e} at t={t}")


def reference_solution(velocity, noise, rtol):
    result = solve_ivp(velocity, (1.0, 0.0), noise.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=rtol)
    if not result.success:
        raise RuntimeError(f"reference ODE solve failed: {result.message}")
    return torch.from_numpy(result.y[:, -1].copy()).reshape(noise.shape), int(result.nfev)


def errors(x, x_ref) -> dict:
    err = (x - x_ref).reshape(x.shape[0], -1)
    return {"rms_error": float(err.square().mean().sqrt()), "max_abs_error": float(err.abs().max())}


def observed_order(rows) -> float:
    """Least-squares slope of -log(error) vs log(NFE) over the budgets :data:`ORDER_TARGETS` (all budgets when they
    are not all measured)."""
    data = [r for r in rows if r["nfe_target"] in ORDER_TARGETS]
    data = data if len(data) == len(ORDER_TARGETS) else rows
    if len(data) < 2:
        return float("nan")
    x = np.log([r["nfe"] for r in data])
    y = np.log([r["rms_error"] for r in data])
    return float(-np.polyfit(x, y, 1)[0])


def local_orders(rows) -> list[float]:
    """The slope between each pair of consecutive budgets."""
    return [math.log(a["rms_error"] / b["rms_error"]) / math.log(b["nfe"] / a["nfe"]) for a, b in zip(rows, rows[1:])]


# --------------------------------------------------------------------------------------------------
# The measurement.


def run(num_samples: int = 256, nfe_targets=DEFAULT_NFE_TARGETS, out_dir=REPO_ROOT / "results" / "flow", seed: int = 0,
        configs=SOLVER_CONFIGS) -> list[dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # batch x 16 tensors: threads only add synchronisation
    try:
        return _run(num_samples, tuple(sorted(nfe_targets)), Path(out_dir), seed, configs)
    finally:
        torch.set_num_threads(previous)


def _run(num_samples, nfe_targets, out_dir, seed, configs):
    start = time.perf_counter()
    model, noise = make_problem(num_samples, seed)
    velocity = FlowVelocity(model)
    check_velocity(velocity, model, noise)
    progress = tqdm(total=2 + len(GRIDS) * len(configs) * len(nfe_targets), desc="flow accuracy", dynamic_ncols=True)
    x_ref, ref_nfev = reference_solution(velocity, noise, REFERENCE_RTOL)
    progress.update()
    x_check, _ = reference_solution(velocity, noise, CHECK_RTOL)
    progress.update()
    reference = {"nfev": ref_nfev, **{f"check_{k}": v for k, v in errors(x_check, x_ref).items()}}
    rows = []
    for grid, grid_config in GRIDS.items():
        for config in configs:
            for target in nfe_targets:
                progress.set_postfix_str(f"{grid}: {config.label} @ NFE≈{target}")
                num_steps = config.steps_for(target)
                counter = bdia.CountingDenoiser(model)
                sigmas = bdia.flow_sigmas(num_steps, **grid_config)
                x = bdia.sample(counter, noise, sigmas, solver=config.solver, gamma=config.gamma)
                rows.append({"grid": grid, "label": config.label, "solver": config.solver,
                             "gamma": "" if config.gamma is None else config.gamma, "nfe_target": target,
                             "num_steps": num_steps, "nfe": counter.nfe, **errors(x, x_ref)})
                progress.update()
    progress.close()
    elapsed = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "accuracy.csv")
    write_plot(rows, configs, out_dir / "accuracy.png")
    write_markdown(rows, configs, reference, num_samples, seed, elapsed, out_dir / "accuracy.md")
    return rows


def _rows(rows, grid, config):
    return [r for r in rows if r["grid"] == grid and r["label"] == config.label]


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: f"{row[k]:.6e}" for k in ("rms_error", "max_abs_error")}})


def write_plot(rows, configs, path: Path) -> None:
    fig, axes = plt.subplots(1, len(GRIDS), figsize=(12, 5), sharey=True)
    euler_family = [c for c in configs if c.solver in ("ddim", "bdia_ddim")]
    heun_family = [c for c in configs if c.solver in ("edm", "bdia_edm")]
    for ax, grid in zip(axes, GRIDS):
        for family, cmap in ((euler_family, plt.cm.Blues), (heun_family, plt.cm.Oranges)):
            for i, config in enumerate(family):
                data = _rows(rows, grid, config)
                ax.loglog([r["nfe"] for r in data], [r["rms_error"] for r in data],
                          color=cmap(0.95 - 0.55 * i / max(len(family) - 1, 1)),
                          linestyle="-" if config.is_base else "--", linewidth=2.4 if config.is_base else 1.4,
                          marker="o" if config.is_base else "s", markersize=4, label=config.label)
        nfe = sorted({r["nfe"] for r in rows if r["grid"] == grid})
        anchor = max(r["rms_error"] for r in rows if r["grid"] == grid and r["nfe"] == nfe[0])
        guide = np.array([nfe[0], nfe[-1]], dtype=float)
        for order, style in ((1, ":"), (2, "-.")):
            ax.loglog(guide, anchor * (guide / nfe[0]) ** -order, color="grey", linestyle=style, linewidth=1,
                      label=f"slope -{order}")
        ax.set_title(f"{grid} grid (FlowMatchEulerDiscreteScheduler)")
        ax.set_xlabel("NFE (measured)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMS error vs reference (per coordinate)")
    axes[0].legend(fontsize=8, ncol=2, loc="lower left")
    fig.suptitle("Rectified-flow Gaussian mixture (K=4, dim 16): error vs NFE from t = 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value):
    return f"{value:.2e}"


def last_step_start(grid_config: dict) -> tuple[float, float]:
    """The flow time ``t_(N-1)`` the grid's last step starts from, at N = 10 and N = 400 (diffusers' grid ends at its
    shifted ``sigma_min`` whatever N is)."""
    return tuple(float(bdia.flow_time(bdia.flow_sigmas(n, **grid_config))[-2]) for n in (10, 400))


def findings(rows, configs) -> list[str]:
    """Sentences read off the numbers (they stay true when the script is rerun)."""
    lines = []
    targets = sorted({r["nfe_target"] for r in rows})
    euler, heun = SolverConfig("ddim"), SolverConfig("edm")
    for grid, grid_config in GRIDS.items():
        orders = {c.label: observed_order(_rows(rows, grid, c)) for c in configs}
        lines.append(f"**{grid}**: measured order (least-squares slope of log error over NFE ≈ "
                     f"{', '.join(map(str, ORDER_TARGETS))}): "
                     + ", ".join(f"{label} {order:.2f}" for label, order in orders.items()) + ".")
        for config in configs:
            if config.is_base:
                continue
            base_config = euler if config.solver == "bdia_ddim" else heun  # the solver it is BDIA over
            name = base_config.label
            mine, base = _rows(rows, grid, config), _rows(rows, grid, base_config)
            ratios = [m["rms_error"] / b["rms_error"] for m, b in zip(mine, base)]
            wins = [m["nfe_target"] for m, q in zip(mine, ratios) if q < 1]
            losses = [m["nfe_target"] for m, q in zip(mine, ratios) if q >= 1]
            verdict = (f"beats {name} at every budget" if not losses else
                       f"loses to {name} at every budget" if not wins else
                       f"beats {name} at NFE ≈ {', '.join(map(str, wins))} and loses at NFE ≈ "
                       f"{', '.join(map(str, losses))}")
            lines.append(f"{grid}: {config.label} {verdict} (error ratio to {name} by budget: "
                         + ", ".join(f"{q:.2f}" for q in ratios) + ").")
        heun_rows = {r["nfe_target"]: r for r in _rows(rows, grid, heun)}
        obelm = {r["nfe_target"]: r for r in _rows(rows, grid, SolverConfig("bdia_ddim", "obelm"))}
        if obelm and heun_rows:
            ratios = {t: obelm[t]["rms_error"] / heun_rows[t]["rms_error"] for t in targets}
            wins = [t for t, q in ratios.items() if q < 1]
            lines.append(f"{grid}: BDIA-flow γ=obelm against flow Heun at equal NFE: error ratio "
                         + ", ".join(f"{q:.2f} (NFE ≈ {t})" for t, q in ratios.items())
                         + (f"; more accurate at NFE ≈ {', '.join(map(str, wins))}" if wins else "; never more accurate")
                         + ".")
        best = []
        for target in targets:
            row = min((r for r in rows if r["grid"] == grid and r["nfe_target"] == target), key=lambda r: r["rms_error"])
            best.append(f"NFE ≈ {target}: {row['label']} ({_fmt(row['rms_error'])})")
        lines.append(f"{grid}: lowest error at each budget: " + "; ".join(best) + ".")
        t_small, t_large = last_step_start(grid_config)
        flattening = [c.label for c in configs
                      if c.label in (SolverConfig("edm").label, SolverConfig("bdia_ddim", "obelm").label)
                      and local_orders(_rows(rows, grid, c))[-1] < 1.5]
        if flattening:
            lines.append(f"{grid}: diffusers' grid ends with a step from t = {t_small:.4f} (N = 10) / {t_large:.4f} "
                         f"(N = 400) to 0 (its shifted sigma_min: the last step does not shrink with N), so the "
                         f"second-order solvers' errors stop falling at second order at the largest budgets "
                         f"({', '.join(flattening)}: local order below 1.5 between the last two budgets).")
    return lines


def write_markdown(rows, configs, reference, num_samples, seed, elapsed, path: Path) -> None:
    targets = sorted({r["nfe_target"] for r in rows})
    out = [
        "# BDIA-flow accuracy vs NFE (rectified-flow Gaussian mixture)", "",
        f"Generated by `{COMMAND}`; do not edit by hand. Raw numbers: `accuracy.csv`; plot: `accuracy.png`.",
        f"Run: {num_samples} samples, seed {seed}, {elapsed:.1f} s wall time, float64, 1 torch thread; "
        f"torch {torch.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}.", "",
        "## Problem", "",
        f"* Data: a mixture of K = {NUM_COMPONENTS} isotropic Gaussians in dimension {int(np.prod(EVENT_SHAPE))}, equal "
        f"weights, means `torch.randn` (seed {seed}), stds {list(COMPONENT_STDS)}, under the rectified-flow path "
        "`x_t = (1 - t) x0 + t eps`; its exact velocity `bdia.analytic.FlowGaussianMixture` plays the network.",
        "* Every solver starts from the same noise `x_t` at t = 1 (sigma = inf in EDM's convention) and integrates "
        "`dx_t/dt = v` to t = 0 on diffusers' `FlowMatchEulerDiscreteScheduler` grid, `bdia.flow_sigmas(N, shift=...)` "
        "(unshifted, and SD3's shift 3).",
        "* Solvers (`bdia.sample` on a flow model steps in `(x_t, t)`): flow Euler = `ddim` (NFE N), BDIA-flow = "
        "`bdia_ddim` (NFE N; the gamma-term combined in `x_t`; `obelm`: `gamma_k = (Δt_k / Δt_(k-1))^2`, which "
        "makes BDIA over Euler second order; on the unshifted grid, uniform in t but for its last step, that is γ = 1 but there), flow Heun = `edm` "
        "(`FlowMatchHeunDiscreteScheduler`'s steps, Euler onto t = 0; NFE 2N − 1), BDIA-flow-Heun = `bdia_edm` (its "
        "default formulation; NFE 2N − 1). For each NFE target the most steps that fit; NFE counted by "
        "`bdia.CountingDenoiser`.",
        "* Error: RMS over all entries of the final state against the reference (the largest entry error is in the CSV).",
        "", "## Reference", "",
        f"scipy `solve_ivp(method=\"DOP853\", rtol=atol={REFERENCE_RTOL:g})` from t = 1 to exactly 0 with a closed-form "
        f"velocity written in numpy (checked against the model to 1e-10), {reference['nfev']} evaluations; the same "
        f"solve at rtol {CHECK_RTOL:g} differs from it by RMS {_fmt(reference['check_rms_error'])}, far below the "
        f"smallest solver error here ({_fmt(min(r['rms_error'] for r in rows))}).", "",
    ]
    for grid in GRIDS:
        out += [f"## RMS error, {grid} grid (measured NFE in brackets)", "",
                "| solver | " + " | ".join(f"NFE ≈ {t}" for t in targets) + " | measured order | local orders |",
                "|---|" + "---|" * (len(targets) + 2)]
        for config in configs:
            data = _rows(rows, grid, config)
            cells = [f"{_fmt(r['rms_error'])} ({r['nfe']})" for r in data]
            local = ", ".join(f"{q:.2f}" for q in local_orders(data))
            out.append(f"| {config.label} | " + " | ".join(cells) + f" | {observed_order(data):.2f} | {local} |")
        out.append("")
    out += ["## What it shows", ""] + [f"* {line}" for line in findings(rows, configs)] + [""]
    path.write_text("\n".join(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFE_TARGETS), help="NFE budgets")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results" / "flow"))
    args = parser.parse_args(argv)
    if not 1 <= args.num_samples <= 100_000 or any(not 3 <= n <= 10_000 for n in args.nfe):
        print("error: --num-samples must be in 1..100000 and every --nfe in 3..10000")
        return 1
    rows = run(args.num_samples, args.nfe, args.out_dir, args.seed)
    print(f"wrote {Path(args.out_dir) / 'accuracy.md'} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
