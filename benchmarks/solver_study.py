"""Which BDIA-EDM? Every bdia_edm formulation (coordinates, backward map, gamma schedule) against EDM, measured.

    make study                                   # = .venv/bin/python benchmarks/solver_study.py
    python benchmarks/solver_study.py --num-seeds 64 --out-dir /tmp/study     # smaller

For every candidate and every base solver, on two problems:

* ``mixture``: the analytic digits mixture ``bdia.analytic.digits_gmm(num_components=300)`` (16x16, std 0.05,
  exact non-linear denoiser, float64);
* ``digits``: the embedded trained digits network (``bdia.models.digits_network``, float32 inside, float64 state),

it measures, at NFE 5, 9, 15, 25, 35 (NFE counted by ``bdia.CountingDenoiser``):

* trajectory error: RMS over all entries of ``x - x_ref``, the final state against a fine reference solution
  (EDM's Heun with ``--reference-steps`` steps from the same noise; its own error is estimated against a
  solution with two thirds of the steps and reported);
* FD in the shipped digits classifier's features (not FID) against the 597 held-out real digits;
* the observed order (slope of log error vs log NFE between the two largest budgets);
* the float64 round-trip error of each BDIA candidate (sample -> invert -> sample on the mixture, N = 18) at
  gamma 0.9 and 1 and at its own gamma.

The default of ``solver=bdia_edm`` is chosen from these numbers by :func:`choose_default` (the bar of issue 13:
beat EDM in trajectory error at NFE 9 and 15 on both problems and never lose by more than 1.5x; among those,
the lowest geometric-mean error ratio to EDM). Writes ``<out-dir>/solver_study.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bdia  # noqa: E402
from bdia.analytic import digits_gmm  # noqa: E402
from bdia.imageio import quantize, seed_noise  # noqa: E402
from bdia.metrics.fid import DigitsFD  # noqa: E402
from bdia.models import digits_network  # noqa: E402

COMMAND = "make study  (= .venv/bin/python benchmarks/solver_study.py)"
NFE_TARGETS = (5, 9, 15, 25, 35)
PROBLEMS = ("mixture", "digits")
MIXTURE_COMPONENTS = 300
SIGMA_MAX = 80.0
ROUNDTRIP_STEPS = 18
ROUNDTRIP_SEEDS = 16
ROUNDTRIP_BOUND = 1e-10
RATIO_BAR = 1.5
CSV_FIELDS = ("problem", "label", "solver", "gamma", "space", "sigma_data", "backward", "num_steps", "nfe",
              "rms_error", "fd")


@dataclass(frozen=True)
class Candidate:
    """One solver setting: ``solver`` and its keyword options (``gamma``, ``space``, ``sigma_data``, ``backward``)."""

    solver: str
    options: tuple = ()  # (name, value) pairs, hashable
    label_text: str = ""

    @property
    def kw(self) -> dict:
        return dict(self.options)

    @property
    def label(self) -> str:
        if self.label_text:
            return self.label_text
        kw = self.kw
        if self.solver != "bdia_edm":
            return self.solver if "gamma" not in kw else f"{self.solver} γ={kw['gamma']}"
        space = kw.get("space", "x")
        if space == "vp":
            space = f"vp(σd={kw.get('sigma_data', 1.0):g})"
        return f"bdia_edm {space} {kw.get('backward', 'euler')} γ={kw.get('gamma')}"

    @property
    def is_bdia(self) -> bool:
        return self.solver.startswith("bdia_")

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` steps on a grid ending at 0 (checked against the count)."""
        if self.solver in ("ddim", "bdia_ddim"):
            return num_steps
        extra = num_steps - 1 if self.kw.get("backward") == "heun" else 0  # one Heun step back per BDIA step
        return 2 * num_steps - 1 + extra

    def steps_for(self, nfe_target: int) -> int:
        num_steps = 2
        while self.nfe(num_steps + 1) <= nfe_target:
            num_steps += 1
        return num_steps


def _edm(gamma, space="x", backward="euler", sigma_data=None) -> Candidate:
    options = [("gamma", gamma), ("space", space), ("backward", backward)]
    if sigma_data is not None:
        options.append(("sigma_data", sigma_data))
    return Candidate("bdia_edm", tuple(options))


CANDIDATES = (
    Candidate("edm"),
    Candidate("ddim"),
    Candidate("bdia_ddim", (("gamma", "obelm"),)),
    _edm(0.5, "x", "euler"),  # the formulation before issue 13
    _edm(0.5, "x", "taylor"),
    _edm(0.5, "x", "exp"),
    _edm(0.5, "vp", "euler", 1.0),
    _edm(0.5, "vp", "taylor", 1.0),
    _edm(0.5, "vp", "exp", 1.0),
    _edm(0.5, "vp", "euler", 0.5),
    _edm(0.5, "vp", "exp", 0.5),
    _edm(0.3, "vp", "exp", 0.5),
    _edm(1.0, "vp", "exp", 0.5),
    _edm("obelm", "vp", "exp", 0.5),
    _edm("lte", "vp", "exp", 0.5),
    _edm(0.5, "vp", "heun", 0.5),
)
SMOKE_CANDIDATES = (Candidate("edm"), _edm(0.5, "x", "euler"), _edm(0.5, "vp", "exp", 1.0), _edm("lte", "vp", "exp", 1.0))


# --------------------------------------------------------------------------------------------------
# Problems, reference, metrics (each worker process builds its own).


def make_denoiser(problem: str):
    if problem == "mixture":
        return digits_gmm(num_components=MIXTURE_COMPONENTS)
    return digits_network()


def initial_noise(num_seeds: int) -> torch.Tensor:
    return seed_noise(range(num_seeds), (1, 16, 16), SIGMA_MAX)


def rms(x, y) -> float:
    return float((x - y).square().mean().sqrt())


class FD:
    """FD in the shipped digits classifier's features against the held-out digits (not FID): the library's
    :class:`bdia.metrics.fid.DigitsFD` on the quantised samples."""

    def __init__(self):
        self.distance = DigitsFD(kid=False, real_floor=False)

    def __call__(self, x) -> float:
        return float(self.distance(quantize(x))["fd"])


_STATE: dict = {}


def _worker_init(threads: int):
    torch.set_num_threads(threads)


def _problem_state(problem, num_seeds):
    key = (problem, num_seeds)
    if key not in _STATE:
        _STATE[key] = (make_denoiser(problem), initial_noise(num_seeds))
    return _STATE[key]


def reference_task(problem: str, num_seeds: int, steps: int, check_seeds: int):
    """The reference final states (EDM Heun, ``steps`` steps) and an estimate of their error: the RMS gap
    to a solution with two thirds of the steps on the first ``check_seeds`` seeds, times ``q^2 / (1 - q^2)``
    (``q = 2/3``: a second-order method's error ratio), in the same units as the measured errors."""
    den, noise = _problem_state(problem, num_seeds)
    start = time.perf_counter()
    ref = bdia.sample(den, noise, bdia.karras_sigmas(steps, sigma_max=SIGMA_MAX), solver="edm")
    coarse_steps = max(2, (2 * steps) // 3)
    coarse = bdia.sample(den, noise[:check_seeds], bdia.karras_sigmas(coarse_steps, sigma_max=SIGMA_MAX), solver="edm")
    q = coarse_steps / steps
    gap = rms(coarse, ref[:check_seeds])
    return problem, ref, {"steps": steps, "nfe": 2 * steps - 1, "check_steps": coarse_steps,
                          "gap": gap, "error_estimate": gap * q**2 / (1 - q**2),
                          "seconds": time.perf_counter() - start}


def candidate_task(problem: str, num_seeds: int, candidate: Candidate, ref: torch.Tensor, nfe_targets):
    den, noise = _problem_state(problem, num_seeds)
    if "fd" not in _STATE:
        _STATE["fd"] = FD()
    fd = _STATE["fd"]
    rows = []
    for target in nfe_targets:
        steps = candidate.steps_for(target)
        counter = bdia.CountingDenoiser(den)
        x = bdia.sample(counter, noise, bdia.karras_sigmas(steps, sigma_max=SIGMA_MAX), solver=candidate.solver,
                        **candidate.kw)
        if counter.nfe != candidate.nfe(steps):
            raise AssertionError(f"{candidate.label}: counted NFE {counter.nfe}, expected {candidate.nfe(steps)}")
        kw = candidate.kw
        rows.append({
            "problem": problem, "label": candidate.label, "solver": candidate.solver,
            "gamma": kw.get("gamma", ""), "space": kw.get("space", ""), "sigma_data": kw.get("sigma_data", ""),
            "backward": kw.get("backward", ""), "nfe_target": target, "num_steps": steps, "nfe": counter.nfe,
            "rms_error": rms(x, ref), "fd": fd(x) if bool(torch.isfinite(x).all()) else float("nan"),
        })
    return rows


def roundtrip_task(candidate: Candidate, gamma):
    """Float64 round trip on the mixture, N = 18: sample the pair, invert it, sample again. Returns the largest
    entry-wise error of the recovered noise and of the regenerated pair, relative to sigma_max / the data scale."""
    import warnings

    den = make_denoiser("mixture")
    noise = initial_noise(ROUNDTRIP_SEEDS)
    sigmas = bdia.karras_sigmas(ROUNDTRIP_STEPS, sigma_max=SIGMA_MAX)
    kw = {**candidate.kw, "gamma": gamma}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the predicted-amplification warning: we measure it
        pair = bdia.sample(den, noise, sigmas, solver=candidate.solver, return_pair=True, **kw)
        start = bdia.invert(den, pair, sigmas, solver=candidate.solver, **kw)
        again = bdia.sample(den, start, sigmas, solver=candidate.solver, return_pair=True, **kw)
    noise_err = float((start.x_end - noise).abs().max()) / SIGMA_MAX
    regen_err = max(float((a - b).abs().max()) for a, b in zip(again, pair))
    return candidate.label, gamma, noise_err, regen_err


# --------------------------------------------------------------------------------------------------
# Analysis.


def ratios_to_edm(rows, label, problem):
    mine = {r["nfe_target"]: r["rms_error"] for r in rows if r["label"] == label and r["problem"] == problem}
    edm = {r["nfe_target"]: r["rms_error"] for r in rows if r["label"] == "edm" and r["problem"] == problem}
    return {t: mine[t] / edm[t] for t in sorted(mine) if t in edm}


def observed_order(rows, label, problem) -> float:
    data = sorted((r for r in rows if r["label"] == label and r["problem"] == problem), key=lambda r: r["nfe"])
    if len(data) < 2:
        return float("nan")
    a, b = data[-2], data[-1]
    return math.log(a["rms_error"] / b["rms_error"]) / math.log(b["nfe"] / a["nfe"])


def verdicts(rows, candidates, problems):
    """For each bdia_edm candidate: its error ratios to EDM per problem, whether it meets the bar, and the
    geometric mean of its ratios (the score)."""
    out = {}
    for c in candidates:
        if c.solver != "bdia_edm":
            continue
        ratios = {p: ratios_to_edm(rows, c.label, p) for p in problems}
        flat = [q for p in problems for q in ratios[p].values()]
        if not flat or not all(math.isfinite(q) for q in flat):
            out[c.label] = {"ratios": ratios, "meets_bar": False, "score": float("inf"), "beats_everywhere": False}
            continue
        beats_9_15 = all(ratios[p].get(t, 0) < 1 for p in problems for t in (9, 15) if t in ratios[p])
        meets = beats_9_15 and max(flat) <= RATIO_BAR
        out[c.label] = {
            "ratios": ratios, "meets_bar": meets, "beats_everywhere": max(flat) < 1,
            "score": math.exp(sum(math.log(q) for q in flat) / len(flat)),
            "max_ratio": max(flat),
        }
    return out


def choose_default(verdict: dict) -> tuple[str, bool]:
    """The candidate that beats EDM at every NFE if any (lowest score among those); else the lowest score among
    those meeting the bar; else the lowest score overall (and False: no candidate meets the bar)."""
    for group in ("beats_everywhere", "meets_bar"):
        members = [label for label, v in verdict.items() if v[group]]
        if members:
            return min(members, key=lambda label: verdict[label]["score"]), True
    return min(verdict, key=lambda label: verdict[label]["score"]), False


# --------------------------------------------------------------------------------------------------
# The run.


def run(num_seeds=256, nfe_targets=NFE_TARGETS, out_dir=REPO_ROOT / "results", reference_steps=150,
        check_seeds=64, candidates=CANDIDATES, problems=PROBLEMS, workers=2, roundtrip=True, progress=True):
    start = time.perf_counter()
    nfe_targets = tuple(sorted(nfe_targets))
    check_seeds = min(check_seeds, num_seeds)
    out_dir = Path(out_dir)
    say = print if progress else (lambda *a, **k: None)
    pool = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(1,)) if workers > 1 else None
    submit = pool.submit if pool else (lambda fn, *a: _Done(fn(*a)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add synchronisation (workers: one thread each)
    try:
        ref_info, jobs = {}, []
        ref_jobs = [submit(reference_task, p, num_seeds, reference_steps, check_seeds) for p in problems]
        for future in (as_completed(ref_jobs) if pool else ref_jobs):  # a problem's candidates start once its reference is there
            problem, ref, info = future.result()
            ref_info[problem] = info
            say(f"reference {problem}: {info['steps']} EDM steps, error estimate {info['error_estimate']:.1e} "
                f"({info['seconds']:.0f} s)", flush=True)
            jobs += [submit(candidate_task, problem, num_seeds, c, ref, nfe_targets) for c in candidates]
        trips = []
        if roundtrip:
            for c in candidates:
                if c.is_bdia:
                    for gamma in dict.fromkeys([0.9, 1.0, c.kw["gamma"]]):
                        trips.append(submit(roundtrip_task, c, gamma))
        rows = []
        for job in as_completed(jobs) if pool else jobs:
            new = job.result()
            rows += new
            say(f"{new[0]['problem']:8s} {new[0]['label']:38s} " + " ".join(f"{r['rms_error']:.3g}" for r in new), flush=True)
        roundtrips = [t.result() for t in trips]
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.shutdown()
    order = {c.label: i for i, c in enumerate(candidates)}
    rows.sort(key=lambda r: (problems.index(r["problem"]), order[r["label"]], r["nfe_target"]))
    elapsed = time.perf_counter() - start
    verdict = verdicts(rows, candidates, problems)
    chosen, meets = choose_default(verdict) if verdict else (None, False)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "solver_study.csv")
    write_plot(rows, candidates, problems, chosen, out_dir / "solver_study.png")
    settings = dict(num_seeds=num_seeds, reference_steps=reference_steps, check_seeds=check_seeds, workers=workers,
                    elapsed=elapsed)
    write_markdown(rows, candidates, problems, ref_info, roundtrips, verdict, chosen, meets, settings,
                   out_dir / "solver_study.md")
    return {"rows": rows, "roundtrips": roundtrips, "verdict": verdict, "chosen": chosen, "meets_bar": meets,
            "reference": ref_info, "seconds": elapsed}


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# --------------------------------------------------------------------------------------------------
# Outputs.


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "rms_error": f"{row['rms_error']:.6e}", "fd": f"{row['fd']:.6g}"})


def _style(c: Candidate, chosen, index, count):
    if c.label == "edm":
        return dict(color="black", linewidth=3.0, linestyle="-", marker="o", zorder=5)
    if c.label == chosen:
        return dict(color="tab:red", linewidth=3.0, linestyle="-", marker="s", zorder=6)
    if c.solver in ("ddim", "bdia_ddim"):
        return dict(color="tab:blue" if c.solver == "ddim" else "tab:cyan", linewidth=1.4, linestyle=":", marker=".")
    return dict(color=plt.cm.tab20(index / max(count - 1, 1)), linewidth=1.1, marker="x", alpha=0.85,
                linestyle="--" if c.kw.get("space") == "x" else "-")


def write_plot(rows, candidates, problems, chosen, path: Path) -> None:
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 7.2), squeeze=False)
    nfes = [t for t in NFE_TARGETS if t in {r["nfe"] for r in rows}]
    for ax, problem in zip(axes[0], problems):
        for i, c in enumerate(candidates):
            data = sorted((r for r in rows if r["label"] == c.label and r["problem"] == problem), key=lambda r: r["nfe"])
            if data:
                ax.loglog([r["nfe"] for r in data], [r["rms_error"] for r in data], markersize=4,
                          label=c.label + ("  (default)" if c.label == chosen else ""), **_style(c, chosen, i, len(candidates)))
        ax.set_title({"mixture": f"analytic digits mixture ({MIXTURE_COMPONENTS} components)",
                      "digits": "embedded digits network"}.get(problem, problem))
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (measured)")
        ax.set_ylabel("trajectory RMS error vs fine reference")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("BDIA-EDM formulations vs EDM (black); red: the default. Dashed: x-space, solid: VP coordinates")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_csv(path: Path) -> list[dict]:
    """The rows :func:`write_csv` wrote (numbers back as numbers, ``nfe_target`` from the budget list)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["nfe"], r["num_steps"] = int(r["nfe"]), int(r["num_steps"])
        r["rms_error"], r["fd"] = float(r["rms_error"]), float(r["fd"])
    return rows


def _e(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "nan"


def write_markdown(rows, candidates, problems, ref_info, roundtrips, verdict, chosen, meets, settings, path):
    targets = sorted({r["nfe_target"] for r in rows})
    lines = [
        "# Which BDIA-EDM? The solver study",
        "",
        f"Generated by `{COMMAND}`; do not edit by hand. Raw numbers: `solver_study.csv`; plot: `solver_study.png`.",
        f"Run: {settings['num_seeds']} seeds per problem, {settings['workers']} worker process(es) of 1 torch thread, "
        f"**{settings['elapsed']:.0f} s wall time** on {os.cpu_count()} CPU(s); torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "## Set-up",
        "",
        f"* Problems: **mixture** — `bdia.analytic.digits_gmm(num_components={MIXTURE_COMPONENTS})`, the analytic "
        "digits mixture (16x16, std 0.05, exact non-linear denoiser in float64); **digits** — the embedded trained "
        "network (`bdia.models.digits_network`, float32 inside, float64 solver state).",
        f"* Every solver starts from the same noise `80 * n_k` (seed k's own generator, seeds 0-{settings['num_seeds'] - 1}) "
        "and runs on the Karras grid `bdia.karras_sigmas(N)` (80 → 0.002 → 0). NFE targets "
        f"{', '.join(map(str, targets))}: the most steps whose NFE fits (EDM family 2N − 1, DDIM family N, "
        "`backward=heun` 3N − 2); the NFE shown is counted by `bdia.CountingDenoiser`.",
        "* Trajectory error: RMS over all entries of `x - x_ref` (per pixel, images in [-1, 1]); the reference "
        "`x_ref` is EDM's Heun with many steps from the same noise:",
    ]
    for p in problems:
        info = ref_info[p]
        lines.append(f"  * {p}: {info['steps']} steps (NFE {info['nfe']}); RMS gap to {info['check_steps']} steps on "
                     f"{settings['check_seeds']} seeds {info['gap']:.2e}, so its own error is about "
                     f"{info['error_estimate']:.1e} (second-order extrapolation), below every error measured here "
                     f"({min(r['rms_error'] for r in rows if r['problem'] == p):.2e}).")
    lines += [
        "* FD: Fréchet distance in the shipped digits classifier's 64-d features (**not FID**) against the 597 "
        "held-out real digits, images quantised like every generated image.",
        "* Observed order: slope of log error vs log NFE between the two largest budgets.",
        "* Candidates: `bdia_edm` with `space` (x: EDM's x-space, c_k = 1; vp: z = αx, α = 1/sqrt(σd² + σ²), "
        "c_k = α_(k−1)/α_(k+1)), `backward` (euler, taylor, exp: no extra NFE; heun: +1 NFE per step), and gamma "
        "(constant, `obelm`, `lte`); see `bdia/solvers.py`.",
        "",
    ]
    for metric, title in (("rms_error", "Trajectory RMS error (lower is better; measured NFE in brackets)"),
                          ("fd", "FD in digits-classifier features (lower is better)")):
        lines += [f"## {title}", ""]
        for p in problems:
            lines += [f"### {p}", "", "| solver | " + " | ".join(f"NFE ≈ {t}" for t in targets)
                      + (" | order |" if metric == "rms_error" else " |"),
                      "|---|" + "---|" * len(targets) + ("---|" if metric == "rms_error" else "")]
            for c in candidates:
                data = {r["nfe_target"]: r for r in rows if r["label"] == c.label and r["problem"] == p}
                if not data:
                    continue
                cells = [f"{_e(data[t][metric])}" + (f" ({data[t]['nfe']})" if metric == "rms_error" else "")
                         if t in data else "" for t in targets]
                name = f"**{c.label}** (default)" if c.label == chosen else c.label
                order = f" | {observed_order(rows, c.label, p):.2f} |" if metric == "rms_error" else " |"
                lines.append(f"| {name} | " + " | ".join(cells) + order)
            lines.append("")
    lines += ["## Error ratio to EDM (trajectory error; < 1: BDIA-EDM better)", "",
              "| candidate | " + " | ".join(f"{p} NFE {t}" for p in problems for t in targets) + " | geo. mean | bar |",
              "|---|" + "---|" * (len(problems) * len(targets) + 2)]
    for label, v in verdict.items():
        cells = [f"{v['ratios'][p].get(t, float('nan')):.2f}" for p in problems for t in targets]
        name = f"**{label}**" if label == chosen else label
        bar = "beats EDM everywhere" if v["beats_everywhere"] else ("meets" if v["meets_bar"] else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['score']:.3f} | {bar} |")
    lines += ["", f"Bar (issue 13): beat EDM at NFE 9 and 15 on both problems, and lose by no more than {RATIO_BAR}x "
              "anywhere. Choice: a candidate that beats EDM at every NFE if there is one, else the lowest geometric "
              "mean of the ratios among those meeting the bar.", ""]
    if chosen:
        lines.append(f"**Chosen: {chosen}** — "
                     + ("meets the bar." if meets else "no candidate meets the bar; this is the best by the score."))
        current = _edm(**{k: v for k, v in bdia.solvers.BDIA_EDM_DEFAULTS.items()})
        lines.append(f"bdia.bdia_edm's default in this checkout (`bdia.solvers.BDIA_EDM_DEFAULTS`): {current.label} — "
                     + ("the chosen one." if current.label == chosen else "**differs from the chosen one: update it.**"))
        lines.append("")
    if roundtrips:
        lines += ["## Round trip (float64, mixture, N = 18, 16 seeds: sample → invert → sample)", "",
                  "| candidate | γ | noise recovered, max abs error / σ_max | regenerated pair, max abs error |",
                  "|---|---|---|---|"]
        for label, gamma, noise_err, regen_err in roundtrips:
            lines.append(f"| {label} | {gamma} | {noise_err:.1e} | {regen_err:.1e} |")
        worst = [t for t in roundtrips if isinstance(t[1], (int, float)) and t[1] >= 0.9]
        if worst:
            bad = [t for t in worst if max(t[2], t[3]) > ROUNDTRIP_BOUND]
            lines += ["", f"At γ ≥ 0.9 every candidate's round-trip error is ≤ {ROUNDTRIP_BOUND:g}." if not bad else
                      f"At γ ≥ 0.9 these exceed {ROUNDTRIP_BOUND:g}: " + ", ".join(f"{t[0]} γ={t[1]}" for t in bad) + "."]
        lines.append("Schedules that taper γ far below 1 (`lte`, `obelm`) amplify round-off by about ∏ 1/γ_k on "
                     "inversion: they are sampling settings, not editing ones.")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seeds", type=int, default=256, help="initial noises per problem (default 256)")
    parser.add_argument("--nfe-targets", type=int, nargs="+", default=list(NFE_TARGETS))
    parser.add_argument("--reference-steps", type=int, default=150, help="EDM steps of the reference (default 150)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    parser.add_argument("--smoke", action="store_true", help="a few candidates, for tests")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results"))
    parser.add_argument("--plot-only", action="store_true", help="redraw solver_study.png from solver_study.csv")
    args = parser.parse_args(argv)
    if args.plot_only:
        out = Path(args.out_dir)
        rows = read_csv(out / "solver_study.csv")
        chosen = next((line.split("**Chosen: ")[1].split("**")[0] for line in (out / "solver_study.md").read_text().splitlines()
                       if line.startswith("**Chosen: ")), None)
        write_plot(rows, CANDIDATES, PROBLEMS, chosen, out / "solver_study.png")
        return
    result = run(num_seeds=args.num_seeds, nfe_targets=args.nfe_targets, out_dir=args.out_dir,
                 reference_steps=args.reference_steps, workers=args.workers,
                 candidates=SMOKE_CANDIDATES if args.smoke else CANDIDATES)
    print(f"chosen default: {result['chosen']} (meets the bar: {result['meets_bar']}); "
          f"{result['seconds']:.0f} s; wrote {Path(args.out_dir) / 'solver_study.md'} (+ .csv, .png)")


if __name__ == "__main__":
    main()
