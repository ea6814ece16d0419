"""Text-to-image sampling with Stable Diffusion (or a flow-matching SD3 / FLUX model) and our DDIM / BDIA-DDIM
solvers (on a flow: flow Euler / BDIA-flow), as plain functions.

``scripts/text2image.py`` is a thin Hydra shell around :func:`text2image_from_config`, which loads the model
(:func:`bdia.networks.sd.load_sd`) and the prompts (:func:`bdia.prompts.load_prompts`), calls
:func:`text_to_image` and then the metrics. Tests call these functions directly.

Conventions:

* one image per (prompt, seed): images are numbered prompt-major, ``p<prompt index:05d>_s<seed:06d>.png``;
* image ``(p, s)``'s initial latent is a unit normal in z-space (diffusers' ``init_noise_sigma = 1``) drawn in
  float32 by its own ``torch.Generator`` seeded with ``s`` (EDM's per-image scheme, :class:`bdia.apps.sample.StackedRandomGenerator`),
  so images do not depend on the batch size and the images of one seed share their noise across prompts, as
  a diffusers pipeline called with ``generator=torch.Generator().manual_seed(s)`` does (and equals: tested).
  ``noise_per_prompt=True`` seeds image ``(p, s)``'s generator with ``s * num_prompts + p`` instead, so that
  every image has its own noise (caption sets for FID with ``seeds=0``);
* the solver state is ``x = z / alpha`` in float64 on :meth:`StableDiffusion.sigmas`; the networks run in the
  model's dtype; classifier-free guidance ``D_u + w (D_c - D_u)`` with the unconditional half on
  ``negative_prompt`` (default the empty prompt, as diffusers);
* NFE is counted by :class:`bdia.CountingDenoiser` (a guided call, which runs the UNet on a doubled batch, counts
  once), never assumed;
* images are quantised as ``(x * 127.5 + 128).clip(0, 255).to(uint8)``;
* **flow-matching models** (:class:`bdia.networks.flow.FlowModel`: SD3, FLUX; ``model=sd3-medium|flux-dev|tiny-flux``
  ...): the same per-image noise is the latent at ``t = 1`` itself (the solvers step a flow in its own latents
  ``x_t``, starting at ``sigma = inf``), on the grid the pipeline would run at that image size
  (:meth:`FlowModel.sigmas`: SD3's shift, FLUX's resolution-dependent ``mu``); ``ddim`` is flow Euler
  (``FlowMatchEulerDiscreteScheduler``), ``bdia_ddim`` BDIA over it; SD3 guides classifier-free (on the velocity,
  unconditional half on ``negative_prompt``), FLUX.1-dev through its guidance embedding (one network call per step);
  ``guidance_scale=None`` is the model's default; the final latent is decoded as it is; ``z_end`` / ``z_inner`` are
  the flow latents at the last two levels.

Run folder: ``images/*.png`` and ``records/*.npz`` (per image: ``nfe``, ``prompt_index``, ``seed`` and, with
``save_states``, the float64 final latent ``z_end`` and for BDIA the one before it, ``z_inner``), written
atomically as each batch finishes; at the end ``images.npz`` (``images``, ``prompts``, ``prompt_index``,
``seeds``; skipped with ``save_npz=False``), ``prompts.json`` (one prompt per image, in image order: what
:class:`bdia.metrics.CLIPScore` reads), ``prompts.txt`` (the distinct prompts, one per line: a
``prompt_file``), ``grid.png`` (one row per prompt), ``metrics.json`` (written last), ``settings.json``,
``config.yaml`` and ``env.json``. Resume: rerunning the same command skips the images already written;
a folder written with other settings is refused (``resume=False`` starts afresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import solvers as _solvers
from ..checks import check_flags, check_grid_size, check_image_grid, check_int, check_num_steps, check_solver_options
from ..configs import build_metrics, instantiate
from ..denoisers import CountingDenoiser, FixedBatchDenoiser, check_network_batch
from ..distributed import DistContext, init_distributed
from ..imageio import StackedRandomGenerator, format_seeds, image_grid, parse_seeds, png_bytes, quantize
from ..logger import NullLogger, Table, log_run
from ..metrics.clip_score import CLIPScore
from ..metrics.evaluate import evaluate_run
from ..metrics.fid import FID
from ..networks.flow import is_flow_model
from ..prompts import describe_prompt_source, load_prompts
from ..runfolder import IMAGES_DIR, RECORDS_DIR, RunFolder, check_out_dir
from ..runfolder import jsonable as _jsonable
from ..schedules import x_to_z, z_to_x
from ..speed import SpeedOptions, auto_batch_size, with_speed
from ..testing import has_random_weights
from .cli import headline_rows, print_summary, run_timing, shell_command, speed_text, sweep_folder
from .driver import ASSEMBLED_OUTPUTS, BatchResult, drive, finish, open_run_folder, read_item

__all__ = ["TEXT2IMAGE_SOLVERS", "RECOMMENDED_GAMMA", "text_to_image", "text2image_from_config", "image_name"]

log = logging.getLogger(__name__)

TEXT2IMAGE_SOLVERS = ("ddim", "bdia_ddim")
#: The authors' recommendation for text-to-image with SD (their README / paper): gamma by number of steps.
RECOMMENDED_GAMMA = {10: 0.5, 40: 1.0}

#: Written from all images at the end (bdia.apps.sample's, plus the prompt lists); removed when a resumed run starts.
_ASSEMBLED_OUTPUTS = (*ASSEMBLED_OUTPUTS, "prompts.json", "prompts.txt")


#: Bound on ``height`` / ``width`` (pixels): far above Stable Diffusion's native sizes (512, 768, 1024).
MAX_IMAGE_SIDE = 4096
#: File stems of a text-to-image run's items (:func:`image_name`): what ``resume=false`` may remove.
ITEM_PATTERN = r"p[0-9]{5,}_s[0-9]{6,}"


def image_name(prompt_index: int, seed: int) -> str:
    """File stem of image ``(prompt_index, seed)``: ``p00003_s000042``; sorts in image order."""
    return f"p{prompt_index:05d}_s{seed:06d}"


def _noise_seed(prompt_index: int, seed: int, num_prompts: int, noise_per_prompt: bool) -> int:
    return seed * num_prompts + prompt_index if noise_per_prompt else seed


def _prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _validate(solver, gamma, guidance_scale, batch_size, network_batch, grid_nrow, grid_padding, sigmas):
    check_solver_options(solver, gamma, {}, sigmas, batch_size, solvers=TEXT2IMAGE_SOLVERS)
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale)):  # None: the model's default
        raise ValueError(f"guidance_scale must be a finite number or null, got {guidance_scale!r}")
    check_network_batch(network_batch)
    check_image_grid(grid_nrow, 1, grid_padding)


def text_to_image(
    sd,
    prompts: Sequence[str],
    seeds="0-3",
    solver: str = "bdia_ddim",
    gamma=0.5,
    num_steps: int = 10,
    guidance_scale: float | None = 7.5,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    batch_size: int | str = 4,
    network_batch: int | None = None,
    noise_per_prompt: bool = False,
    out_dir="results/text2image/run",
    save_states: bool = False,
    save_npz: bool = True,
    resume: bool = True,
    grid_nrow: int | None = None,
    grid_padding: int = 2,
    progress: bool = True,
    precision: str = "float32",
    channels_last: bool = False,
    compile: str | None = None,
    config: Mapping[str, Any] | None = None,
    prompt_source: Mapping[str, Any] | None = None,
    dist: DistContext | None = None,
) -> dict | None:
    """Sample one image per (prompt, seed) with Stable Diffusion ``sd`` (:class:`bdia.networks.sd.StableDiffusion`)
    or a flow-matching model (:class:`bdia.networks.flow.FlowModel`: SD3, FLUX; see the module notes) and write the
    run folder ``out_dir`` (see the module notes). Returns the ``metrics.json`` dict.

    Args:
        prompts: the prompts (:func:`bdia.prompts.load_prompts`); seeds: a spec (``"0-3"``) or list.
        solver: ``ddim`` or ``bdia_ddim``; ``gamma`` in [0, 1] for BDIA (``None``: 1); ddim is gamma = 0 and
            refuses any other gamma (:func:`bdia.checks.check_solver_options`). Authors' recommendation
            (:data:`RECOMMENDED_GAMMA`): 0.5 at 10 steps, 1.0 at 40.
        num_steps: solver steps (NFE = num_steps, measured); guidance_scale: classifier-free guidance weight
            (1: none; FLUX.1-dev: its guidance embedding; ``None``: the model's default, SD 7.5); negative_prompt:
            the unconditional prompt (FLUX: must be empty, its guidance has no unconditional half).
        height, width: image size in pixels (default the model's native size).
        batch_size: images per solver call; network_batch: the networks see exactly this many rows per call
            (:class:`bdia.denoisers.FixedBatchDenoiser`), making float32 results independent of ``batch_size``;
            ``None``: the whole batch. ``batch_size="auto"``: the largest power of two (at most this rank's
            image count) whose guided UNet call fits in free memory (:func:`bdia.speed.auto_batch_size`).
        precision, channels_last, compile: how the UNet runs (:mod:`bdia.speed`: float32 | tf32 | bf16 | fp16,
            NHWC, a :func:`torch.compile` mode); solver states stay float64. Non-default values are recorded
            in ``settings.json``.
        noise_per_prompt: image ``(p, s)``'s noise from seed ``s * len(prompts) + p`` instead of ``s``.
        save_states: keep the float64 final latents (``z_end``; BDIA also ``z_inner``) in the records and
            ``images.npz``; save_npz: write ``images.npz`` (large for big runs; metrics read ``images/`` too).
        resume: skip images already written; ``False`` removes earlier outputs first.
        config, prompt_source: recorded in the run folder.
        dist: this process's place among several (:func:`bdia.distributed.init_distributed`): rank r samples
            items ``r, r + K, …`` (:mod:`bdia.apps.driver`); rank 0 writes the end-of-run files and returns the
            metrics, the other ranks ``None``.
    """
    started = time.perf_counter()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__} {_short_repr(prompt)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    seeds = parse_seeds(seeds)
    check_num_steps(num_steps)
    flow = is_flow_model(sd)
    if guidance_scale is None:  # the model's default
        guidance_scale = float(sd.default_guidance_scale) if flow else 7.5
    if flow:  # the pipeline's grid at this image size (FLUX: mu from the number of tokens)
        for name, side in (("height", height), ("width", width)):
            if side is not None:
                check_int(name, side, 8, MAX_IMAGE_SIDE)
        sd.latent_shape(height, width)
        sigmas = sd.sigmas(num_steps, height, width)
        if sd.guidance != "cfg" and negative_prompt:
            raise ValueError(f"negative_prompt: {sd.family.upper()} has no unconditional half (its guidance is "
                             "embedded in the network); leave negative_prompt empty")
    else:
        sigmas = sd.sigmas(num_steps)
    _validate(solver, gamma, guidance_scale, 1 if batch_size == "auto" else batch_size, network_batch,
              grid_nrow, grid_padding, sigmas)
    speed = SpeedOptions(precision, channels_last, compile)
    bdia_solver = solver == "bdia_ddim"
    gamma = (1.0 if gamma is None else gamma) if bdia_solver else None
    check_flags(save_states=save_states, save_npz=save_npz, resume=resume, noise_per_prompt=noise_per_prompt)
    for name, side in (("height", height), ("width", width)):  # None: the model's native size
        if side is not None:
            check_int(name, side, 8, MAX_IMAGE_SIDE)
    latent_shape = sd.latent_shape(height, width)
    image_shape = (3, latent_shape[1] * sd.vae_scale_factor, latent_shape[2] * sd.vae_scale_factor)
    device = sd.device

    settings = _jsonable({
        "solver": solver,
        "gamma": gamma,
        "num_steps": num_steps,
        "guidance_scale": float(guidance_scale),
        "negative_prompt": negative_prompt,
        "sigmas": sigmas.tolist(),
        "latent_shape": list(latent_shape),
        "num_prompts": len(prompts),
        "prompts_sha256": _prompts_digest(prompts),
        "noise_per_prompt": noise_per_prompt,
        "network_batch": network_batch,
        "device_type": device.type,
        "model": sd.describe(),
        **({} if speed.is_default else {"speed": speed.as_dict()}),
    })
    ctx = dist or DistContext()
    items = [(p, s) for p in range(len(prompts)) for s in seeds]
    names = [image_name(p, s) for p, s in items]
    keep_inner = save_states and bdia_solver
    need = {"prompt_index": ((), "iu"), "seed": ((), "iu")}  # what a record must hold to count as done
    need |= {"z_end": (tuple(latent_shape), "f")} if save_states else {}
    need |= {"z_inner": (tuple(latent_shape), "f")} if keep_inner else {}
    check_grid_size(len(items), image_shape, grid_nrow or len(seeds), grid_padding, 1)  # before any sampling
    # before the model is used (open_run checks again, under the lock, on every rank):
    check_out_dir(out_dir, "text2image", settings, resume, (IMAGES_DIR, RECORDS_DIR))

    if flow:  # SD3: classifier-free guidance on the velocity when guidance_scale > 1; FLUX: its guidance embedding
        uncond = sd.encode_prompts([negative_prompt]) if sd.guidance == "cfg" and float(guidance_scale) > 1 else None
    else:
        uncond = sd.encode_prompts([negative_prompt]) if float(guidance_scale) != 1.0 else None
    net = with_speed(sd.denoiser(guidance_scale, uncond), **speed.as_dict())

    def prompt_cond(indices) -> dict:
        encoded = sd.encode_prompts([prompts[p] for p in indices])
        return encoded if flow else {"encoder_hidden_states": encoded}

    if batch_size == "auto":
        batch_size = auto_batch_size(net, latent_shape, device, limit=max(1, -(-len(items) // ctx.world_size)),
                                     cond=prompt_cond([0]))
        log.info("batch_size=auto: %d images per batch", batch_size)
    counter = CountingDenoiser(net if network_batch is None else FixedBatchDenoiser(net, network_batch))

    def solve(batch) -> BatchResult:
        noise_seeds = [_noise_seed(p, s, len(prompts), noise_per_prompt) for p, s in batch]
        z_init = StackedRandomGenerator(noise_seeds, device).randn(latent_shape, dtype=torch.float64)
        cond = prompt_cond([p for p, _ in batch])
        counter.reset()
        t0 = time.perf_counter()
        with torch.no_grad():  # a flow starts from the noise itself (t = 1, sigma = inf); SD from x = z / alpha
            out = _solvers.sample(counter, z_init if flow else z_to_x(z_init, sigmas[0]), sigmas, solver=solver,
                                  gamma=gamma, cond=cond, return_pair=keep_inner)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        x_end, x_inner = (out.x_end, out.x_inner) if keep_inner else (out, None)
        z_end = x_end if flow else x_to_z(x_end, sigmas[-1])
        images = quantize(sd.decode_latents(z_end)).cpu().numpy()
        t2 = time.perf_counter()
        z_end_np = z_end.cpu().numpy() if save_states else None
        if keep_inner:
            z_inner = (x_inner if flow else x_to_z(x_inner, sigmas[-2])).cpu().numpy()
        records = []
        for i, (p, s) in enumerate(batch):
            record = {"prompt_index": np.int64(p), "seed": np.int64(s)}
            if save_states:
                record["z_end"] = z_end_np[i]
            if keep_inner:
                record["z_inner"] = z_inner[i]
            records.append(record)
        return BatchResult(images, records, counter.nfe, {"sampling": t1 - t0, "decode": t2 - t1})

    def write_outputs(run: RunFolder, stats) -> dict:
        assembled = _assemble(run, prompts, items, names, image_shape, need, save_states, keep_inner, save_npz,
                              grid_nrow or len(seeds), grid_padding)
        sampled = stats.sampled
        metrics = {
            "solver": solver,
            "gamma": gamma,
            "num_steps": num_steps,
            "guidance_scale": float(guidance_scale),
            "negative_prompt": negative_prompt,
            "nfe": assembled["nfe"],
            "nfe_note": "network evaluations per image, counted; one guided call (UNet on [uncond, cond]) counts once",
            "nfe_per_batch": stats.nfe_per_batch,
            "num_images": len(items),
            "num_sampled": sampled,
            "num_resumed": len(items) - sampled,
            "num_prompts": len(prompts),
            "prompt_source": dict(prompt_source) if prompt_source is not None else {"source": "list"},
            "seeds": format_seeds(seeds),
            "noise_per_prompt": noise_per_prompt,
            "image_size": [latent_shape[1] * sd.vae_scale_factor, latent_shape[2] * sd.vae_scale_factor],
            "latent_shape": list(latent_shape),
            "batch_size": batch_size,
            "network_batch": network_batch,
            "speed": speed.as_dict(),
            "world_size": ctx.world_size,
            "sigmas": {"levels": sigmas.tolist(), "scheduler": sd.scheduler_config} if flow else
                      {"levels": sigmas.tolist(), "timestep_spacing": sd.schedule["timestep_spacing"],
                       "steps_offset": sd.schedule["steps_offset"], "set_alpha_to_one": sd.schedule["set_alpha_to_one"]},
            "initial_noise": "x_t ~ N(0, I) at t = 1 (sigma = inf), the flow model's own latents (diffusers' "
                             "convention)" if flow else
                             "z ~ N(0, I) in VP latent space (diffusers' convention), x_init = z / alpha(sigmas[0])",
            "state_dtype": "float64",
            "model": sd.describe(),
            "device": str(device),
            # sampling_seconds / decode_seconds: every image's own seconds summed, resumed ones included
            # (bdia.apps.cli.run_timing); images_per_second counts both phases
            **run_timing(stats, assembled["timed"], len(items), ("sampling", "decode")),
        }
        metrics["wall_seconds"] = round(time.perf_counter() - started, 4)
        metrics["session"]["wall_seconds"] = metrics["wall_seconds"]
        metrics = _jsonable(metrics)
        run.write_json("metrics.json", metrics)
        run.mark("complete")
        log.info("%s: %d images (%d sampled now), NFE %s, %s -> %s", solver, len(items), sampled,
                 metrics["nfe"], speed_text(metrics), out_dir)
        return metrics

    with open_run_folder(out_dir, app="text2image", settings=settings, resume=resume, item_pattern=ITEM_PATTERN,
                         outputs=_ASSEMBLED_OUTPUTS, ctx=ctx, config=config, device=device) as run:
        stats = drive(run, items, names, solve, batch_size=batch_size, image_shape=image_shape, need=need, ctx=ctx,
                      progress=progress, desc=f"{solver} text2image")
        return finish(ctx, lambda: write_outputs(run, stats))


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _assemble(run: RunFolder, prompts, items, names, image_shape, need, save_states, keep_inner, save_npz, grid_nrow,
              grid_padding) -> dict:
    images, nfe, z_end, z_inner, timed = [], [], [], [], 0
    for name in names:
        image, record = read_item(run, name, need, image_shape)  # verified as resume verifies it
        images.append(image)
        nfe.append(int(record["nfe"]))
        timed += "seconds_sampling" in record and "seconds_decode" in record
        if save_states:
            z_end.append(record["z_end"])
        if keep_inner:
            z_inner.append(record["z_inner"])
    images = np.stack(images)
    per_image_prompts = [prompts[p] for p, _ in items]
    if save_npz:
        arrays = {"images": images, "prompts": np.asarray(per_image_prompts),
                  "prompt_index": np.asarray([p for p, _ in items], dtype=np.int64),
                  "seeds": np.asarray([s for _, s in items], dtype=np.int64)}
        if save_states:
            arrays["z_end"] = np.stack(z_end)
            if keep_inner:
                arrays["z_inner"] = np.stack(z_inner)
        run.write_npz("images.npz", arrays, compressed=True)
    run.write_json("prompts.json", per_image_prompts)
    run.write_text("prompts.txt", "".join(p.replace("\n", " ") + "\n" for p in prompts))
    run.write_bytes("grid.png", png_bytes(image_grid(images, nrow=grid_nrow, padding=grid_padding, pad_value=255)))
    distinct = sorted(set(nfe))
    return {"nfe": distinct[0] if len(distinct) == 1 else distinct, "timed": timed}


# --------------------------------------------------------------------------------------------------
# The Hydra app.

#: Top-level keys of ``configs/text2image/text2image.yaml`` that are :func:`text_to_image` arguments.
_RUN_KEYS = ("seeds", "guidance_scale", "negative_prompt", "height", "width",
             "batch_size", "network_batch", "noise_per_prompt", "out_dir", "save_states", "save_npz", "resume",
             "grid_nrow", "grid_padding", "progress", "precision", "channels_last", "compile")
_PROMPT_KEYS = ("prompts", "prompt_file", "coco_captions", "num_prompts", "prompt_seed")


def _preload_metric_models(evaluators: Mapping[str, Any]) -> None:
    """Load CLIP weights and FID reference statistics before sampling, so a missing model, reference folder or
    statistics file fails at once rather than after the run."""

    for metric in evaluators.values():
        if isinstance(metric, CLIPScore):
            metric.load()
        if isinstance(metric, FID):
            if str(metric.ref_spec) == "auto":
                raise ValueError("text-to-image FID needs a reference: metrics.fid.ref=<folder of real images (e.g. "
                                 "COCO val2014 resized to the model's size), or a statistics .npz from scripts/fid_ref.py>")
            metric.reference_for(metric.ref_spec)  # cached; computed once from a folder


def check_config(cfg) -> None:
    """The cheap checks of a composed ``configs/text2image`` config (no model, no prompts read, nothing written):
    what ``scripts/text2image.py`` runs on every job of a sweep before any runs. One-line ``ValueError`` naming
    the key."""
    from omegaconf import OmegaConf

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.startswith("metrics."))
    if missing:  # e.g. metrics=reconstruction without metrics.reconstruction.reference
        raise ValueError(f"{missing[0]} is not set: give it on the command line ({missing[0]}=...)")
    config = OmegaConf.to_container(cfg, resolve=True)
    spec = config.get("solver")
    spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name, gamma, num_steps = spec.get("name"), spec.get("gamma"), spec.get("num_steps")
    if name not in TEXT2IMAGE_SOLVERS:
        raise ValueError(f"unknown solver {name!r} for text-to-image; choose one of: {', '.join(TEXT2IMAGE_SOLVERS)}")
    check_num_steps(num_steps)
    seeds = parse_seeds(config.get("seeds"))
    _validate(name, gamma, config.get("guidance_scale"), 1 if config.get("batch_size") == "auto" else
              config.get("batch_size", 4), config.get("network_batch"), config.get("grid_nrow"),
              config.get("grid_padding", 2), torch.linspace(14.6, 0.03, num_steps + 1, dtype=torch.float64))
    for key in ("height", "width"):
        if config.get(key) is not None:
            check_int(key, config[key], 8, MAX_IMAGE_SIDE)
    for key in ("negative_prompt",):
        if not isinstance(config.get(key, ""), str):
            raise ValueError(f"{key} must be a string, got {config.get(key)!r}")
    check_flags(**{k: config[k] for k in ("save_states", "save_npz", "resume", "noise_per_prompt", "progress",
                                          "channels_last") if k in config})
    SpeedOptions(config.get("precision", "float32"), config.get("channels_last", False), config.get("compile"))
    prompts = config.get("prompts")
    if isinstance(prompts, list):
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
        side = max(config.get("height") or 512, config.get("width") or 512)
        check_grid_size(len(prompts) * len(seeds), (3, side, side), config.get("grid_nrow") or len(seeds),
                        config.get("grid_padding", 2), 1)
    check_out_dir(config.get("out_dir"), "text2image")


def text2image_from_config(cfg, choices: Mapping[str, Any] | None = None) -> dict | None:
    """Run ``scripts/text2image.py`` for a composed ``configs/text2image/text2image.yaml`` config: load the model
    (``model`` group, :func:`bdia.networks.sd.load_sd`), the prompts and the metrics (``metrics`` group, built
    and their weights loaded before sampling), sample (:func:`text_to_image`), evaluate the run folder
    (:func:`bdia.metrics.evaluate.evaluate_run`, merged into ``metrics.json`` under ``evaluation``).
    Under torchrun (``distributed: auto``) the items are sharded over the ranks (:mod:`bdia.apps.driver`). Returns
    the metrics dict on rank 0, ``None`` on the other ranks."""
    from omegaconf import OmegaConf

    check_config(cfg)  # before any model is loaded
    config = OmegaConf.to_container(cfg, resolve=True)
    choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra/")}
    spec = config.get("solver")
    spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
    solver = {"solver": spec.get("name"), "gamma": spec.get("gamma"), "num_steps": spec.get("num_steps")}
    if solver["solver"] not in TEXT2IMAGE_SOLVERS:
        raise ValueError(f"unknown solver {solver['solver']!r} for text-to-image; choose one of: {', '.join(TEXT2IMAGE_SOLVERS)}")
    check_out_dir(config.get("out_dir", "."), "text2image")  # before any model is loaded
    check_image_grid(config.get("grid_nrow"), 1, config.get("grid_padding", 2))
    ctx, device = init_distributed(config.get("device", "auto"), config.get("distributed", "auto"))
    prompt_args = {k: config.get(k) for k in _PROMPT_KEYS}
    prompt_args["prompt_seed"] = prompt_args["prompt_seed"] or 0
    prompts = load_prompts(**prompt_args)
    evaluators = build_metrics(cfg.get("metrics"))
    _preload_metric_models(evaluators)
    model_cfg = config.get("model")
    if not model_cfg or "_target_" not in model_cfg:
        raise ValueError("model: the config has no _target_ (choose one with model=sd15|sd14|sd21_base|tiny-sd, or a "
                         "flow model: sd3-medium|sd3.5-medium|sd3.5-large|flux-dev|flux-schnell|tiny-sd3|tiny-flux)")
    sd = instantiate(model_cfg, "model", device=str(device))
    settings = {k: config[k] for k in _RUN_KEYS if k in config}
    metrics = text_to_image(sd, prompts, **solver, **settings, config={**config, "choices": choices},
                            prompt_source=describe_prompt_source(**prompt_args), dist=ctx)
    out_dir = Path(settings.get("out_dir", "."))
    if evaluators:  # every rank: the metrics shard the images over the ranks; rank 0 writes metrics.json
        evaluation = evaluate_run(out_dir, evaluators, write=True)
        if metrics is not None:
            metrics["evaluation"] = evaluation
    if metrics is not None:
        logger = instantiate(cfg.logger, "logger") if config.get("logger") else NullLogger()
        log_run(logger, {**config, "choices": choices}, out_dir, config.get("experiment_name"), metrics,
                images={"grid": out_dir / "grid.png"}, tables=[_image_table(out_dir, prompts, metrics)])
        print_summary(f"text2image: {metrics['num_images']} images in {out_dir}", summary_rows(metrics, out_dir))
    return metrics


def summary_rows(metrics: Mapping[str, Any], out_dir) -> list[tuple[str, str]]:
    """What ``scripts/text2image.py`` prints when it is done: images, solver, NFE, speed, CLIP score / FID, the
    run folder, and a warning when the model has random weights (the tiny SD: its images are noise)."""
    gamma = metrics.get("gamma")
    solver = metrics["solver"] + (f", gamma {gamma}" if gamma is not None else "")
    solver += f", {metrics['num_steps']} steps, guidance {metrics['guidance_scale']:g}, NFE {metrics['nfe']} per image"
    rows = [("images", f"{metrics['num_images']} ({metrics['num_prompts']} prompts x seeds {metrics['seeds']}; "
                       f"{metrics['num_sampled']} sampled now, {metrics['num_resumed']} resumed)"),
            ("solver", solver),
            ("speed", speed_text(metrics) + " (sampling + VAE decoding)")]
    rows += headline_rows(metrics.get("evaluation"))
    source = (metrics.get("model") or {}).get("source")
    if source and has_random_weights(source):
        rows.append(("note", f"{source} has random weights (a tiny test model): its images are noise by construction"))
    rows.append(("run folder", str(out_dir)))
    sweep = sweep_folder()
    if sweep is not None:
        rows.append(("sweep table", shell_command("python", "scripts/summarize.py", sweep)))
    return rows


def _image_table(out_dir: Path, prompts: Sequence[str], metrics: Mapping[str, Any]) -> Table:
    """One row per image: prompt, seed, the image, and its CLIP score when ``metrics=clip`` computed it."""
    items = [(p, s) for p in range(len(prompts)) for s in parse_seeds(metrics["seeds"])]  # the run's order
    rows = [[prompts[p], s, str(out_dir / IMAGES_DIR / f"{image_name(p, s)}.png")] for p, s in items]
    per_image = (metrics.get("evaluation", {}).get("clip") or {}).get("per_image")
    scores = per_image if per_image is not None and len(per_image) == len(rows) else [None] * len(rows)
    return Table("images", ["prompt", "seed", "image", "clip_score"],
                 [row + [score] for row, score in zip(rows, scores)], image_columns=["image"])
