"""The noise-optimisation app: change the starting noise of a diffusion model until a differentiable score of the
images it samples is high, back-propagating through every sampling step in constant memory (``bdia.sample_with_grad``).

``scripts/optimize.py`` (configs/optimize/optimize.yaml) optimises the noise of the embedded digits model so the
shipped digits classifier (:mod:`bdia.metrics.digits_classifier`) reads a chosen class, through all 35 network
evaluations of BDIA-EDM (or BDIA-DDIM), as DOODL (Wallace et al. 2023) and ReNO (Eyring et al. 2024) do for
Stable Diffusion. The pieces, as plain functions tests call:

* :func:`optimize_noise` -- the loop: Adam on the standard-normal noise ``n`` (the state is ``sigma_0 n``), loss per
  image ``score_loss(images) + prior_weight * gaussian_prior(n)``, summed over images (each image's gradient is its
  own). Resumable from the state it hands to ``on_iteration``.
* :func:`gaussian_prior` -- keeps the noise a typical Gaussian draw (ReNO's norm regulariser): the negative
  log-density of ``||n||`` under the chi distribution with ``d`` degrees of freedom (``||n||`` of a standard normal
  ``n`` in ``d`` dimensions), shifted to 0 at its mode ``sqrt(d - 1)``. Directions stay free; the norm stays typical.
* :func:`classifier_loss` -- cross-entropy of a classifier's logits against the target class.
* :func:`optimize_run` -- the digits app: run folder (:mod:`bdia.runfolder`: marker, lock, ``settings.json``; a
  rerun resumes from ``state.npz`` after the last finished iteration, refuses other settings, and may raise
  ``iterations`` to continue), W&B via :mod:`bdia.logger`, progress bar, before/after grids labelled with the
  classifier's reading, the loss curve, the classifier's accuracy on the target class before and after.
* :func:`optimize_clip_score` -- the same on Stable Diffusion with a CLIP-score loss (the pipeline check on the tiny
  random SD: BDIA-DDIM, 50 steps, gradients through the UNet, the VAE decoder and CLIP).
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import solvers as _solvers
from ..checks import check_grid, check_int, check_number, check_solver_options
from ..configs import instantiate
from ..denoisers import CountingDenoiser
from ..imageio import StackedRandomGenerator, format_seeds, image_grid, parse_seeds, png_bytes, quantize
from ..logger import NullLogger, logged_metrics, run_name
from ..metrics.digits_classifier import ASSET_WEIGHTS, load_digits_classifier
from ..models import DIGITS_WEIGHTS, digits_network, image_shape_of
from ..reversible import BACKPROP, sample_with_grad
from ..runfolder import RunFolder, check_out_dir, environment_info, jsonable, open_run, read_npz
from ..schedules import as_sigmas, karras_sigmas
from .cli import print_summary

__all__ = ["OPTIMIZE_WRITTEN", "gaussian_prior", "classifier_loss", "optimize_noise", "optimize_run", "check_config",
           "optimize_from_config", "optimize_clip_score", "clip_score_loss"]

log = logging.getLogger(__name__)

#: The files an optimisation run writes (``resume=false`` removes these and nothing else).
OPTIMIZE_WRITTEN = (r"state\.npz", r"images\.npz", r"before\.png", r"after\.png", r"before_after\.png",
                    r"loss\.png", r"metrics\.json", r"history\.jsonl")
#: Bound on what ``state.npz`` may hold when read back on resume.
MAX_STATE_BYTES = 256 * 2**20
OPTIMIZABLE_SOLVERS = _solvers.INVERTIBLE_SOLVERS + ("ddim", "edm")


# --------------------------------------------------------------------------------------------------
# Losses.


def gaussian_prior(noise: torch.Tensor) -> torch.Tensor:
    """Per image, ``-log chi_d(||n||)`` up to its minimum: ``(d - 1) (log r* - log r) + (r^2 - r*^2) / 2`` with
    ``r = ||n||``, ``r* = sqrt(d - 1)`` (the chi distribution's mode), ``d`` = the pixels of one image. Zero at
    ``r = r*``, about ``(r - r*)^2`` near it. ``[B]``."""
    d = noise[0].numel()
    r2 = noise.flatten(1).square().sum(dim=1)
    mode2 = d - 1.0
    return (d - 1) * 0.5 * (math.log(mode2) - r2.log()) + 0.5 * (r2 - mode2)


def classifier_loss(classifier, target_class: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> [B]`` cross-entropy of ``classifier(images)`` against ``target_class`` (images in [-1, 1], cast to
    the classifier's dtype)."""
    dtype = next(classifier.parameters()).dtype

    def loss(images):
        logits = classifier(images.to(dtype))
        target = torch.full((images.shape[0],), int(target_class), dtype=torch.long, device=images.device)
        return F.cross_entropy(logits.double(), target, reduction="none")

    return loss


# --------------------------------------------------------------------------------------------------
# The optimisation loop.


def optimize_noise(denoiser, noise: torch.Tensor, sigmas, score_loss: Callable[[torch.Tensor], torch.Tensor],
                   iterations: int, lr: float = 0.1, prior_weight: float = 1.0, solver: str = "bdia_edm", gamma=None,
                   cond: Mapping[str, Any] | None = None, backprop: str = "reversible", store_every: int | None = None,
                   to_images: Callable[[torch.Tensor], torch.Tensor] | None = None, state: Mapping | None = None,
                   on_iteration: Callable[[dict, dict], None] | None = None, progress: bool = False, **solver_kwargs):
    """Adam on the standard-normal noise ``n`` (float64, ``[B, ...]``; the solver starts from ``sigmas[0] n``) for
    ``iterations`` iterations of ``sum_b score_loss(images)_b + prior_weight * gaussian_prior(n)_b``.

    ``images = to_images(x_N)`` (default: ``x_N`` itself), with ``x_N`` from :func:`bdia.sample_with_grad`
    (``backprop``, ``store_every``, ``cond`` and the solver options as there; the denoiser's own weights get no
    gradient).
    ``state``: what an earlier call handed to ``on_iteration`` (resume: the noise, Adam's moments, the iteration
    count); ``on_iteration(row, state)`` is called after every iteration with the row (iteration, losses, the
    images' score loss and ``recovery_error``, seconds) and the state to resume from. The images of a row are those
    of the noise *before* that iteration's update. Returns ``(noise, rows)`` (rows of this call only)."""
    noise = noise.detach().to(torch.float64).clone()
    first = 0
    if state is not None:
        noise = torch.as_tensor(state["noise"], dtype=torch.float64).clone()
        first = int(state["iteration"])
    noise.requires_grad_(True)
    optimizer = torch.optim.Adam([noise], lr=lr)
    if state is not None and first > 0:
        optimizer.state[noise] = {"step": torch.tensor(float(first)),
                                  "exp_avg": torch.as_tensor(state["exp_avg"], dtype=torch.float64).clone(),
                                  "exp_avg_sq": torch.as_tensor(state["exp_avg_sq"], dtype=torch.float64).clone()}
    sigma_0 = float(as_sigmas(sigmas)[0])
    rows = []
    steps = range(first, iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc="optimize", dynamic_ncols=True, leave=False)
        steps = bar
    for iteration in steps:
        started, cpu_started = time.perf_counter(), time.process_time()
        reports = []
        x_end = sample_with_grad(denoiser, noise * sigma_0, sigmas, solver=solver, gamma=gamma, cond=cond,
                                 backprop=backprop, params=(), store_every=store_every, on_backward=reports.append,
                                 **solver_kwargs)
        images = x_end if to_images is None else to_images(x_end)
        score = score_loss(images)
        prior = gaussian_prior(noise)
        loss = (score + prior_weight * prior).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not bool(torch.isfinite(noise.grad).all()):
            raise FloatingPointError(f"non-finite gradient of the noise at iteration {iteration}; lower lr")
        optimizer.step()
        moments = optimizer.state[noise]
        row = {"iteration": iteration, "loss": float(loss.detach()) / len(noise),
               "score_loss": float(score.detach().mean()), "prior": float(prior.detach().mean()),
               "recovery_error": reports[0]["recovery_error"] if reports else None,
               "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}
        rows.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if on_iteration is not None:
            on_iteration(row, {"noise": noise.detach(), "exp_avg": moments["exp_avg"],
                               "exp_avg_sq": moments["exp_avg_sq"], "iteration": iteration + 1,
                               "images": images.detach()})
    if bar is not None:
        bar.close()
    return noise.detach(), rows


# --------------------------------------------------------------------------------------------------
# The digits app.


def _accuracy(classifier, images_uint8: torch.Tensor, target_class: int) -> tuple[float, list[int]]:
    """The classifier's reading of quantised images (the metrics' path: uint8 -> [-1, 1]) and the share that
    reads ``target_class``."""
    with torch.no_grad():
        x = images_uint8.to(torch.float32) / 127.5 - 1.0
        predicted = classifier(x).argmax(dim=1)
    return float((predicted == target_class).float().mean()), predicted.tolist()


def _labelled_pair(before: np.ndarray, after: np.ndarray, read_before, read_after, target_class: int, title: str,
                   scale: int) -> bytes:
    """Before / after grids side by side, each tile marked with the classifier's reading (green: the target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, nrow = len(before), math.ceil(math.sqrt(len(before)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.6))
    for ax, images, reading, name in ((axes[0], before, read_before, "before"), (axes[1], after, read_after, "after")):
        grid = image_grid(images, nrow=nrow, padding=2, pad_value=255, scale=scale)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        tile = images.shape[-1] * scale + 2
        for i, label in enumerate(reading):
            ax.text(2 + (i % nrow) * tile + 1, 2 + (i // nrow) * tile + 1, str(label), va="top", ha="left",
                    fontsize=7, color="white", bbox=dict(boxstyle="square,pad=0.1", lw=0,
                                                         fc="tab:green" if label == target_class else "tab:red"))
        hits = sum(1 for label in reading if label == target_class)
        ax.set_title(f"{name}: classifier reads {target_class} on {hits}/{n}")
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def _loss_plot(rows: Sequence[Mapping], title: str, final_accuracy: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(it, [r["loss"] for r in rows], "o-", color="black", label="loss (per image)")
    ax.plot(it, [r["score_loss"] for r in rows], "s--", color="tab:blue", label="classifier cross-entropy")
    ax.plot(it, [r["prior_term"] for r in rows], "^--", color="tab:orange", label="prior_weight x Gaussian prior")
    ax.set_xlabel("iteration (images of the noise before its update)")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.grid(True, alpha=0.3)
    acc = ax.twinx()
    acc.plot(it + [it[-1] + 1], [100 * r["accuracy"] for r in rows] + [100 * final_accuracy], "d-", color="tab:green",
             label="reads the target (%); last: after the last update")
    acc.set_ylabel("classifier reads the target class (%)", color="tab:green")
    acc.set_ylim(-2, 102)
    lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center left", framealpha=0.8)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8)
    fig.tight_layout()
    return _figure_bytes(fig)


def _figure_bytes(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _noise_stats(noise: torch.Tensor) -> dict:
    d = noise[0].numel()
    norms = noise.flatten(1).norm(dim=1) / math.sqrt(d)
    return {"mean": float(noise.mean()), "std": float(noise.std()), "norm_over_sqrt_d_min": float(norms.min()),
            "norm_over_sqrt_d_max": float(norms.max())}


def _read_state(run, shape) -> dict | None:
    """The state after the last finished iteration (``state.npz`` + ``history.jsonl``), or ``None`` when there is none
    or it does not read back as this run's (then the run starts from the first iteration)."""
    data = run.read_bytes("state.npz", MAX_STATE_BYTES)
    if data is None:
        return None
    try:
        arrays = read_npz(data, MAX_STATE_BYTES, f"{run.path / 'state.npz'}")
    except ValueError as e:
        log.warning("optimize: %s; starting from the first iteration", e)
        return None
    need = {"noise": shape, "exp_avg": shape, "exp_avg_sq": shape, "before": shape, "iteration": ()}
    if not set(need) <= set(arrays) or any(tuple(arrays[k].shape) != tuple(s) for k, s in need.items()) or \
            arrays["before"].dtype != np.uint8 or arrays["noise"].dtype != np.float64:
        log.warning("optimize: %s does not hold this run's state; starting from the first iteration",
                    run.path / "state.npz")
        return None
    iteration = int(arrays["iteration"])
    if iteration < 1 or not np.isfinite(arrays["noise"]).all():
        return None
    history = []
    text = run.read_bytes("history.jsonl", 64 * 2**20)
    if text:
        history = [json.loads(line) for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    history = [r for r in history if isinstance(r, dict) and r.get("iteration", 1 << 30) < iteration]
    if len(history) != iteration:
        return None
    return {**arrays, "iteration": iteration, "history": history}


def optimize_run(
    denoiser=None,
    classifier=None,
    target_class: int = 3,
    seeds="0-63",
    solver: str = "bdia_edm",
    gamma=None,
    num_steps: int = 18,
    iterations: int = 8,
    lr: float = 0.1,
    prior_weight: float = 1.0,
    backprop: str = "reversible",
    store_every: int | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    out_dir="results/optimize/default",
    resume: bool = True,
    progress: bool = True,
    grid_scale: int = 4,
    logger=None,
    experiment_name: str = "optimize",
    model_info: Mapping[str, Any] | None = None,
    config_text: str | None = None,
    **solver_kwargs,
) -> dict:
    """Optimise the starting noise of ``seeds`` (one image each, EDM's per-seed noise) so that ``classifier`` reads
    ``target_class``, through every step of ``solver`` on EDM's Karras grid, and write the run folder ``out_dir``:

    * ``before.png`` / ``after.png`` (grids), ``before_after.png`` (both, each tile marked with the classifier's
      reading), ``loss.png`` (loss terms and the share read as the target per iteration);
    * ``metrics.json``: accuracy on the target class before and after (quantised images, as the metrics read them),
      losses, noise statistics before/after, network calls per iteration, recovery error, time;
    * ``images.npz`` (uint8 before/after, float64 noise before/after, the classifier's readings), ``history.jsonl``
      (one row per iteration), ``state.npz`` (noise and Adam's moments after the last finished iteration, for
      resume), ``settings.json``, ``config.yaml``, ``env.json``.

    ``denoiser`` default: the embedded digits model; ``classifier`` default: the shipped digits classifier. A rerun
    with the same settings resumes after the last finished iteration (``iterations`` may be raised to continue);
    other settings are refused; ``resume=False`` starts afresh. Returns the metrics dict.
    """
    started = time.perf_counter()
    settings = check_settings(target_class=target_class, seeds=seeds, solver=solver, gamma=gamma, num_steps=num_steps,
                              iterations=iterations, lr=lr, prior_weight=prior_weight, backprop=backprop,
                              store_every=store_every, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                              grid_scale=grid_scale, resume=resume, progress=progress, solver_kwargs=solver_kwargs)
    denoiser = digits_network() if denoiser is None else denoiser
    classifier = load_digits_classifier() if classifier is None else classifier
    shape = tuple(image_shape_of(denoiser) or ())
    if len(shape) != 3:
        raise ValueError("the denoiser does not say its image shape (img_channels / img_resolution)")
    sigma_min = max(float(sigma_min), float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(float(sigma_max), float(getattr(denoiser, "sigma_max", math.inf)))
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=getattr(denoiser, "round_sigma", None))
    seed_list = parse_seeds(seeds)
    run_settings = {**settings, "seeds": format_seeds(seed_list), "image_shape": list(shape),
                    "model": dict(model_info or {}), "threads": torch.get_num_threads()}
    run_settings.pop("iterations")  # raising it continues the same run
    run_settings.pop("resume")
    run_settings.pop("progress")
    run_settings.pop("grid_scale")
    if check_out_dir(out_dir, "optimize", run_settings, resume) and resume:
        with RunFolder.for_reading(out_dir) as earlier:  # read-only, before the folder is claimed
            text = earlier.read_bytes("history.jsonl", 64 * 2**20) or b""
        done_before = sum(1 for line in text.decode("utf-8", "replace").splitlines() if line.strip())
        if done_before > iterations:
            raise ValueError(f"out_dir {out_dir} already holds {done_before} iterations; pass iterations >= "
                             f"{done_before} to continue it, or resume=false to start afresh")
    records = {"env.json": lambda: json.dumps(jsonable(environment_info()), indent=2) + "\n"}
    if config_text is not None:
        records["config.yaml"] = lambda: config_text
    logger = logger or NullLogger()
    noise0 = StackedRandomGenerator(seed_list).randn(shape, dtype=torch.float64)
    batch = (len(seed_list), *shape)
    counted = CountingDenoiser(denoiser)
    with open_run(out_dir, "optimize", run_settings, resume, written=OPTIMIZE_WRITTEN, records=records) as run:
        state = _read_state(run, batch) if resume else None
        if state and state["iteration"] > iterations:
            state = None  # (history.jsonl changed since the check above) start afresh rather than mix
        history = list(state["history"]) if state else []
        before = torch.as_tensor(state["before"]) if state else None
        done = int(state["iteration"]) if state else 0
        logger.start(config={**run_settings, "iterations": iterations}, run_dir=str(run.path),
                     name=run_name(run.path), group=experiment_name)
        try:
            for row in history:
                logger.log_metrics(logged_metrics(row), step=row["iteration"])
            score_loss = classifier_loss(classifier, target_class)
            log_lines = [json.dumps(jsonable(r)) for r in history]

            def on_iteration(row, new_state):
                nonlocal before
                images = quantize(new_state["images"].float())
                if before is None:
                    before = images
                row["accuracy"] = _accuracy(classifier, images, target_class)[0]
                row["prior_term"] = prior_weight * row["prior"]
                row["network_calls"] = counted.nfe
                counted.reset()
                history.append(row)
                log_lines.append(json.dumps(jsonable(row)))
                run.write_text("history.jsonl", "\n".join(log_lines) + "\n")
                kept = {"noise": new_state["noise"], "exp_avg": new_state["exp_avg"],
                        "exp_avg_sq": new_state["exp_avg_sq"], "iteration": new_state["iteration"], "before": before}
                run.write_npz("state.npz", {k: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
                                            for k, v in kept.items()})
                logger.log_metrics(logged_metrics(row), step=row["iteration"])

            noise, _ = optimize_noise(counted, noise0, sigmas, score_loss, iterations, lr=lr, prior_weight=prior_weight,
                                      solver=solver, gamma=gamma, backprop=backprop, store_every=store_every,
                                      state=state, on_iteration=on_iteration, progress=progress, **solver_kwargs)
            if before is None:  # iterations = 0: the plain sample is "before" and "after"
                with torch.no_grad():
                    before = quantize(_solvers.sample(denoiser, noise0 * sigmas[0], sigmas, solver=solver, gamma=gamma,
                                                      **solver_kwargs).float())
            counted.reset()
            after_x = _solvers.sample(counted, noise * sigmas[0], sigmas, solver=solver, gamma=gamma, **solver_kwargs)
            sample_calls = counted.nfe
            after = quantize(after_x.float())
            acc_before, read_before = _accuracy(classifier, before, target_class)
            acc_after, read_after = _accuracy(classifier, after, target_class)
            title = (f"{len(seed_list)} digits of the embedded model, noise optimised for class {target_class}: "
                     f"{solver}, {num_steps} steps ({sample_calls} NFE), {iterations} iterations, lr {lr}, "
                     f"prior weight {prior_weight}, backprop {backprop}")
            run.write_bytes("before.png", png_bytes(image_grid(before, scale=grid_scale)))
            run.write_bytes("after.png", png_bytes(image_grid(after, scale=grid_scale)))
            run.write_bytes("before_after.png", _labelled_pair(before.numpy(), after.numpy(), read_before, read_after,
                                                               target_class, title, grid_scale))
            if history:
                run.write_bytes("loss.png", _loss_plot(history, title, acc_after))
            run.write_npz("images.npz", {"before": before.numpy(), "after": after.numpy(),
                                         "noise_before": noise0.numpy(), "noise_after": noise.numpy(),
                                         "read_before": np.asarray(read_before), "read_after": np.asarray(read_after),
                                         "seeds": np.asarray(seed_list),
                                         "sigmas": sigmas.numpy()})
            recovery = [r["recovery_error"] for r in history if r.get("recovery_error") is not None]
            metrics = {
                "target_class": target_class, "num_images": len(seed_list), "solver": solver,
                "gamma": _solvers.DEFAULT_GAMMA.get(solver) if gamma is None else gamma, "num_steps": num_steps,
                "nfe": sample_calls, "iterations": iterations, "iterations_this_session": iterations - done,
                "accuracy_before": acc_before, "accuracy_after": acc_after,
                "loss_first": history[0]["loss"] if history else None,
                "loss_last": history[-1]["loss"] if history else None,
                "network_calls_per_iteration": history[-1]["network_calls"] if history else None,
                "backprop": backprop, "max_recovery_error": max(recovery) if recovery else None,
                "noise_before": _noise_stats(noise0), "noise_after": _noise_stats(noise),
                "seconds_per_iteration": (sum(r["seconds"] for r in history) / len(history)) if history else None,
                # CPU time of this process (all its threads): what an iteration costs whatever else runs on the machine
                "cpu_seconds_per_iteration": (sum(r.get("cpu_seconds", math.nan) for r in history) / len(history))
                if history else None,
                "seconds_this_session": time.perf_counter() - started,
                "threads": torch.get_num_threads(),
            }
            run.write_json("metrics.json", metrics)
            logger.log_metrics(logged_metrics({"final": metrics}))
            for key in ("before_after", "loss"):
                if (run.path / f"{key}.png").is_file():
                    logger.log_image(key, str(run.path / f"{key}.png"))
            run.mark("complete")
        except BaseException:
            logger.finish(exit_code=1)
            raise
        logger.finish()
    return {**metrics, "out_dir": str(out_dir)}


# --------------------------------------------------------------------------------------------------
# Settings and the config.


def check_settings(target_class, seeds, solver, gamma, num_steps, iterations, lr, prior_weight, backprop, store_every,
                   sigma_min, sigma_max, rho, grid_scale, resume, progress, solver_kwargs) -> dict:
    """Every setting checked (one line naming it) before anything is loaded; returns them as plain values."""
    check_int("target_class", target_class, 0, 9)
    seed_list = parse_seeds(seeds)
    if not 1 <= len(seed_list) <= 4096:
        raise ValueError(f"seeds: 1..4096 images, got {len(seed_list)}")
    check_int("num_steps", num_steps, 2, 1000)
    check_int("iterations", iterations, 0, 100_000)
    check_number("lr", lr, 0, 100, low_open=True)
    check_number("prior_weight", prior_weight, 0, 1e6)
    if backprop not in BACKPROP:
        raise ValueError(f"backprop must be one of {', '.join(BACKPROP)}, got {backprop!r}")
    if solver not in OPTIMIZABLE_SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(OPTIMIZABLE_SOLVERS)}, got {solver!r}")
    if backprop == "reversible" and solver not in _solvers.INVERTIBLE_SOLVERS:
        raise ValueError(f"backprop=reversible needs a BDIA solver (bdia_edm, bdia_ddim), not solver={solver}; "
                         f"use backprop=checkpoint")
    if store_every is not None:
        check_int("store_every", store_every, 1, 100_000)
    check_grid(sigma_min, sigma_max, rho, None, grid_scale, 0)
    check_solver_options(solver, gamma, dict(solver_kwargs), karras_sigmas(num_steps, sigma_min, sigma_max, rho))
    for key, value in (("resume", resume), ("progress", progress)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    return {"target_class": target_class, "solver": solver, "gamma": gamma, "num_steps": num_steps,
            "iterations": iterations, "lr": float(lr), "prior_weight": float(prior_weight), "backprop": backprop,
            "store_every": store_every, "sigma_min": float(sigma_min), "sigma_max": float(sigma_max), "rho": float(rho),
            "solver_options": dict(solver_kwargs), "grid_scale": grid_scale, "resume": resume, "progress": progress}


#: Top-level keys of configs/optimize/optimize.yaml that are optimize_run's arguments.
_RUN_KEYS = ("target_class", "seeds", "solver", "gamma", "num_steps", "iterations", "lr", "prior_weight", "backprop",
             "store_every", "sigma_min", "sigma_max", "rho", "out_dir", "resume", "progress", "grid_scale",
             "experiment_name")
_SCRIPT_KEYS = ("model_path", "classifier_path", "threads", "solver_options", "logger", "hydra")


def check_config(cfg) -> dict:
    """A composed ``configs/optimize/optimize.yaml`` checked (one line naming the key) without loading anything;
    returns ``optimize_run``'s keyword arguments plus the script's own keys."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(config) - set(_RUN_KEYS) - set(_SCRIPT_KEYS))
    if unknown:
        raise ValueError(f"optimize: unknown key(s) {', '.join(unknown)}")
    args = {key: config[key] for key in _RUN_KEYS if key in config}
    solver_options = config.get("solver_options") or {}
    if not isinstance(solver_options, dict):
        raise ValueError(f"solver_options must be a mapping, got {solver_options!r}")
    check_int("threads", config.get("threads"), 1, 1024)
    check_settings(**{k: v for k, v in args.items() if k not in ("out_dir", "experiment_name")},
                   solver_kwargs=solver_options)
    for key in ("model_path", "classifier_path"):
        value = config.get(key)
        if value is not None and not Path(str(value)).expanduser().is_file():
            raise ValueError(f"{key}={value}: no such file")
    check_out_dir(args["out_dir"], "optimize")
    return {**args, "solver_options": solver_options, "threads": config["threads"],
            "model_path": config.get("model_path"), "classifier_path": config.get("classifier_path")}


def optimize_from_config(cfg, choices: Mapping[str, Any] | None = None) -> dict:
    """``scripts/optimize.py`` for a composed config: check it, load the digits model and classifier, run
    :func:`optimize_run`, print a summary. Returns the metrics."""
    from omegaconf import OmegaConf

    args = check_config(cfg)
    torch.set_num_threads(args.pop("threads"))
    model_path, classifier_path = args.pop("model_path"), args.pop("classifier_path")
    solver_options = args.pop("solver_options")
    denoiser = digits_network(model_path)
    classifier = load_digits_classifier(classifier_path)
    model_info = {"model": "digits" if model_path is None else str(model_path),
                  "weights": str(DIGITS_WEIGHTS.name if model_path is None else model_path),
                  "classifier": str(ASSET_WEIGHTS.name if classifier_path is None else classifier_path)}
    logger = instantiate(cfg.logger, "logger") if cfg.get("logger") else NullLogger()
    metrics = optimize_run(denoiser, classifier, **args, **solver_options, logger=logger, model_info=model_info,
                           config_text=OmegaConf.to_yaml(cfg))
    out_dir = metrics["out_dir"]
    print_summary(
        f"optimize: {metrics['num_images']} images, noise optimised for class {metrics['target_class']} in {out_dir}",
        [("reads target", f"{100 * metrics['accuracy_before']:.0f} % before -> {100 * metrics['accuracy_after']:.0f} % "
                          f"after (digits classifier, quantised images)"),
         ("solver", f"{metrics['solver']}, gamma {metrics['gamma']}, {metrics['num_steps']} steps, "
                    f"{metrics['nfe']} NFE; backprop {metrics['backprop']}, "
                    f"{metrics['network_calls_per_iteration']} network calls per iteration"),
         ("iterations", f"{metrics['iterations']} ({metrics['iterations_this_session']} now), "
                        f"{metrics['seconds_per_iteration'] or 0:.1f} s each "
                        f"({metrics['cpu_seconds_per_iteration'] or 0:.1f} CPU-s on {metrics['threads']} threads), "
                        f"{metrics['seconds_this_session']:.0f} s in all"),
         ("loss", f"{metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f} "
                  f"(per image; last = before the last update)"
          if metrics["loss_first"] is not None else None),
         ("noise", f"std {metrics['noise_before']['std']:.3f} -> {metrics['noise_after']['std']:.3f}"),
         ("grids", f"{Path(out_dir) / 'before_after.png'}, loss curve {Path(out_dir) / 'loss.png'}")])
    return metrics


# --------------------------------------------------------------------------------------------------
# Stable Diffusion with a CLIP-score loss.


def clip_score_loss(clip_model, clip_processor, prompt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> [B]`` minus the CLIP score ``100 cos(image, prompt)`` of images in [-1, 1] ``[B, 3, H, W]``, with
    CLIP's preprocessing done in torch (bicubic resize to its input size, its mean/std) so gradients flow."""
    image_processor = clip_processor.image_processor
    crop = image_processor.crop_size  # {"height", "width"} (a dict or transformers' SizeDict) or one number
    size = (int(crop), int(crop)) if isinstance(crop, (int, float)) else (int(crop["height"]), int(crop["width"]))
    param = next(clip_model.parameters())
    mean = torch.tensor(image_processor.image_mean, dtype=param.dtype, device=param.device).reshape(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=param.dtype, device=param.device).reshape(1, -1, 1, 1)
    tokens = clip_processor.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt",
                                      max_length=clip_model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        text = clip_model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                            attention_mask=tokens["attention_mask"].to(param.device))
        text = getattr(text, "pooler_output", text)
        text = text / text.norm(dim=-1, keepdim=True)

    def loss(images):
        x = ((images.to(param.dtype) + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        features = clip_model.get_image_features(pixel_values=(x - mean) / std)
        features = getattr(features, "pooler_output", features)
        features = features / features.norm(dim=-1, keepdim=True)
        return -100 * (features * text).sum(dim=-1).double()

    return loss


def optimize_clip_score(sd, clip_model, clip_processor, prompt: str, seeds="0", num_steps: int = 50,
                        iterations: int = 2, lr: float = 0.05, prior_weight: float = 1.0, guidance_scale: float = 1.0,
                        gamma=1.0, backprop: str = "reversible", on_iteration=None) -> dict:
    """Optimise the starting latents of Stable Diffusion (``sd``: :class:`bdia.networks.sd.StableDiffusion`) for the
    CLIP score of the decoded images against ``prompt``: BDIA-DDIM over ``num_steps`` steps of the model's own grid,
    gradients through the UNet (every step), the VAE decoder and CLIP. Returns the CLIP scores (per image, before
    and after, computed by the same differentiable path), the rows of :func:`optimize_noise` and the noise."""
    seed_list = parse_seeds(seeds)
    shape = sd.latent_shape()
    noise0 = StackedRandomGenerator(seed_list).randn(shape, dtype=torch.float64)
    sigmas = sd.sigmas(num_steps)
    embeds = sd.encode_prompts([prompt] * len(seed_list))
    denoiser = sd.denoiser(guidance_scale)
    alpha_end = 1.0 / math.sqrt(1.0 + float(sigmas[-1]) ** 2)

    def to_images(x_end):  # the final state x_N -> VP latent z = alpha_N x_N -> the VAE's pixels in [-1, 1]
        z = (alpha_end * x_end) / sd.latent_scaling + sd.latent_shift
        return sd.vae.decode(z.to(sd.dtype)).sample.to(torch.float64)

    score_loss = clip_score_loss(clip_model, clip_processor, prompt)
    cond = {"encoder_hidden_states": embeds}
    with torch.no_grad():
        start = _solvers.sample(denoiser, noise0 * sigmas[0], sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
        before = -score_loss(to_images(start))
    noise, rows = optimize_noise(denoiser, noise0, sigmas, score_loss, iterations, lr=lr, prior_weight=prior_weight,
                                 solver="bdia_ddim", gamma=gamma, cond=cond, backprop=backprop, to_images=to_images,
                                 on_iteration=on_iteration)
    with torch.no_grad():
        end = _solvers.sample(denoiser, noise * sigmas[0], sigmas, solver="bdia_ddim", gamma=gamma, cond=cond)
        after = -score_loss(to_images(end))
    return {"clip_before": before.tolist(), "clip_after": after.tolist(), "rows": rows, "noise": noise,
            "noise_before": noise0}
