"""The sampling app: one image per seed from a denoiser into a run folder, resumable and sharded over ranks.

``scripts/sample.py`` is a thin Hydra shell around :func:`sample_from_config` (a composed ``configs/sample``
config → ranks → model → :func:`sample_run` → metrics → logger); tests call these functions directly. The
batch loop, resume and per-image writes are :mod:`bdia.apps.driver`'s, shared with text-to-image.

Conventions (EDM's ``generate.py``; ``docs/design.md``):

* seeds are a list or a range spec (``"0-63"``, ``"0,5,7-9"``); image k's noise, then its class label, come
  from its own ``torch.Generator`` seeded with k (:mod:`bdia.imageio`), so an image does not depend on the
  batch size, on the other seeds or on the number of processes (torchrun: rank r of K samples ``seeds[r::K]``);
* networks are called on a fixed number of rows (:class:`FixedBatchDenoiser`), so their float32 rounding does
  not change with the batch size either;
* images are quantised as ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` and saved as PNG;
* every run folder holds ``metrics.json`` (NFE measured, not assumed), ``env.json`` and the resolved config.

Run folders and resume (:mod:`bdia.runfolder`): each image is written on its own (``images/<seed>.png`` and
``records/<seed>.npz``, each atomically), so a killed run leaves only complete files; running the same command
again skips the seeds already complete. ``settings.json`` records what determines the images (solver, grid,
model …); a rerun with other or unreadable settings is refused instead of mixing images, and a folder that is
not this app's run folder is never written.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import solvers as _solvers
from ..analytic import mixture_metrics
from ..checks import (
    check_class_idx,
    check_flags,
    check_grid,
    check_grid_size,
    check_int,
    check_num_steps,
    check_solver_options,
)
from ..configs import build_metrics, instantiate
from ..denoisers import CountingDenoiser, FixedBatchDenoiser, GaussianMixtureDenoiser, check_network_batch
from ..distributed import DistContext, init_distributed, resolve_device
from ..imageio import (  # noqa: F401  (seeds and images: re-exported for sample_run's callers)
    StackedRandomGenerator,
    class_labels_for,
    format_seeds,
    image_grid,
    labelled_grid,
    parse_seeds,
    png_bytes,
    quantize,
    read_png,
    save_image_grid,
    seed_noise,
)
from ..logger import NullLogger, Table, log_run
from ..metrics.evaluate import evaluate_run
from ..models import image_shape_of, label_dim_of, load_model
from ..runfolder import (  # noqa: F401
    IMAGES_DIR,
    RECORDS_DIR,
    RunFolder,
    atomic_write,
    check_out_dir,
    environment_info,
)
from ..runfolder import jsonable as _jsonable
from ..schedules import as_sigmas, karras_sigmas
from ..speed import SpeedOptions, auto_batch_size, with_speed
from .cli import headline_rows, print_summary, run_timing, shell_command, speed_text, sweep_folder
from .driver import ASSEMBLED_OUTPUTS, BatchResult, drive, finish, item_need, open_run_folder, read_item

__all__ = [
    "parse_seeds",
    "format_seeds",
    "StackedRandomGenerator",
    "seed_noise",
    "class_labels_for",
    "FixedBatchDenoiser",
    "quantize",
    "image_grid",
    "save_image_grid",
    "atomic_write",
    "environment_info",
    "seeds_done",
    "given_sigmas",
    "sample_run",
    "sample_from_config",
]

log = logging.getLogger(__name__)

#: Class names on the tiles of a 10-class conditional run's grid.png (EDM's class-conditional 10-class networks are
#: CIFAR-10's; the index is what the network takes).
CIFAR10_CLASSES = ("0 airplane", "1 automobile", "2 bird", "3 cat", "4 deer", "5 dog", "6 frog", "7 horse", "8 ship",
                   "9 truck")

#: ``network_batch="auto"``: this many rows per network call, or the number of images when the run is smaller.
AUTO_NETWORK_BATCH = 64


# --------------------------------------------------------------------------------------------------
# A sampling run.


def _seed_name(seed: int) -> str:
    return f"{seed:06d}"


#: File stems of a sampling run's items (``_seed_name``): what ``resume=false`` may remove.
ITEM_PATTERN = r"[0-9]{6,}"


def seeds_done(out_dir, seeds: Sequence[int], need: Iterable[str] = (), shape: Sequence[int] | None = None) -> list[int]:
    """The seeds among ``seeds`` whose image is done in ``out_dir``
    (:meth:`bdia.runfolder.RunFolder.item_record`: ``records/<seed>.npz`` reads back holding ``nfe``, the arrays
    named in ``need`` (e.g. ``x_end``) and the sha256 of ``images/<seed>.png``, whose header says ``shape``).
    Anything damaged or not written by the run is simply sampled again."""
    if not Path(out_dir).is_dir():
        return []
    with RunFolder.for_reading(out_dir, (IMAGES_DIR, RECORDS_DIR)) as run:
        need = item_need(list(need))
        return [seed for seed in seeds if run.item_record(_seed_name(seed), need, shape) is not None]


def sample_run(
    denoiser,
    solver: str = "bdia_edm",
    gamma=None,
    num_steps: int = 18,
    seeds="0-63",
    batch_size: int | str = 64,
    out_dir="results/sample",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    image_shape: Sequence[int] | None = None,
    device="cpu",
    class_idx: int | None = None,
    network_batch: int | str | None = "auto",
    save_states: bool = False,
    resume: bool = True,
    grid_nrow: int | None = None,
    grid_scale: int = 1,
    grid_padding: int = 0,
    progress: bool = True,
    precision: str = "float32",
    channels_last: bool = False,
    compile: str | None = None,
    config: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
    dist: DistContext | None = None,
    **solver_kwargs,
) -> dict | None:
    """Sample one image per seed with ``solver`` on EDM's Karras grid and write the run folder ``out_dir``:

    * ``images/<seed:06d>.png`` and ``records/<seed:06d>.npz`` (per image: ``nfe``, ``class_label`` (-1 if
      unconditional) and, with ``save_states``, the float64 final state ``x_end`` and for BDIA solvers the
      state one step before it, ``x_inner``), written as each batch finishes;
    * ``images.npz``: ``images`` (uint8 ``[N, C, H, W]``), ``seeds`` (int64), ``sigmas`` (the grid), for
      conditional models ``class_labels``, and with ``save_states`` ``x_end`` / ``x_inner`` (the pair
      :func:`bdia.invert` takes to run the images back to noise);
    * ``grid.png``: all images tiled, ``grid_nrow`` per row, enlarged ``grid_scale`` times;
    * ``metrics.json``: settings, NFE (counted by :class:`bdia.CountingDenoiser` for every image), image
      counts (sampled now / resumed), sampling and wall time, images/s, and for Gaussian-mixture models
      :func:`bdia.analytic.mixture_metrics`; ``env.json``, ``config.yaml`` (``config``) and ``settings.json``.

    Images: latents, then class labels (EDM's order; ``class_idx`` fixes the class) come from one generator
    per seed; networks see exactly ``network_batch`` rows per call (:class:`FixedBatchDenoiser`), so float32
    rounding, and every image, is the same for any ``batch_size`` and process count. ``"auto"`` (default):
    ``min(64, number of seeds)``, so a small run pays for no padded rows (recorded in ``settings.json``); a
    number fixes it (larger GPU batches); ``None``: the whole batch, rounding then depends on the batch size.
    Analytic mixtures are row-independent and never padded. ``batch_size="auto"``: the largest power of two
    (at most this rank's image count) whose network call fits in free memory (:func:`bdia.speed.auto_batch_size`;
    images do not depend on it). The grid is ``karras_sigmas(num_steps, sigma_min, sigma_max, rho)``
    with ``sigma_min``/``sigma_max`` clamped to the denoiser's range, as EDM's sampler does; ``sigmas`` (a list of
    noise levels, strictly descending, positive but for a final 0) replaces it as given (:func:`given_sigmas`:
    ``num_steps`` is then its length - 1; a grid ending above ``bdia.solvers.NOISY_END`` leaves noise in the
    images and is refused).

    ``resume``: skip seeds whose files are already there (the folder's ``settings.json`` must match, else
    ``ValueError``); ``False`` removes earlier outputs first. ``dist``: this process's place among several
    (:func:`bdia.distributed.init_distributed`); rank r samples ``seeds[r::K]`` and rank 0 writes the
    shared outputs after all ranks finish. ``precision`` (float32 | tf32 | bf16 | fp16), ``channels_last`` and
    ``compile`` (a :func:`torch.compile` mode) change how the network runs, never the float64 solver states
    (:mod:`bdia.speed`); non-default values are recorded in ``settings.json``. Other options go to :func:`bdia.sample` (``backward`` for
    bdia_edm; ``s_churn`` … for edm, whose churn noise comes from the per-image generators).

    Inputs are checked before any sampling; mistakes raise ``ValueError``. Returns the metrics dict on rank 0
    and ``None`` on other ranks.
    """
    started = time.perf_counter()
    ctx = dist or DistContext()
    seeds = parse_seeds(seeds)
    device = resolve_device(device, ctx.local_rank)
    check_grid(sigma_min, sigma_max, rho, grid_nrow, grid_scale, grid_padding)
    if sigmas is None:
        check_num_steps(num_steps)
        sigma_min = max(float(sigma_min), float(getattr(denoiser, "sigma_min", 0.0)))
        sigma_max = min(float(sigma_max), float(getattr(denoiser, "sigma_max", math.inf)))
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=getattr(denoiser, "round_sigma", None))
    else:
        sigmas, num_steps = given_sigmas(sigmas, num_steps)
        sigma_min, sigma_max, rho = float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]), float(sigmas[0]), None
    check_solver_options(solver, gamma, solver_kwargs, sigmas, 1 if batch_size == "auto" else batch_size)
    speed = SpeedOptions(precision, channels_last, compile)
    shape = tuple(int(s) for s in (image_shape if image_shape is not None else (image_shape_of(denoiser) or ())))
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be [C, H, W] with C = 1 or 3 (pass image_shape=...), got {list(shape)}")
    label_dim = label_dim_of(denoiser)
    check_class_idx(label_dim, class_idx)
    check_flags(save_states=save_states, resume=resume)
    is_mixture = isinstance(denoiser, GaussianMixtureDenoiser)
    if network_batch == "auto":  # 64 rows, or fewer for a run with fewer images: no padding tax on small runs
        network_batch = min(AUTO_NETWORK_BATCH, len(seeds))
    check_network_batch(network_batch)
    network_batch = None if is_mixture else network_batch  # row-independent float64 maths: no padding needed
    bdia_solver = solver in _solvers.INVERTIBLE_SOLVERS
    keep_x = save_states or is_mixture  # mixture metrics need the float states
    keep_inner = save_states and bdia_solver
    need = {"class_label": ((), "iu")}  # what a record must hold to count as done (else it is sampled again)
    need |= {"x_end": (shape, "f")} if keep_x else {}
    need |= {"x_inner": (shape, "f")} if keep_inner else {}
    check_grid_size(len(seeds), shape, grid_nrow, grid_padding, grid_scale)  # before any sampling

    settings = _jsonable({
        "solver": solver,
        "gamma": gamma,
        "num_steps": num_steps,
        "solver_options": dict(solver_kwargs),
        "sigmas": sigmas.tolist(),
        "image_shape": list(shape),
        "label_dim": label_dim,
        "class_idx": class_idx,
        "network_batch": network_batch,
        "device_type": device.type,
        "model": dict(model_info) if model_info is not None else None,
        **({} if speed.is_default else {"speed": speed.as_dict()}),
    })
    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device)
    net = with_speed(denoiser, **speed.as_dict())
    if batch_size == "auto":
        batch_size = auto_batch_size(net, shape, device, limit=max(1, -(-len(seeds) // ctx.world_size)),
                                     label_dim=label_dim)
        log.info("batch_size=auto: %d images per batch", batch_size)
    counter = CountingDenoiser(net if network_batch is None else FixedBatchDenoiser(net, network_batch))

    def solve(batch_seeds) -> BatchResult:
        rng = StackedRandomGenerator(batch_seeds, device)
        x_init = rng.randn(shape, dtype=torch.float64) * sigmas[0].to(device)
        label_idx, labels = class_labels_for(rng, label_dim, class_idx)
        kwargs = dict(solver_kwargs, randn_like=rng.randn_like) if solver == "edm" else solver_kwargs
        counter.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = _solvers.sample(counter, x_init, sigmas, solver=solver, gamma=gamma, class_labels=labels,
                                  return_pair=keep_inner, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        x_end, x_inner = (out.x_end, out.x_inner) if keep_inner else (out, None)
        x_end_np = x_end.cpu().numpy() if keep_x else None
        x_inner_np = x_inner.cpu().numpy() if keep_inner else None
        label_idx = label_idx.cpu().numpy() if label_idx is not None else None
        records = []
        for i in range(len(batch_seeds)):
            record = {"class_label": np.int64(-1 if label_idx is None else label_idx[i])}
            if keep_x:
                record["x_end"] = x_end_np[i]
            if keep_inner:
                record["x_inner"] = x_inner_np[i]
            records.append(record)
        return BatchResult(quantize(x_end).cpu().numpy(), records, counter.nfe, {"sampling": seconds})

    def _write_outputs(run: RunFolder, stats) -> dict:
        assembled = _assemble(run, seeds, shape, label_dim, sigmas, save_states, keep_inner, need,
                              denoiser if is_mixture else None, grid_nrow, grid_padding, grid_scale)
        timing = run_timing(stats, assembled["timed"], len(seeds), ("sampling",))
        metrics = {
            "solver": solver,
            "gamma": gamma,
            "num_steps": num_steps,
            "solver_options": dict(solver_kwargs),
            "nfe": assembled["nfe"],
            "nfe_per_batch": stats.nfe_per_batch,
            "num_images": len(seeds),
            "num_sampled": stats.sampled,
            "num_resumed": len(seeds) - stats.sampled,
            "seeds": format_seeds(seeds),
            "batch_size": batch_size,
            "network_batch": network_batch,
            "speed": speed.as_dict(),
            "world_size": ctx.world_size,
            "image_shape": list(shape),
            "label_dim": label_dim,
            "class_idx": class_idx,
            "sigmas": {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "levels": sigmas.tolist()},
            "device": str(device),
            "model": dict(model_info) if model_info is not None else None,
            **timing,
        }
        if "mixture" in assembled:
            metrics["mixture"] = assembled["mixture"]
        metrics["wall_seconds"] = round(time.perf_counter() - started, 4)
        metrics["session"]["wall_seconds"] = metrics["wall_seconds"]
        metrics = _jsonable(metrics)
        run.write_json("metrics.json", metrics)  # the last end-of-run file: it marks a finished run
        run.mark("complete")
        log.info("%s: %d images (%d sampled now, %d resumed), NFE %s, %s -> %s", solver, len(seeds), stats.sampled,
                 len(seeds) - stats.sampled, metrics["nfe"], speed_text(metrics), out_dir)
        return metrics

    desc = f"{solver} rank 0/{ctx.world_size}" if ctx.world_size > 1 else solver
    with open_run_folder(out_dir, app="sample", settings=settings, resume=resume, item_pattern=ITEM_PATTERN,
                         outputs=ASSEMBLED_OUTPUTS, ctx=ctx, config=config, device=device) as run:
        stats = drive(run, seeds, [_seed_name(s) for s in seeds], solve, batch_size=batch_size, image_shape=shape,
                      need=need, ctx=ctx, progress=progress, desc=desc)
        return finish(ctx, lambda: _write_outputs(run, stats))


def given_sigmas(values, num_steps: int | None = None) -> tuple[torch.Tensor, int]:
    """A grid given as a list (``sigmas=[80,20,5,1,0.2,0]`` on the command line): float64, at least 2 steps,
    strictly descending, positive but for a final 0 (:func:`bdia.schedules.as_sigmas`). Returns it and its step
    count; ``num_steps`` (the solver's) is replaced by it, with a log line when they differ. A grid whose last level
    is above :data:`bdia.solvers.NOISY_END` would leave its noise in the images (``x = x0 + sigma n``): refused,
    naming the fix."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not isinstance(values, torch.Tensor):
        raise ValueError(f"sigmas must be a list of noise levels, e.g. sigmas=[80,20,5,1,0.2,0]; got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)):
        raise ValueError(f"sigmas must be numbers, got {list(values)!r}")
    try:
        grid = as_sigmas(values)
    except ValueError as e:
        raise ValueError(f"sigmas: {e}") from None
    if not math.isfinite(float(grid[0])):
        raise ValueError("sigmas: the first level must be finite for scripts/sample.py (EDM-convention networks)")
    if float(grid[-1]) > _solvers.NOISY_END:
        raise ValueError(f"sigmas end at {float(grid[-1]):g}: the images would keep that much noise (x = x0 + sigma n); "
                         f"end the grid at 0 (e.g. sigmas=[...,0]), as EDM's grids do")
    steps = len(grid) - 1
    if num_steps is not None and num_steps != steps:
        log.info("sigmas=%s: %d steps (solver.num_steps=%s is not used)", [round(float(v), 6) for v in grid], steps,
                 num_steps)
    return grid, steps


def _assemble(run: RunFolder, seeds, shape, label_dim, sigmas, save_states, keep_inner, need, mixture, grid_nrow,
              grid_padding, grid_scale) -> dict:
    """Rank 0, after every rank finished: ``images.npz`` and ``grid.png`` from the per-seed files (in seed
    order), NFE from the records, mixture metrics from the float states."""
    images = np.empty((len(seeds), *shape), dtype=np.uint8)
    nfe = np.empty(len(seeds), dtype=np.int64)
    labels = np.empty(len(seeds), dtype=np.int64)
    keep_x = save_states or mixture is not None
    x_end = np.empty((len(seeds), *shape), dtype=np.float64) if keep_x else None
    x_inner = np.empty((len(seeds), *shape), dtype=np.float64) if keep_inner else None
    timed = 0
    for i, seed in enumerate(seeds):
        images[i], record = read_item(run, _seed_name(seed), need, shape)  # verified as resume verifies it
        nfe[i], labels[i] = record["nfe"], record["class_label"]
        timed += "seconds_sampling" in record
        if keep_x:
            x_end[i] = record["x_end"]
        if keep_inner:
            x_inner[i] = record["x_inner"]

    arrays = {"images": images, "seeds": np.asarray(seeds, dtype=np.int64), "sigmas": sigmas.numpy()}
    if label_dim:
        arrays["class_labels"] = labels
    if save_states:
        arrays["x_end"] = x_end
        if keep_inner:
            arrays["x_inner"] = x_inner
    run.write_npz("images.npz", arrays, compressed=True)
    if label_dim:  # each tile named by its class (EDM's class-conditional networks)
        names = [CIFAR10_CLASSES[k] if label_dim == len(CIFAR10_CLASSES) else f"class {k}" for k in labels.tolist()]
        grid = labelled_grid(images, grid_nrow or math.ceil(math.sqrt(len(seeds))), padding=max(grid_padding, 1),
                             pad_value=128, scale=grid_scale, tile_labels=names, font_size=11)
    else:
        grid = image_grid(images, nrow=grid_nrow, padding=grid_padding, pad_value=128, scale=grid_scale)
    run.write_bytes("grid.png", png_bytes(grid))
    distinct = sorted(set(nfe.tolist()))
    out = {"nfe": distinct[0] if len(distinct) == 1 else distinct, "timed": timed}
    if mixture is not None:
        out["mixture"] = mixture_metrics(mixture, torch.from_numpy(x_end))
    return out


# --------------------------------------------------------------------------------------------------
# The app behind scripts/sample.py: a composed config -> ranks -> model -> sample_run -> metrics -> logger.


def check_config(cfg) -> None:
    """The cheap checks of a composed ``configs/sample`` config, without loading a model or writing anything:
    what ``scripts/sample.py`` runs on every job of a sweep before any job runs. Raises one-line
    ``ValueError`` naming the key."""
    from omegaconf import OmegaConf

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.startswith("metrics."))
    if missing:  # e.g. metrics=reconstruction without metrics.reconstruction.reference
        raise ValueError(f"{missing[0]} is not set: give it on the command line ({missing[0]}=...)")
    config = OmegaConf.to_container(cfg, resolve=True)
    solver = config.get("solver")
    if not isinstance(solver, dict) or "name" not in solver:
        raise ValueError(f"solver must be a solver config (solver=edm|bdia_edm|ddim|bdia_ddim), got {solver!r}")
    solver = dict(solver)
    name, gamma, num_steps = solver.pop("name"), solver.pop("gamma", None), solver.pop("num_steps", None)
    parse_seeds(config.get("seeds"))
    if config.get("sigmas") is None:
        check_num_steps(num_steps)
    grid = {k: config[k] for k in _GRID_KEYS if k in config}
    check_grid(**grid)
    batch_size = config.get("batch_size", 64)
    if batch_size != "auto":
        check_int("batch_size", batch_size, 1)
    network_batch = config.get("network_batch")
    if network_batch != "auto":
        check_network_batch(network_batch)
    if config.get("sigmas") is not None:
        sigmas, _ = given_sigmas(config["sigmas"])
    else:
        sigmas = karras_sigmas(num_steps, grid.get("sigma_min", 0.002), grid.get("sigma_max", 80.0), grid.get("rho", 7.0))
    check_solver_options(name, gamma, solver, sigmas, 1)
    class_idx = config.get("class_idx")
    if class_idx is not None:
        check_int("class_idx", class_idx, 0)
    check_flags(**{k: config[k] for k in ("save_states", "resume", "progress", "channels_last") if k in config})
    SpeedOptions(config.get("precision", "float32"), config.get("channels_last", False), config.get("compile"))
    check_out_dir(config.get("out_dir"), "sample")  # (the grid's size needs the model's image shape: sample_run)


def sample_from_config(cfg, choices: Mapping[str, Any] | None = None) -> dict | None:
    """Run ``scripts/sample.py`` for a composed config (``configs/sample/sample.yaml``): join the process group the
    environment describes (``distributed``: auto | required | off), load the model, sample, and log on rank 0.

    ``choices``: the config group choices (Hydra's ``runtime.choices``), recorded in ``metrics.json`` and the
    logger's config. Returns ``sample_run``'s metrics on rank 0, ``None`` on the other ranks. Raises one of
    :data:`USER_ERRORS` for mistakes in the config and for missing files.
    """
    from omegaconf import OmegaConf

    check_config(cfg)  # cheap checks first: nothing is loaded for a refused run
    config = OmegaConf.to_container(cfg, resolve=True)
    ctx, device = init_distributed(config.get("device", "auto"), config.get("distributed", "auto"))
    solver = dict(config["solver"])
    solver_name = solver.pop("name")
    gamma = solver.pop("gamma", None)
    num_steps = solver.pop("num_steps")
    settings = {k: config[k] for k in _RUN_KEYS if k in config}
    settings["device"] = device
    choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra/")}

    check_out_dir(settings["out_dir"], "sample")  # cheap checks first: nothing is loaded for a refused run
    check_grid(**{k: settings[k] for k in _GRID_KEYS if k in settings})
    model_cfg = config.get("model")
    denoiser = load_model(model_cfg)
    model_info = {k: v for k, v in (model_cfg or {}).items() if not k.startswith("_")}
    model_info = {"config": choices.get("model"), "target": (model_cfg or {}).get("_target_"), **model_info}

    evaluators = build_metrics(cfg.get("metrics"))  # built before sampling: a bad metric option fails before any image is drawn

    out_dir = str(settings["out_dir"])
    metrics = sample_run(denoiser, solver=solver_name, gamma=gamma, num_steps=num_steps, **settings, **solver,
                         config={**config, "choices": choices}, model_info=model_info, dist=ctx)
    evaluation = None
    if evaluators:  # every rank: the metrics shard their images across ranks; rank 0 writes metrics.json
        evaluation = evaluate_run(out_dir, evaluators, write=True)
    if metrics is not None:
        if evaluation is not None:
            metrics["evaluation"] = evaluation
        # The logger starts once the run folder is the run's own (W&B writes its files into it).
        logger = instantiate(cfg.logger, "logger") if config.get("logger") else NullLogger()
        columns = ["solver", "gamma", "num_steps", "nfe", "num_images", "sampling_seconds", "images_per_second"]
        log_run(logger, {**config, "choices": choices}, out_dir, config.get("experiment_name"), metrics,
                images={"grid": Path(out_dir) / "grid.png"},
                tables=[Table("summary", columns, [[_cell(metrics.get(c)) for c in columns]])])
        print_summary(f"sample: {metrics['num_images']} images in {out_dir}", summary_rows(metrics, out_dir))
    return metrics


def summary_rows(metrics: Mapping[str, Any], out_dir) -> list[tuple[str, str]]:
    """What ``scripts/sample.py`` prints when it is done: images, solver and NFE, speed, the evaluation's
    headline numbers (FD/KID with the real-data floor, FID), the run folder and what to run next."""
    gamma = metrics.get("gamma")
    solver = f"{metrics['solver']}" + (f", gamma {gamma}" if gamma is not None else "")
    solver += f", {metrics['num_steps']} steps, NFE {metrics['nfe']} per image (counted)"
    resumed = metrics.get("num_resumed") or 0
    rows = [("images", f"{metrics['num_images']} (seeds {metrics['seeds']}; {metrics['num_sampled']} sampled now, "
                       f"{resumed} resumed)"),
            ("solver", solver),
            ("speed", speed_text(metrics))]
    evaluation = metrics.get("evaluation")
    rows += headline_rows(evaluation)
    if "mixture" in metrics:
        mixture = metrics["mixture"]
        rows.append(("mixture", f"RMS distance to the nearest component mean {mixture['nearest_mean_rms']:.4g} "
                                f"(component std {mixture['component_std']:.4g}); log-density per pixel "
                                f"{mixture['log_prob_per_dim']:.4g} (data: {mixture['log_prob_per_dim_reference']:.4g})"))
    rows.append(("run folder", str(out_dir)))
    if not evaluation:
        digits = list(metrics.get("image_shape") or []) == [1, 16, 16]
        rows.append(("evaluate", shell_command("python", "scripts/evaluate.py", out_dir,
                                               "metrics=digits" if digits else "metrics=fid")))
    sweep = sweep_folder()
    if sweep is not None:
        rows.append(("sweep table", shell_command("python", "scripts/summarize.py", sweep)))
    return rows


def _cell(value):
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


#: Top-level config keys that are ``sample_run`` arguments.
_RUN_KEYS = [k for k in inspect.signature(sample_run).parameters if k not in ("denoiser", "solver", "gamma", "num_steps",
                                                                             "config", "model_info", "dist", "solver_kwargs")]


_GRID_KEYS = ("sigma_min", "sigma_max", "rho", "grid_nrow", "grid_scale", "grid_padding")
