"""Which sampler? Every solver in bdia, the invertible ones and the ones people pick at low NFE, on the same problems.

    make samplers                                 # = OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_study.py
    python benchmarks/sampler_study.py --quick --out-dir /tmp/samplers        # a minute, for tests

Three problems, every solver from the same noise ``80 * n_k`` (seed k's own generator) on the Karras grid
``bdia.karras_sigmas(N)`` (80 -> 0.002 -> 0), at NFE 5, 9, 15, 25, 35 (and 50, 100 on the analytic ones), NFE counted
by ``bdia.CountingDenoiser``:

* ``mixture``: ``bdia.analytic.digits_gmm(num_components=300)`` (16x16, std 0.05), as ``make study``;
* ``sharp64``: ``bdia.analytic.gmm_toy(dim=(1, 8, 8), num_components=16, std=0.05, seed=0)``, a sharp 64-d mixture
  (the kind of problem issue 23 reported mode flips on); ``--check-seed`` runs the flip analysis on another draw too;
* ``digits``: the embedded digits network (``bdia.models.digits_network``, float32 inside, float64 states).

Reference solutions: the analytic problems' exact ODE solution from scipy's DOP853 on the closed-form velocity (written
here, independent of bdia's solvers and denoiser; rtol 1e-10, its error estimated against rtol 1e-8), integrated to
sigma = 0 exactly; the network's from UniPC-3 with ``--reference-steps`` steps (error estimated against 60 % of them).

Measured per (problem, solver, NFE): RMS trajectory error (over all entries of ``x - x_ref``), the per-sample RMS
error's median / 90th / 99th percentile / max, the number of mode flips (the sample ends nearest another mixture
component than the reference; on the network, the shipped digits classifier names another digit), and FD in that
classifier's features against the held-out digits (16x16 problems). For the invertible solvers also the round trip
(sample -> invert -> sample, float64 and float32 states) and its NFE. Then: the best sampler per NFE, invertible and
not; which invertible one to recommend (:func:`choose_invertible`); and what sends trajectories into another
component (:func:`flip_analysis`). Writes ``<out-dir>/samplers.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
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

import bdia  # noqa: E402
from bdia.analytic import digits_gmm, gmm_toy  # noqa: E402
from bdia.imageio import quantize, seed_noise  # noqa: E402
from bdia.metrics.digits_classifier import load_digits_classifier  # noqa: E402
from bdia.metrics.fid import DigitsFD  # noqa: E402
from bdia.models import digits_network  # noqa: E402
from bdia.rex import rex_nfe  # noqa: E402

COMMAND = "make samplers  (= OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_study.py)"
SIGMA_MAX = 80.0
NFE_TARGETS = (5, 9, 15, 25, 35)
EXTRA_NFE = (50, 100)  # analytic problems only (the network's reference is not accurate enough there)
PROBLEMS = ("mixture", "sharp64", "digits")
ANALYTIC = ("mixture", "sharp64")
GOAL_PROBLEMS = ("mixture", "digits")  # issue 23's two problems
GOAL_NFE = (5, 9, 15, 25, 35)
GOAL_RATIO = 1.2
ROUNDTRIP_SEEDS = 16
ROUNDTRIP_NFE = 25
CSV_FIELDS = ("problem", "label", "solver", "options", "invertible", "nfe_target", "num_steps", "nfe", "rms_error",
              "q50", "q90", "q99", "max", "flips", "fd")


@dataclass(frozen=True)
class Candidate:
    """One solver setting: ``solver``, its keyword options as (name, value) pairs, and whether it is invertible."""

    label: str
    solver: str
    options: tuple = ()
    invertible: bool = False

    @property
    def kw(self) -> dict:
        return dict(self.options)

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` steps on a grid ending at 0 (checked against the count)."""
        if self.solver in ("edm", "bdia_edm"):
            return 2 * num_steps - 1
        if self.solver == "rex":
            return rex_nfe(num_steps, self.kw.get("tableau", "midpoint"))
        return num_steps

    def steps_for(self, nfe_target: int) -> int | None:
        """The most steps whose NFE fits in ``nfe_target``; None when even 2 steps do not."""
        if self.nfe(2) > nfe_target:
            return None
        num_steps = 2
        while self.nfe(num_steps + 1) <= nfe_target:
            num_steps += 1
        return num_steps


def _c(label, solver, invertible=False, **kw) -> Candidate:
    return Candidate(label, solver, tuple(kw.items()), invertible)


CANDIDATES = (
    _c("ddim", "ddim"),
    _c("dpmpp_2m", "dpmpp_2m"),
    _c("unipc", "unipc"),
    _c("unipc order=3", "unipc", order=3),
    _c("ipndm", "ipndm"),
    _c("edm", "edm"),
    _c("bdia_ddim γ=1", "bdia_ddim", True, gamma=1.0),
    _c("bdia_ddim γ=obelm", "bdia_ddim", True, gamma="obelm"),
    _c("bdia_ddim γ=obelm_ei", "bdia_ddim", True, gamma="obelm_ei"),
    _c("bdia_ddim γ=obelm_mix", "bdia_ddim", True, gamma="obelm_mix"),
    _c("bdia_edm", "bdia_edm", True),
    _c("rex euler", "rex", True, tableau="euler"),
    _c("rex midpoint", "rex", True, tableau="midpoint"),
    _c("rex rk4", "rex", True, tableau="rk4"),
)
QUICK_CANDIDATES = tuple(c for c in CANDIDATES if c.label in (
    "dpmpp_2m", "ipndm", "bdia_ddim γ=obelm", "bdia_ddim γ=obelm_mix", "rex euler"))


# --------------------------------------------------------------------------------------------------
# Problems and their references (each worker process builds its own).


def make_denoiser(problem: str, check_seed: int | None = None):
    if problem == "mixture":
        return digits_gmm(num_components=300)
    if problem == "sharp64":
        return gmm_toy(dim=(1, 8, 8), num_components=16, std=0.05, seed=0 if check_seed is None else check_seed)
    return digits_network()


def event_shape(problem: str) -> tuple:
    return (1, 8, 8) if problem == "sharp64" else (1, 16, 16)


class MixtureVelocity:
    """The probability-flow ODE of an isotropic Gaussian mixture in closed form, on flattened numpy states:
    with ``v_k = s_k^2 + sigma^2`` and responsibilities ``r_k(x)`` of ``N(x; mu_k, v_k I)``,
    ``dx/dsigma = (x - D(x, sigma)) / sigma = sigma * sum_k r_k (x - mu_k) / v_k``, smooth through sigma = 0."""

    def __init__(self, denoiser):
        num = denoiser.means.shape[0]
        self.means = denoiser.means.reshape(num, -1).double().numpy()
        self.variances = np.broadcast_to((denoiser.stds.double() ** 2).numpy(), (num,))
        self.log_weights = denoiser.weights.double().log().numpy()
        self.mean_sq = (self.means**2).sum(1)[None]
        self.dim = self.means.shape[1]
        self.evaluations = 0

    def __call__(self, sigma, y):
        self.evaluations += 1
        x = y.reshape(-1, self.dim)
        var = self.variances + sigma**2
        dist_sq = (x * x).sum(1)[:, None] - 2 * x @ self.means.T + self.mean_sq
        log_r = self.log_weights - 0.5 * dist_sq / var - 0.5 * self.dim * np.log(var)
        log_r -= log_r.max(axis=1, keepdims=True)
        resp = np.exp(log_r)
        resp /= resp.sum(axis=1, keepdims=True)
        weights = resp / var
        return (sigma * (x * weights.sum(1, keepdims=True) - weights @ self.means)).ravel()


def check_velocity(velocity: MixtureVelocity, denoiser, x) -> None:
    """Guard: the reference's ODE is bdia's, ``(x - D(x, sigma)) / sigma``, at a few noise levels."""
    for sigma in (0.05, 0.5, 5.0):
        state = x * (sigma / SIGMA_MAX) + denoiser.means[0]
        slope = (state - denoiser(state, torch.tensor(sigma, dtype=torch.float64))) / sigma
        gap = np.abs(slope.reshape(-1).numpy() - velocity(sigma, state.reshape(-1).numpy())).max()
        if gap > 1e-9 * max(1.0, float(slope.abs().max())):
            raise AssertionError(f"reference velocity differs from (x - D) / sigma by {gap:.2e} at sigma={sigma}")


def solve_reference(denoiser, x_init, rtol, sigma_to=0.0, sigma_eval=None):
    velocity = MixtureVelocity(denoiser)
    kw = {} if sigma_eval is None else {"t_eval": sigma_eval}
    result = solve_ivp(velocity, (SIGMA_MAX, sigma_to), x_init.reshape(-1).numpy(), method="DOP853", rtol=rtol,
                       atol=rtol, **kw)
    if not result.success:
        raise RuntimeError(f"reference ODE solve failed: {result.message}")
    states = torch.from_numpy(result.y.T.copy()).reshape(-1, *x_init.shape)
    return (states if sigma_eval is not None else states[-1]), velocity.evaluations


_STATE: dict = {}


def _worker_init(threads: int):
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # predicted round-off warnings: the study measures it


def problem_state(problem: str, num_seeds: int, check_seed=None):
    key = (problem, num_seeds, check_seed)
    if key not in _STATE:
        _STATE[key] = (make_denoiser(problem, check_seed), seed_noise(range(num_seeds), event_shape(problem), SIGMA_MAX))
    return _STATE[key]


def reference_task(problem: str, num_seeds: int, reference_steps: int, check_seeds: int, quick: bool):
    """The reference final states and an estimate of their error (RMS, the study's units)."""
    den, noise = problem_state(problem, num_seeds)
    start = time.perf_counter()
    if problem in ANALYTIC:
        rtol = 1e-7 if quick else 1e-10
        check_velocity(MixtureVelocity(den), den, noise[:2])
        ref, evaluations = solve_reference(den, noise, rtol)
        loose, _ = solve_reference(den, noise[:check_seeds], rtol * 100)
        gap = float((loose - ref[:check_seeds]).square().mean().sqrt())
        info = {"method": f"scipy DOP853, rtol = atol = {rtol:g}, to sigma = 0", "evaluations": evaluations,
                "check": f"rtol {rtol * 100:g} on {check_seeds} seeds", "gap": gap, "error_estimate": gap}
    else:
        ref = bdia.sample(den, noise, bdia.karras_sigmas(reference_steps, sigma_max=SIGMA_MAX), solver="unipc", order=3)
        coarse_steps = max(3, (3 * reference_steps) // 5)
        coarse = bdia.sample(den, noise[:check_seeds], bdia.karras_sigmas(coarse_steps, sigma_max=SIGMA_MAX),
                             solver="unipc", order=3)
        gap = float((coarse - ref[:check_seeds]).square().mean().sqrt())
        q = coarse_steps / reference_steps
        info = {"method": f"UniPC-3 (bdia.unipc, order=3), {reference_steps} Karras steps", "evaluations": reference_steps,
                "check": f"{coarse_steps} steps on {check_seeds} seeds", "gap": gap,
                "error_estimate": gap * q**4 / (1 - q**4)}  # fourth order: the finer solve's share of the gap
    info["seconds"] = time.perf_counter() - start
    return problem, ref, info


class Scorer:
    """FD in the digits classifier's features (16x16 problems) and the classifier's digit for each sample."""

    def __init__(self):
        self.distance = DigitsFD(kid=False, real_floor=False)  # against digits-test, the library's metric
        self.classifier = load_digits_classifier()

    def fd(self, x) -> float:
        if not bool(torch.isfinite(x).all()):
            return float("nan")
        return float(self.distance(quantize(x))["fd"])

    @torch.no_grad()
    def digit(self, x) -> torch.Tensor:
        images = quantize(x.nan_to_num(0.0)).to(torch.float32) / 127.5 - 1.0
        return self.classifier(images).argmax(1)


def component(denoiser, x) -> torch.Tensor:
    """The mixture component each sample ends nearest to (most likely at sigma = 0)."""
    return denoiser.log_prob_components(x.nan_to_num(1e6), torch.zeros((), dtype=torch.float64)).argmax(1)


def candidate_task(problem: str, num_seeds: int, candidate: Candidate, ref: torch.Tensor, nfe_targets):
    den, noise = problem_state(problem, num_seeds)
    if "scorer" not in _STATE:
        _STATE["scorer"] = Scorer()
    scorer = _STATE["scorer"]
    mode_of = (lambda x: component(den, x)) if problem in ANALYTIC else scorer.digit
    ref_mode = mode_of(ref)
    rows = []
    for target in nfe_targets:
        steps = candidate.steps_for(target)
        row = {"problem": problem, "label": candidate.label, "solver": candidate.solver,
               "options": ", ".join(f"{k}={v}" for k, v in candidate.kw.items()), "invertible": candidate.invertible,
               "nfe_target": target}
        if steps is None:
            rows.append({**row, "num_steps": "", "nfe": "", **{k: float("nan") for k in CSV_FIELDS[8:]}})
            continue
        counter = bdia.CountingDenoiser(den)
        x = bdia.sample(counter, noise, bdia.karras_sigmas(steps, sigma_max=SIGMA_MAX), solver=candidate.solver,
                        **candidate.kw)
        if counter.nfe != candidate.nfe(steps):
            raise AssertionError(f"{candidate.label}: counted NFE {counter.nfe}, expected {candidate.nfe(steps)}")
        per_sample = (x - ref).reshape(len(x), -1).square().mean(1).sqrt()
        q50, q90, q99 = (float(v) for v in per_sample.nan_to_num(float("inf")).quantile(
            torch.tensor([0.5, 0.9, 0.99], dtype=per_sample.dtype)))
        rows.append({**row, "num_steps": steps, "nfe": counter.nfe,
                     "rms_error": float(per_sample.square().mean().sqrt()), "q50": q50, "q90": q90, "q99": q99,
                     "max": float(per_sample.max()), "flips": int((mode_of(x) != ref_mode).sum()),
                     "fd": scorer.fd(x) if event_shape(problem) == (1, 16, 16) else float("nan")})
    return rows


def roundtrip_task(problem: str, candidate: Candidate, dtype_name: str):
    """sample -> invert -> sample from ROUNDTRIP_SEEDS noises at the NFE nearest ROUNDTRIP_NFE: the largest error of
    the recovered noise relative to its size, of the regenerated sample (absolute), and the three phases' NFE."""
    dtype = getattr(torch, dtype_name)
    den, _ = problem_state(problem, 1)
    noise = seed_noise(range(ROUNDTRIP_SEEDS), event_shape(problem), SIGMA_MAX)
    steps = candidate.steps_for(ROUNDTRIP_NFE)
    sigmas = bdia.karras_sigmas(steps, sigma_max=SIGMA_MAX)
    counter = bdia.CountingDenoiser(den)
    nfe = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pair = bdia.sample(counter, noise, sigmas, solver=candidate.solver, return_pair=True, dtype=dtype,
                           **candidate.kw)
        nfe.append(counter.nfe)
        counter.reset()
        start = bdia.invert(counter, pair, sigmas, solver=candidate.solver, dtype=dtype, **candidate.kw)
        nfe.append(counter.nfe)
        counter.reset()
        again = bdia.sample(counter, start, sigmas, solver=candidate.solver, return_pair=True, dtype=dtype,
                            **candidate.kw)
        nfe.append(counter.nfe)
    noise_err = float((start.x_end.double() - noise).abs().max() / noise.abs().max())
    regen_err = float((again.x_end.double() - pair.x_end.double()).abs().max())
    return {"problem": problem, "label": candidate.label, "dtype": dtype_name, "num_steps": steps,
            "noise_error": noise_err, "regen_error": regen_err, "nfe_sample": nfe[0], "nfe_invert": nfe[1],
            "nfe_regenerate": nfe[2]}


# --------------------------------------------------------------------------------------------------
# What sends trajectories into another component (sharp 64-d mixture).

FLIP_NFE = (15, 25, 35)
FLIP_SOLVERS = (_c("bdia_ddim γ=obelm", "bdia_ddim", True, gamma="obelm"),
                _c("bdia_ddim γ=obelm_mix", "bdia_ddim", True, gamma="obelm_mix"),
                _c("dpmpp_2m", "dpmpp_2m"), _c("unipc", "unipc"))


def _capped_obelm(sigmas):
    return [min(1.0, g) for g in bdia.gamma_schedule("obelm", sigmas, "bdia_ddim")[1:]]


def flip_task(num_seeds: int, check_seed: int | None, quick: bool):
    """Flips of a few solvers on the sharp mixture under changes of one thing at a time: an exact first step (the
    reference's state at sigma_1), obelm's gamma capped at 1 (it exceeds 1 at high noise), the grid (Karras rho 5, 3).
    Also the reference trajectory's posterior margin (top two components) at sigma = 2 for flipped samples vs all."""
    den, noise = problem_state("sharp64", num_seeds, check_seed)
    rtol = 1e-7 if quick else 1e-10
    ref, _ = solve_reference(den, noise, rtol)
    ref_mode = component(den, ref)
    rows = []
    flipped = set()
    for c in FLIP_SOLVERS:
        for variant in ("karras rho=7", "exact first step", "gamma capped at 1", "karras rho=5", "karras rho=3"):
            if variant == "exact first step" and not c.invertible or variant == "gamma capped at 1" and c.kw.get("gamma") != "obelm":
                continue
            counts = {}
            for nfe in FLIP_NFE:
                rho = float(variant.split("=")[1]) if variant.startswith("karras") else 7.0
                sigmas = bdia.karras_sigmas(nfe, sigma_max=SIGMA_MAX, rho=rho)
                kw = dict(c.kw)
                start = noise
                if variant == "gamma capped at 1":
                    kw["gamma"] = _capped_obelm(sigmas)
                if variant == "exact first step":
                    x_1, _ = solve_reference(den, noise, rtol, sigma_to=float(sigmas[1]))
                    start = (noise, x_1)
                x = bdia.sample(den, start, sigmas, solver=c.solver, **kw)
                wrong = component(den, x) != ref_mode
                counts[nfe] = int(wrong.sum())
                if variant == "karras rho=7":
                    flipped |= set(wrong.nonzero().flatten().tolist())
            rows.append({"label": c.label, "variant": variant, **{f"flips_{n}": counts[n] for n in FLIP_NFE}})
    # the reference's posterior margin where the components separate
    at_two, _ = solve_reference(den, noise, rtol, sigma_to=2.0)
    log_p = den.log_prob_components(at_two, torch.tensor(2.0, dtype=torch.float64))
    top = log_p.softmax(-1).topk(2, dim=-1).values
    margin = (top[:, 0] - top[:, 1])
    median_all = float(margin.median())
    flipped_margins = sorted(float(margin[i]) for i in flipped)
    return {"check_seed": check_seed, "rows": rows, "margin_all_median": median_all,
            "margins_flipped": flipped_margins, "num_seeds": num_seeds}


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# --------------------------------------------------------------------------------------------------
# Analysis.


def best(rows, problem, target, invertible: bool):
    pool = [r for r in rows if r["problem"] == problem and r["nfe_target"] == target and r["invertible"] == invertible
            and isinstance(r["nfe"], int) and math.isfinite(r["rms_error"])]
    return min(pool, key=lambda r: r["rms_error"]) if pool else None


def ratios_to_best(rows, label):
    """Per (problem, NFE) of the goal: this candidate's RMS error over the best non-invertible one's."""
    out = {}
    measured = {r["nfe_target"] for r in rows}
    for problem in GOAL_PROBLEMS:
        for target in (t for t in GOAL_NFE if t in measured):
            mine = next((r for r in rows if r["problem"] == problem and r["label"] == label and r["nfe_target"] == target), None)
            other = best(rows, problem, target, invertible=False)
            if mine is not None and other is not None and isinstance(mine["nfe"], int):
                out[(problem, target)] = mine["rms_error"] / other["rms_error"]
            else:
                out[(problem, target)] = float("inf")
    return out


def choose_invertible(rows, candidates) -> tuple[str, dict]:
    """The invertible sampler to recommend: the lowest geometric mean of its error ratios to the best non-invertible
    sampler over NFE 5-35 on the mixture and the digits network (issue 23's goal is every ratio <= 1.2). Returns the
    label and every invertible candidate's ratios, geometric mean and largest ratio."""
    table = {}
    for c in candidates:
        if not c.invertible:
            continue
        ratios = ratios_to_best(rows, c.label)
        finite = [q for q in ratios.values() if math.isfinite(q)]
        score = math.exp(sum(map(math.log, finite)) / len(finite)) if len(finite) == len(ratios) else float("inf")
        table[c.label] = {"ratios": ratios, "score": score, "max_ratio": max(ratios.values())}
    chosen = min(table, key=lambda label: table[label]["score"]) if table else None
    return chosen, table


def observed_order(rows, problem, label) -> float:
    data = sorted((r for r in rows if r["problem"] == problem and r["label"] == label and isinstance(r["nfe"], int)),
                  key=lambda r: r["nfe"])
    if len(data) < 2:
        return float("nan")
    a, b = data[-2], data[-1]
    return math.log(a["rms_error"] / b["rms_error"]) / math.log(b["nfe"] / a["nfe"])


# --------------------------------------------------------------------------------------------------
# The run.


def run(num_seeds=256, sharp_seeds=500, nfe_targets=NFE_TARGETS, extra_nfe=EXTRA_NFE, out_dir=REPO_ROOT / "results",
        reference_steps=200, check_seeds=64, candidates=CANDIDATES, problems=PROBLEMS, check_seed=1, workers=2,
        quick=False, progress=True):
    start = time.perf_counter()
    out_dir = Path(out_dir)
    say = print if progress else (lambda *a, **k: None)
    check_seeds = min(check_seeds, num_seeds)
    pool = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(1,)) if workers > 1 else None
    submit = pool.submit if pool else (lambda fn, *a: _Done(fn(*a)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seeds_of = {p: sharp_seeds if p == "sharp64" else num_seeds for p in problems}
    try:
        flips = []
        if "sharp64" in problems:
            flips = [submit(flip_task, seeds_of["sharp64"], None, quick)]
            if check_seed is not None:
                flips.append(submit(flip_task, seeds_of["sharp64"], check_seed, quick))
        ref_jobs = [submit(reference_task, p, seeds_of[p], reference_steps, min(check_seeds, seeds_of[p]), quick)
                    for p in problems]
        trips = [submit(roundtrip_task, p, c, d) for p in problems if p in ("mixture", "digits")
                 for c in candidates if c.invertible for d in ("float64", "float32")]
        ref_info, jobs = {}, []
        for future in (as_completed(ref_jobs) if pool else ref_jobs):
            problem, ref, info = future.result()
            ref_info[problem] = info
            say(f"reference {problem}: {info['method']} ({info['seconds']:.0f} s), error ~{info['error_estimate']:.1e}",
                flush=True)
            targets = tuple(nfe_targets) + (tuple(extra_nfe) if problem in ANALYTIC else ())
            jobs += [submit(candidate_task, problem, seeds_of[problem], c, ref, targets) for c in candidates]
        rows = []
        for job in as_completed(jobs) if pool else jobs:
            new = job.result()
            rows += new
            say(f"{new[0]['problem']:8s} {new[0]['label']:24s} " + " ".join(
                f"{r['rms_error']:.3g}" if isinstance(r["nfe"], int) else "-" for r in new), flush=True)
        roundtrips = [t.result() for t in trips]
        flip_results = [f.result() for f in flips]
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.shutdown()
    order = {c.label: i for i, c in enumerate(candidates)}
    rows.sort(key=lambda r: (problems.index(r["problem"]), order[r["label"]], r["nfe_target"]))
    chosen, verdict = choose_invertible(rows, candidates)
    settings = dict(num_seeds=num_seeds, sharp_seeds=sharp_seeds, reference_steps=reference_steps, workers=workers,
                    check_seed=check_seed, quick=quick, seconds=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "samplers.csv")
    write_plot(rows, candidates, problems, out_dir / "samplers.png", chosen)
    write_markdown(rows, candidates, problems, ref_info, roundtrips, flip_results, chosen, verdict, settings,
                   out_dir / "samplers.md")
    return {"rows": rows, "roundtrips": roundtrips, "flips": flip_results, "chosen": chosen, "verdict": verdict,
            "references": ref_info, "seconds": settings["seconds"]}


def write_csv(rows, path: Path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    def parse(key, value):
        if key in ("problem", "label", "solver", "options"):
            return value
        if key == "invertible":
            return value == "True"
        if key in ("nfe_target", "num_steps", "nfe", "flips"):
            return int(float(value)) if value not in ("", "nan") else ""
        return float(value)

    with open(path) as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_plot(rows, candidates, problems, path: Path, chosen=None):
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.6), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, problem in zip(axes[0], problems):
        for i, c in enumerate(candidates):
            data = [r for r in rows if r["problem"] == problem and r["label"] == c.label and isinstance(r["nfe"], int)
                    and math.isfinite(r["rms_error"])]
            if not data:
                continue
            mine = c.label == chosen
            ax.plot([r["nfe"] for r in data], [r["rms_error"] for r in data], "-" if c.invertible else "--",
                    marker="o" if c.invertible else "s", markersize=3.5, color="black" if mine else colours(i % 20),
                    linewidth=3.0 if mine else 2.0 if c.invertible else 1.3, zorder=5 if mine else 2,
                    label=c.label + (" (invertible)" if c.invertible else "") + (", recommended" if mine else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations, counted)")
        ax.set_title(problem)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("trajectory RMS error vs fine reference")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("Which sampler? Error vs NFE; invertible solid, not invertible dashed, the recommended invertible "
                 "one black (make samplers)")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, digits=3):
    if value == "" or value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def write_markdown(rows, candidates, problems, ref_info, roundtrips, flip_results, chosen, verdict, settings, path):
    torch_version = torch.__version__
    lines = [
        "# Which sampler? Every solver on the same problems",
        "",
        f"Generated by `{COMMAND}`; do not edit by hand. Raw numbers: `samplers.csv`; plot: `samplers.png`.",
        f"Run: {settings['num_seeds']} seeds (sharp64: {settings['sharp_seeds']}), {settings['workers']} worker "
        f"process(es) of 1 torch thread, **{settings['seconds']:.0f} s wall time** on {os.cpu_count()} CPU(s); "
        f"torch {torch_version}, scipy {scipy.__version__}, Python {platform.python_version()}"
        + (" — **quick mode** (few seeds, loose references: a smoke run, not a measurement)." if settings["quick"] else "."),
        "",
        "## Set-up",
        "",
        "* Problems: **mixture** — `bdia.analytic.digits_gmm(num_components=300)` (16x16, std 0.05); **sharp64** — "
        "`bdia.analytic.gmm_toy(dim=(1, 8, 8), num_components=16, std=0.05, seed=0)`, a sharp 64-d mixture; **digits** — "
        "the embedded trained network (`bdia.models.digits_network`, float32 inside, float64 solver state).",
        "* Every solver starts from the same noise `80 * n_k` (seed k's own generator) on the Karras grid "
        "`bdia.karras_sigmas(N)` (80 → 0.002 → 0) and gets the most steps whose NFE fits the target (counted by "
        "`bdia.CountingDenoiser`): DDIM, BDIA-DDIM, DPM-Solver++(2M), UniPC, iPNDM N; EDM, BDIA-EDM 2N − 1; Rex "
        "2s(N − 1) + 1 for an s-stage tableau (`–`: not even 2 steps fit).",
        "* References:",
    ]
    for p in problems:
        info = ref_info[p]
        lines.append(f"  * {p}: {info['method']} ({info['evaluations']} evaluations); RMS gap to {info['check']} "
                     f"{info['gap']:.1e}, so its error is about {info['error_estimate']:.1e}.")
    lines += [
        "* Error: RMS over all entries of `x - x_ref`; per sample, the RMS over its entries, with its median (q50), 90th, "
        "99th percentile and maximum. Flips: samples ending nearest another mixture component than the reference "
        "(on the network: the shipped digits classifier names another digit than for the reference sample). FD: "
        "Fréchet distance in the digits classifier's 64-d features (**not FID**) against the 597 held-out digits.",
        "* BDIA's `gamma` schedules for `bdia_ddim` (`bdia.gammas.gamma_schedule`): `obelm` cancels Euler's local "
        "error expanded in sigma; `obelm_ei` the same expanded in DPM-Solver++'s variable λ = −log σ (exact for a "
        "denoiser output linear in λ); `obelm_mix` takes the λ one where the noise dominates and the sigma one where "
        "the data does (weighted by σ²/(1 + σ²)). γ = 1 is the editing setting (the most exact inversion). Rex: "
        "ζ = 0.999 (the reference implementation's scripts), tableau as named.",
        "",
        "## Trajectory RMS error (lower is better; measured NFE in brackets)",
        "",
    ]
    for p in problems:
        targets = sorted({r["nfe_target"] for r in rows if r["problem"] == p})
        lines += [f"### {p}", "", "| solver | invertible | " + " | ".join(f"NFE ≈ {t}" for t in targets) + " | order |",
                  "|---|---|" + "---|" * len(targets) + "---|"]
        for c in candidates:
            data = {r["nfe_target"]: r for r in rows if r["problem"] == p and r["label"] == c.label}
            cells = [f"{_fmt(data[t]['rms_error'])} ({data[t]['nfe']})" if isinstance(data[t]["nfe"], int) else "–"
                     for t in targets]
            lines.append(f"| {c.label} | {'yes' if c.invertible else 'no'} | " + " | ".join(cells)
                         + f" | {_fmt(observed_order(rows, p, c.label), 2)} |")
        lines.append("")
    lines += ["## Per-sample errors and mode flips", "",
              "Each cell: median / 99th percentile / max of the per-sample RMS error, and the number of flipped samples "
              "(of all seeds). A few flips dominate the RMS where the median is small.", ""]
    for p in problems:
        targets = sorted({r["nfe_target"] for r in rows if r["problem"] == p})
        lines += [f"### {p}", "", "| solver | " + " | ".join(f"NFE ≈ {t}" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for c in candidates:
            data = {r["nfe_target"]: r for r in rows if r["problem"] == p and r["label"] == c.label}
            cells = [f"{_fmt(data[t]['q50'], 2)} / {_fmt(data[t]['q99'], 2)} / {_fmt(data[t]['max'], 2)}, **{data[t]['flips']}**"
                     if isinstance(data[t]["nfe"], int) else "–" for t in targets]
            lines.append(f"| {c.label} | " + " | ".join(cells) + " |")
        lines.append("")
    fd_problems = [p for p in problems if event_shape(p) == (1, 16, 16)]
    lines += ["## FD in digits-classifier features (lower is better)", ""]
    for p in fd_problems:
        targets = sorted({r["nfe_target"] for r in rows if r["problem"] == p})
        lines += [f"### {p}", "", "| solver | " + " | ".join(f"NFE ≈ {t}" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for c in candidates:
            data = {r["nfe_target"]: r for r in rows if r["problem"] == p and r["label"] == c.label}
            lines.append(f"| {c.label} | " + " | ".join(_fmt(data[t]["fd"]) for t in targets) + " |")
        lines.append("")
    lines += ["## The winner per NFE", "",
              "Lowest RMS error at each NFE target, among the invertible solvers and among the others; the ratio is "
              "invertible / not invertible (< 1: the invertible one wins).", "",
              "| problem | NFE ≈ | best not invertible | best invertible | ratio |", "|---|---|---|---|---|"]
    for p in problems:
        for t in sorted({r["nfe_target"] for r in rows if r["problem"] == p}):
            a, b = best(rows, p, t, False), best(rows, p, t, True)
            if a is None or b is None:
                continue
            lines.append(f"| {p} | {t} | {a['label']} {_fmt(a['rms_error'])} | {b['label']} {_fmt(b['rms_error'])} | "
                         f"{b['rms_error'] / a['rms_error']:.2f} |")
    points = list(next(iter(verdict.values()))["ratios"]) if verdict else []
    lines += ["", "## Which invertible sampler? (issue 23, item 4)", "",
              f"Goal: an exactly invertible sampler within {GOAL_RATIO}× of the best non-invertible one at every NFE "
              f"{GOAL_NFE[0]}–{GOAL_NFE[-1]} on {' and '.join(GOAL_PROBLEMS)}. Rule: recommend the invertible "
              "candidate with the lowest geometric mean of those ratios.", "",
              "| candidate | " + " | ".join(f"{p} {t}" for p, t in points) + " | geo. mean | largest |",
              "|---|" + "---|" * (len(points) + 2)]
    for label, v in sorted(verdict.items(), key=lambda item: item[1]["score"]):
        name = f"**{label}**" if label == chosen else label
        lines.append(f"| {name} | " + " | ".join(_fmt(v["ratios"][key], 3) for key in points)
                     + f" | {_fmt(v['score'], 3)} | {_fmt(v['max_ratio'], 3)} |")
    if chosen:
        v = verdict[chosen]
        met = [k for k, q in v["ratios"].items() if q <= GOAL_RATIO]
        missed = {k: q for k, q in v["ratios"].items() if q > GOAL_RATIO}
        lines += ["", f"**Recommended invertible sampler: {chosen}** (geometric mean {v['score']:.2f}×, largest "
                  f"{v['max_ratio']:.2f}×). " + ("It meets the goal everywhere." if not missed else
                  f"It meets the goal at {len(met)} of {len(v['ratios'])} points; it misses at "
                  + ", ".join(f"{p} NFE {t} ({q:.2f}×)" for (p, t), q in missed.items()) + ".")]
    lines += ["", "## Round trips of the invertible solvers", "",
              f"sample → invert → sample from {ROUNDTRIP_SEEDS} seeds at the steps whose NFE fits {ROUNDTRIP_NFE}; "
              "`dtype` is the solver state's (the network computes in float32 either way). Noise: the largest error of "
              "the recovered noise over its largest entry; regenerated: the largest absolute error of the regenerated "
              "sample. NFE: sampling / inversion / regeneration, counted.", "",
              "| problem | solver | N | dtype | noise recovered (relative) | regenerated (abs.) | NFE sample / invert / regenerate |",
              "|---|---|---|---|---|---|---|"]
    for t in sorted(roundtrips, key=lambda t: (t["problem"], [c.label for c in candidates].index(t["label"]), t["dtype"])):
        lines.append(f"| {t['problem']} | {t['label']} | {t['num_steps']} | {t['dtype']} | {t['noise_error']:.1e} | "
                     f"{t['regen_error']:.1e} | {t['nfe_sample']} / {t['nfe_invert']} / {t['nfe_regenerate']} |")
    lines += ["", "Our BDIA inversion keeps the model term in its first step (it evaluates the denoiser at the middle "
              "state of every step, the first one included); the BDIA baselines shipped in BELM's and Rex's "
              "repositories drop it (zituitui/BELM issue 13), so their BDIA round-trip numbers are not ours — this study "
              "reproduces none of them."]
    if flip_results:
        lines += ["", "## What sends trajectories into another component? (sharp64)", "",
                  "Flips (of all seeds) with one thing changed at a time: an exact first step (BDIA's plain first step "
                  "replaced by the reference's state at σ₁), obelm's γ capped at 1 (in VP coordinates it exceeds 1 at "
                  "high noise: 1.05–1.3 on these grids), and the grid's ρ.", ""]
        for result in flip_results:
            seed = 0 if result["check_seed"] is None else result["check_seed"]
            lines += [f"### gmm_toy seed {seed}" + (" (held-out draw)" if result["check_seed"] is not None else ""), "",
                      "| solver | variant | " + " | ".join(f"NFE {n}" for n in FLIP_NFE) + " |",
                      "|---|---|" + "---|" * len(FLIP_NFE)]
            for r in result["rows"]:
                lines.append(f"| {r['label']} | {r['variant']} | " + " | ".join(str(r[f'flips_{n}']) for n in FLIP_NFE) + " |")
            margins = result["margins_flipped"]
            lines += ["", f"Posterior margin between the two most likely components on the reference trajectory at "
                      f"σ = 2: median {result['margin_all_median']:.2f} over all {result['num_seeds']} samples; "
                      f"{len(margins)} sample(s) flipped by some solver on the ρ = 7 grid, margins "
                      + (", ".join(f"{m:.3f}" for m in margins[:12]) if margins else "none") + ".", ""]
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seeds", type=int, default=256, help="seeds for mixture and digits (default 256)")
    parser.add_argument("--sharp-seeds", type=int, default=500, help="seeds for sharp64 (default 500)")
    parser.add_argument("--reference-steps", type=int, default=200, help="UniPC-3 steps of the network's reference")
    parser.add_argument("--check-seed", type=int, default=1, help="held-out gmm_toy seed for the flip analysis")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few seeds, NFE 5 and 9, a few solvers")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results"))
    parser.add_argument("--plot-only", action="store_true", help="redraw samplers.png from samplers.csv")
    args = parser.parse_args(argv)
    if args.plot_only:
        out = Path(args.out_dir)
        chosen = next((line.split("**Recommended invertible sampler: ")[1].split("**")[0]
                       for line in (out / "samplers.md").read_text().splitlines()
                       if line.startswith("**Recommended invertible sampler: ")), None)
        write_plot(read_csv(out / "samplers.csv"), CANDIDATES, PROBLEMS, out / "samplers.png", chosen)
        return
    if args.quick:
        result = run(num_seeds=12, sharp_seeds=24, nfe_targets=(5, 9), extra_nfe=(), out_dir=args.out_dir,
                     reference_steps=30, check_seeds=6, candidates=QUICK_CANDIDATES, check_seed=None,
                     workers=args.workers, quick=True)
    else:
        result = run(num_seeds=args.num_seeds, sharp_seeds=args.sharp_seeds, out_dir=args.out_dir,
                     reference_steps=args.reference_steps, check_seed=args.check_seed, workers=args.workers)
    print(f"recommended invertible sampler: {result['chosen']}; {result['seconds']:.0f} s; "
          f"wrote {Path(args.out_dir) / 'samplers.md'} (+ .csv, .png)")


if __name__ == "__main__":
    main()
