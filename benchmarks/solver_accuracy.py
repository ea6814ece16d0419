"""Solver error vs NFE on a Gaussian-mixture problem, against a high-accuracy reference ODE solution.

    make accuracy                      # = .venv/bin/python benchmarks/solver_accuracy.py
    python benchmarks/solver_accuracy.py --num-samples 256 --out-dir results

Conventions (``docs/design.md``): EDM noise levels, ``x = x0 + sigma * n``; the
probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma``; gamma = 0 is the base solver.

The data distribution is a mixture of isotropic Gaussians, whose denoiser ``D`` is exact and non-linear
(:class:`bdia.GaussianMixtureDenoiser`). Every solver starts from the same noise ``x_init = 80 * n`` and runs on
the Karras grid (``bdia.karras_sigmas``, sigma 80 -> 0.002 -> 0); DDIM and BDIA-DDIM run on it too (DDIM is
an Euler step in sigma on any grid). The reference is scipy's DOP853 on the same ODE, written independently of
bdia's solvers and of its denoiser (closed-form velocity below), integrated from sigma = 80 to exactly 0.

Writes ``<out-dir>/solver_accuracy.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import time
from contextlib import contextmanager
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

COMMAND = "make accuracy  (= .venv/bin/python benchmarks/solver_accuracy.py)"

# The problem: K isotropic Gaussian components in dimension 16, equal weights, seeded means.
NUM_COMPONENTS = 4
EVENT_SHAPE = (1, 4, 4)
COMPONENT_STDS = (0.2, 0.3, 0.4, 0.5)
SIGMA_MAX = 80.0

# The reference solution, and a looser one that estimates its error.
REFERENCE_RTOL = 1e-12
CHECK_RTOL = 1e-10

DEFAULT_NFE_TARGETS = (10, 20, 50, 100, 200)
CSV_FIELDS = (
    "solver", "gamma", "backward", "space", "sigma_data", "num_steps", "nfe", "rms_error", "max_abs_error", "wrong_component_frac",
)


@dataclass(frozen=True)
class SolverConfig:
    """One solver setting. ``gamma=None`` for the base solvers; ``backward``, ``space`` and ``sigma_data`` are
    bdia_edm's options (None: the solver's default, see ``bdia.bdia_edm``)."""

    solver: str
    gamma: float | str | None = None
    backward: str | None = None
    space: str | None = None
    sigma_data: float | None = None

    @property
    def base(self) -> str:
        return self.solver.removeprefix("bdia_")

    @property
    def options(self) -> dict:
        names = ("backward", "space", "sigma_data")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def label(self) -> str:
        text = self.solver if self.gamma is None else f"{self.solver} γ={self.gamma}"
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{text} ({options})" if options else text

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` steps on a grid ending at sigma = 0 (checked against the count)."""
        if self.base == "ddim":
            return num_steps  # one per step
        if self.backward == "heun":
            return 3 * num_steps - 2  # EDM's 2N - 1, plus one per BDIA step for the Heun step back
        return 2 * num_steps - 1  # Heun steps; the last one, onto sigma = 0, is Euler

    def steps_for(self, nfe_target: int) -> int:
        """The most steps whose NFE fits in ``nfe_target`` (never more evaluations than the budget; at least 2)."""
        num_steps = 2
        while self.nfe(num_steps + 1) <= nfe_target:
            num_steps += 1
        return num_steps

    def sample(self, denoiser, x_init, sigmas):
        return bdia.sample(denoiser, x_init, sigmas, solver=self.solver, gamma=self.gamma, **self.options)


#: ``SolverConfig("bdia_edm", g)`` is bdia_edm's default formulation (chosen by benchmarks/solver_study.py); the
#: x-space form with the Euler backward map (the formulation before issue 13) is spelled out.
SOLVER_CONFIGS = (
    SolverConfig("ddim"),
    SolverConfig("bdia_ddim", 0.5),
    SolverConfig("bdia_ddim", 1.0),
    SolverConfig("bdia_ddim", "obelm"),
    SolverConfig("edm"),
    SolverConfig("bdia_edm", 0.5),
    SolverConfig("bdia_edm", "lte"),
    SolverConfig("bdia_edm", 0.5, "euler", "vp"),
    SolverConfig("bdia_edm", 0.5, "euler", "x"),
    SolverConfig("bdia_edm", 1.0, "euler", "x"),
    SolverConfig("bdia_edm", "obelm", "euler", "x"),
    SolverConfig("bdia_edm", 1.0, "heun", "x"),
)


# --------------------------------------------------------------------------------------------------
# Problem and reference solution.


def make_problem(num_samples: int, seed: int = 0):
    """The mixture denoiser and the initial states ``x_init = SIGMA_MAX * n`` (float64), both from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn((NUM_COMPONENTS, *EVENT_SHAPE), generator=generator, dtype=torch.float64)
    denoiser = bdia.GaussianMixtureDenoiser(means, torch.tensor(COMPONENT_STDS, dtype=torch.float64))
    x_init = SIGMA_MAX * torch.randn((num_samples, *EVENT_SHAPE), generator=generator, dtype=torch.float64)
    return denoiser, x_init


class MixtureVelocity:
    """``dx/dsigma`` of the mixture's probability-flow ODE, in closed form on flattened numpy states.

    With ``v_k = s_k^2 + sigma^2`` and responsibilities ``r_k(x) ∝ w_k N(x; mu_k, v_k I)``,
    ``x - D(x, sigma) = sum_k r_k sigma^2 / v_k (x - mu_k)``, so

        dx/dsigma = (x - D) / sigma = sigma * sum_k r_k (x - mu_k) / v_k,

    which is smooth through sigma = 0 (where it is 0), so the reference integrates to exactly sigma = 0.
    """

    def __init__(self, denoiser: bdia.GaussianMixtureDenoiser):
        self.means = denoiser.means.reshape(NUM_COMPONENTS, -1).numpy()  # [K, dim]
        self.variances = (denoiser.stds**2).numpy()  # [K]
        self.log_weights = denoiser.weights.log().numpy()  # [K]
        self.dim = self.means.shape[1]

    def __call__(self, sigma: float, y: np.ndarray) -> np.ndarray:
        diff = y.reshape(-1, 1, self.dim) - self.means  # [B, K, dim]
        var = self.variances + sigma**2  # [K]
        log_resp = self.log_weights - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * np.log(var)
        log_resp -= log_resp.max(axis=1, keepdims=True)
        resp = np.exp(log_resp)
        resp /= resp.sum(axis=1, keepdims=True)  # [B, K]
        return (sigma * (resp[:, :, None] * diff / var[:, None]).sum(axis=1)).ravel()


def check_velocity(velocity: MixtureVelocity, denoiser, x_init) -> None:
    """Guard: the reference's ODE is bdia's ODE, ``(x - D(x, sigma)) / sigma``, at a few noise levels."""
    for sigma in (0.3, 3.0, 30.0):
        x = x_init * (sigma / SIGMA_MAX) + denoiser.means[0]
        slope = (x - denoiser(x, torch.tensor(sigma, dtype=torch.float64))) / sigma
        gap = np.abs(slope.reshape(-1).numpy() - velocity(sigma, x.reshape(-1).numpy())).max()
        if gap > 1e-10:
            raise AssertionError(f"reference velocity differs from (x - D) / sigma by {gap:.2e} at sigma={sigma}")


def reference_solution(velocity: MixtureVelocity, x_init: torch.Tensor, rtol: float) -> tuple[torch.Tensor, int]:
    """DOP853 from sigma = SIGMA_MAX to 0 over the whole flattened batch (atol = rtol). Returns (x at 0, nfev)."""
    result = solve_ivp(velocity, (SIGMA_MAX, 0.0), x_init.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=rtol)
    if not result.success:
        raise RuntimeError(f"reference ODE solve failed: {result.message}")
    return torch.from_numpy(result.y[:, -1].copy()).reshape(x_init.shape), int(result.nfev)


# --------------------------------------------------------------------------------------------------
# Errors.


def error_metrics(x: torch.Tensor, x_ref: torch.Tensor, denoiser) -> dict:
    """``rms_error``: RMS over samples of ``||x_i - x_ref_i||_2 / sqrt(dim)`` (= RMS over all entries);
    ``max_abs_error``: largest entry-wise deviation; ``wrong_component_frac``: share of samples whose most likely
    mixture component (at sigma = 0) differs from the reference's."""
    err = (x - x_ref).reshape(x.shape[0], -1)
    per_sample = err.norm(dim=1) / math.sqrt(err.shape[1])
    zero = torch.tensor(0.0, dtype=torch.float64)
    component = denoiser.log_prob_components(x, zero).argmax(dim=1)
    component_ref = denoiser.log_prob_components(x_ref, zero).argmax(dim=1)
    return {
        "rms_error": float(per_sample.square().mean().sqrt()),
        "max_abs_error": float(err.abs().max()),
        "wrong_component_frac": float((component != component_ref).double().mean()),
    }


def _rows_of(rows, config: SolverConfig) -> list[dict]:
    """The rows of one solver config, in budget order."""
    return [r for r in rows if r["label"] == config.label]


def observed_order(rows: list[dict]) -> float:
    """Slope of -log(error) vs log(NFE) between the two largest budgets (NaN with fewer than two)."""
    if len(rows) < 2:
        return float("nan")
    a, b = rows[-2], rows[-1]
    return math.log(a["rms_error"] / b["rms_error"]) / math.log(b["nfe"] / a["nfe"])


# --------------------------------------------------------------------------------------------------
# The measurement.


def measure(denoiser, x_init, x_ref, configs, nfe_targets, progress) -> list[dict]:
    """Every solver config at every NFE budget, from ``x_init``; errors against ``x_ref``."""
    rows = []
    for config in configs:
        for target in nfe_targets:
            progress.set_postfix_str(f"{config.label} @ NFE≈{target}")
            num_steps = config.steps_for(target)
            counter = bdia.CountingDenoiser(denoiser)
            x = config.sample(counter, x_init, bdia.karras_sigmas(num_steps, sigma_max=SIGMA_MAX))
            rows.append({
                "label": config.label,
                "solver": config.solver,
                "gamma": "" if config.gamma is None else config.gamma,
                "backward": config.backward or "",
                "space": config.space or "",
                "sigma_data": "" if config.sigma_data is None else config.sigma_data,
                "options": ", ".join(f"{k}={v}" for k, v in config.options.items()),
                "nfe_target": target,
                "num_steps": num_steps,
                "nfe": counter.nfe,
                **error_metrics(x, x_ref, denoiser),
            })
            progress.update()
    return rows


def non_monotone(rows, configs) -> dict[str, list[str]]:
    """For each config, the consecutive budgets where the RMS error did not fall, described as text
    ("NFE 19→49, wrong component 0%→2%")."""
    found = {}
    for config in configs:
        data = _rows_of(rows, config)
        rises = [
            f"NFE {a['nfe']}→{b['nfe']}, wrong component {100 * a['wrong_component_frac']:.0f}%→{100 * b['wrong_component_frac']:.0f}%"
            for a, b in zip(data, data[1:]) if b["rms_error"] >= a["rms_error"]
        ]
        if rises:
            found[config.label] = rises
    return found


def _describe(found: dict[str, list[str]]) -> str:
    return "; ".join(f"{label} ({'; '.join(rises)})" for label, rises in found.items())


@contextmanager
def torch_threads(num_threads: int):
    """Run a block with ``num_threads`` torch CPU threads, restoring the setting after. The tensors here are tiny
    (batch x 16), so threads only add synchronisation, which on a busy shared CPU costs far more than the work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(
    num_samples: int = 256,
    nfe_targets=DEFAULT_NFE_TARGETS,
    out_dir=REPO_ROOT / "results",
    seed: int = 0,
    configs=SOLVER_CONFIGS,
    other_seeds=tuple(range(1, 8)),
    other_seeds_samples: int = 64,
):
    """Measure every solver config at every NFE target on the problem from ``seed``; write the CSV, markdown table
    and plot; return the rows. ``other_seeds``: further problems (means and noise from each seed, ``other_seeds_samples``
    samples each) on which only the monotonicity of error in NFE is checked and reported."""
    with torch_threads(1):
        return _run(num_samples, tuple(sorted(nfe_targets)), Path(out_dir), seed, configs, tuple(other_seeds), other_seeds_samples)


def _run(num_samples, nfe_targets, out_dir, seed, configs, other_seeds, other_seeds_samples):
    start = time.perf_counter()
    denoiser, x_init = make_problem(num_samples, seed)
    velocity = MixtureVelocity(denoiser)
    check_velocity(velocity, denoiser, x_init)

    per_problem = len(configs) * len(nfe_targets)
    progress = tqdm(total=2 + per_problem + len(other_seeds) * (1 + per_problem), desc="solver accuracy", dynamic_ncols=True)
    progress.set_postfix_str(f"reference DOP853 rtol={REFERENCE_RTOL:g}")
    x_ref, ref_nfev = reference_solution(velocity, x_init, REFERENCE_RTOL)
    progress.update()
    progress.set_postfix_str(f"reference DOP853 rtol={CHECK_RTOL:g}")
    x_check, check_nfev = reference_solution(velocity, x_init, CHECK_RTOL)
    progress.update()
    reference = {
        "rtol": REFERENCE_RTOL,
        "nfev": ref_nfev,
        "check_rtol": CHECK_RTOL,
        "check_nfev": check_nfev,
        **{f"check_{k}": v for k, v in error_metrics(x_check, x_ref, denoiser).items()},
    }
    rows = measure(denoiser, x_init, x_ref, configs, nfe_targets, progress)

    robustness = {}  # seed -> {label: [where its error did not fall, as text]}
    for other_seed in other_seeds:
        other_denoiser, other_x_init = make_problem(other_seeds_samples, other_seed)
        progress.set_postfix_str(f"seed {other_seed}: reference")
        other_ref = reference_solution(MixtureVelocity(other_denoiser), other_x_init, REFERENCE_RTOL)[0]
        progress.update()
        other_rows = measure(other_denoiser, other_x_init, other_ref, configs, nfe_targets, progress)
        robustness[other_seed] = non_monotone(other_rows, configs)
    progress.close()

    elapsed = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "solver_accuracy.csv")
    write_plot(rows, configs, out_dir / "solver_accuracy.png")
    write_markdown(
        rows, configs, reference, robustness, other_seeds_samples, num_samples, seed, elapsed, out_dir / "solver_accuracy.md"
    )
    return rows


# --------------------------------------------------------------------------------------------------
# Outputs.


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: f"{row[k]:.6e}" for k in ("rms_error", "max_abs_error")}})


def write_plot(rows, configs, path: Path) -> None:
    colours = {"ddim": plt.cm.Blues, "edm": plt.cm.Oranges}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for family, cmap in colours.items():
        members = [c for c in configs if c.base == family]
        for i, config in enumerate(members):
            data = _rows_of(rows, config)
            is_base = config.gamma is None
            ax.loglog(
                [r["nfe"] for r in data], [r["rms_error"] for r in data],
                color=cmap(0.95 - 0.5 * i / max(len(members) - 1, 1)),
                linestyle="-" if is_base else "--", linewidth=2.4 if is_base else 1.4,
                marker="o" if is_base else "s", markersize=4, label=config.label,
            )
    nfe_all = sorted({r["nfe"] for r in rows})
    anchor_nfe, anchor_err = nfe_all[0], min(r["rms_error"] for r in rows if r["nfe"] == nfe_all[0])
    guide = np.array([nfe_all[0], nfe_all[-1]], dtype=float)
    for order, style in ((1, ":"), (2, "-.")):
        ax.loglog(guide, anchor_err * (guide / anchor_nfe) ** -order, color="grey", linestyle=style, linewidth=1,
                  label=f"slope -{order}")
    ax.set_xlabel("NFE (measured)")
    ax.set_ylabel("RMS error vs reference (per coordinate)")
    ax.set_title("Gaussian mixture (K=4, dim 16): error vs NFE, Karras grid")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float) -> str:
    return f"{value:.2e}"


def findings(rows, configs) -> list[str]:
    """Sentences read off the measured numbers (so they stay true when the script is rerun)."""
    by_label = {c.label: _rows_of(rows, c) for c in configs}
    targets = sorted({r["nfe_target"] for r in rows})
    rises = non_monotone(rows, configs)
    lines = [
        "RMS error falls with NFE at every budget step for every solver." if not rises else
        f"RMS error does not fall at every budget step: {_describe(rises)}."
    ]
    for target in (targets[0], targets[-1]):
        at_target = [r for r in rows if r["nfe_target"] == target]
        best = min(at_target, key=lambda r: r["rms_error"])
        lines.append(f"At NFE ≈ {target} the lowest RMS error is {best['label']} ({_fmt(best['rms_error'])}, NFE {best['nfe']}).")
    for config in configs:
        if config.gamma is None:
            continue
        base = by_label[SolverConfig(config.base).label]
        mine = by_label[config.label]
        ratios = [m["rms_error"] / b["rms_error"] for m, b in zip(mine, base)]
        better = [m["nfe_target"] for m, q in zip(mine, ratios) if q < 1]
        worse = [m["nfe_target"] for m, q in zip(mine, ratios) if q >= 1]
        verdict = (
            f"below {config.base} at every budget" if not worse
            else f"above {config.base} at every budget" if not better
            else f"below {config.base} at NFE ≈ {', '.join(map(str, better))}; above it at NFE ≈ {', '.join(map(str, worse))}"
        )
        ratio_text = ", ".join(f"{q:.2f}" for q in ratios)
        lines.append(f"{config.label}: error {verdict} (error ratio to {config.base}, by budget: {ratio_text}).")
    orders = {c.label: observed_order(by_label[c.label]) for c in configs}
    lines.append(
        "Observed order between the two largest budgets (slope of log error vs log NFE): "
        + ", ".join(f"{label} {order:.2f}" for label, order in orders.items()) + "."
    )
    edm_order = orders.get(SolverConfig("edm").label, float("nan"))
    euler_back = [c for c in configs if c.solver == "bdia_edm" and c.backward == "euler"]
    second_back = [c for c in configs if c.solver == "bdia_edm" and c.backward != "euler" and c.gamma != "lte"]
    if edm_order > 1.8 and euler_back and all(orders[c.label] < 1.5 for c in euler_back):
        lines.append(
            "bdia_edm with the Euler backward map converges at about first order, in x-space and in VP coordinates "
            "alike, against EDM's second: its gamma term x_(k-1) - Euler(x_k -> sigma_(k-1)) carries the Euler "
            "step's O(h^2) local error into every step, so any fixed gamma > 0 costs EDM its second order."
        )
    if second_back:
        lines.append(
            "With a second-order backward map (the default `exp`, reusing Heun's two slopes, or `heun`, one more NFE "
            "per step) bdia_edm keeps a second order: observed "
            + ", ".join(f"{c.label} {orders[c.label]:.2f}" for c in second_back) + "."
        )
    first = [r for r in rows if r["nfe_target"] == targets[0]]
    lines.append(
        f"Share of samples that end nearest a different mixture component than the reference at NFE ≈ {targets[0]}: "
        + ", ".join(f"{r['label']} {100 * r['wrong_component_frac']:.0f}%" for r in first) + "."
    )
    return lines


def robustness_text(robustness: dict, samples: int) -> str:
    """The monotonicity check on the other problem seeds, as markdown."""
    if not robustness:
        return "Not run (no other seeds requested)."
    seeds = ", ".join(map(str, robustness))
    head = (
        f"The same budgets on other problems (means and noise drawn from seeds {seeds}; {samples} samples each), "
        "checking only whether each solver's RMS error falls at every budget step."
    )
    exceptions = [f"* seed {seed}: {_describe(found)}" for seed, found in robustness.items() if found]
    if not exceptions:
        return head + " It does, for every solver on every seed."
    clean = [seed for seed, found in robustness.items() if not found]
    return (
        head + f" It does for every solver on seeds {', '.join(map(str, clean)) or 'none'}. Where it does not, the error"
        " rises between the budgets listed; beside them, the share of samples ending nearest a different mixture"
        " component than the reference:\n\n" + "\n".join(exceptions)
    )


def write_markdown(rows, configs, reference, robustness, robustness_samples, num_samples, seed, elapsed, path: Path) -> None:
    targets = sorted({r["nfe_target"] for r in rows})
    header = "| solver | " + " | ".join(f"NFE ≈ {t}" for t in targets) + " | observed order |"
    summary = [header, "|" + "---|" * (len(targets) + 2)]
    for config in configs:
        data = _rows_of(rows, config)
        cells = [f"{_fmt(r['rms_error'])} ({r['nfe']})" for r in data]
        summary.append(f"| {config.label} | " + " | ".join(cells) + f" | {observed_order(data):.2f} |")

    full = [
        "| solver | gamma | options | num_steps | NFE | RMS error | max abs error | wrong component |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full.append(
            f"| {r['solver']} | {r['gamma']} | {r['options']} | {r['num_steps']} | {r['nfe']} | "
            f"{_fmt(r['rms_error'])} | {_fmt(r['max_abs_error'])} | {100 * r['wrong_component_frac']:.1f}% |"
        )

    text = f"""# Solver accuracy vs NFE (Gaussian mixture)

Generated by `{COMMAND}`; do not edit by hand. Raw numbers: `solver_accuracy.csv`; plot: `solver_accuracy.png`.
Run: {num_samples} samples, seed {seed}, {elapsed:.1f} s wall time; torch {torch.__version__}, scipy {scipy.__version__},
Python {platform.python_version()}, {torch.get_num_threads()} torch thread(s).

## Problem

* Data: mixture of K = {NUM_COMPONENTS} isotropic Gaussians in dimension {math.prod(EVENT_SHAPE)} (shape {list(EVENT_SHAPE)}),
  equal weights, means `torch.randn` (seed {seed}, entries of scale 1), stds {list(COMPONENT_STDS)}; exact non-linear
  denoiser `bdia.GaussianMixtureDenoiser`.
* ODE: the probability-flow ODE `dx/dsigma = (x - D(x, sigma)) / sigma` (EDM convention `x = x0 + sigma * n`) from
  sigma = {SIGMA_MAX:g} to 0, from the same initial noise `x_init = {SIGMA_MAX:g} * randn` for every solver (float64).
* Solvers: `bdia.sample` on the Karras grid `bdia.karras_sigmas(N)` (sigma {SIGMA_MAX:g} → 0.002, rho 7, then 0) for
  all of them, DDIM and BDIA-DDIM included (DDIM is an Euler step in sigma on any grid; BDIA-DDIM's
  `c_k = alpha_(k-1) / alpha_(k+1)` uses `alpha = 1 / sqrt(1 + sigma^2)`). gamma = 0 is the base solver.
  bdia_edm's default (`benchmarks/solver_study.py` chose it) is the `exp` backward map in VP coordinates (same NFE as
  EDM); rows with `space=x, backward=euler` are the formulation before issue 13; `backward=heun` costs one more NFE per step.
* Budgets: for each NFE target, the most steps whose NFE fits in it (DDIM family NFE = N; EDM family 2N − 1;
  bdia_edm with `backward=heun` 3N − 2). The NFE reported is counted by `bdia.CountingDenoiser`.
* Error: RMS over samples of the per-sample L2 error divided by sqrt(dim) (= RMS over all entries), against the
  reference; also the largest absolute entry error and the share of samples whose most likely component
  (at sigma = 0) differs from the reference's.

## Reference

scipy `solve_ivp(method="DOP853", rtol=atol={reference['rtol']:g})` on the flattened batch, integrating sigma from
{SIGMA_MAX:g} to exactly 0 with the closed-form velocity `sigma * sum_k r_k (x - mu_k) / (s_k^2 + sigma^2)`, which is
smooth at sigma = 0 (checked against `(x - D(x, sigma)) / sigma` to 1e-10); it uses none of bdia's solvers.
{reference['nfev']} right-hand-side evaluations. Its accuracy: the same solve at rtol = {reference['check_rtol']:g} differs from it by
RMS {_fmt(reference['check_rms_error'])}, max abs {_fmt(reference['check_max_abs_error'])} (an upper estimate of the looser solve's error; the
rtol {reference['rtol']:g} reference is at least this accurate), far below the smallest solver error measured here
({_fmt(min(r['rms_error'] for r in rows))}).

## RMS error (measured NFE in brackets)

{chr(10).join(summary)}

![error vs NFE](solver_accuracy.png)

## What it shows

{chr(10).join(f"* {line}" for line in findings(rows, configs))}

## Other problem seeds

{robustness_text(robustness, robustness_samples)}

## All measurements

{chr(10).join(full)}
"""
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=256, help="initial noise samples (default 256)")
    parser.add_argument("--nfe-targets", type=int, nargs="+", default=list(DEFAULT_NFE_TARGETS),
                        help=f"NFE budgets (default {' '.join(map(str, DEFAULT_NFE_TARGETS))})")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results"), help="output folder (default results/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(num_samples=args.num_samples, nfe_targets=args.nfe_targets, out_dir=args.out_dir, seed=args.seed)
    width = max(len(r["label"]) for r in rows)
    print(f"{'solver':<{width}}  {'N':>4} {'NFE':>4}  {'RMS error':>10}  {'max abs':>10}")
    for r in rows:
        print(f"{r['label']:<{width}}  {r['num_steps']:>4} {r['nfe']:>4}  {r['rms_error']:>10.3e}  {r['max_abs_error']:>10.3e}")
    print(f"wrote {Path(args.out_dir) / 'solver_accuracy.md'} (+ .csv, .png)")


if __name__ == "__main__":
    main()
