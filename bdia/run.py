"""A sampling run as plain functions: seeds, per-image noise and labels, quantisation, image grids, run outputs.

``scripts/sample.py`` is a thin Hydra shell around :func:`bdia.app.sample_from_config`, which calls
:func:`sample_run`; tests call these functions directly.

Conventions (EDM's ``generate.py``, ``shared/DESIGN.md`` section 4):

* seeds are a list or a range spec (``"0-63"``, ``"0,5,7-9"``); image k's noise, then its class label, come
  from its own ``torch.Generator`` seeded with k, so an image does not depend on the batch size, on the other
  seeds or on the number of processes (torchrun: rank r of K samples ``seeds[r::K]``);
* networks are called on a fixed number of rows (:class:`FixedBatchDenoiser`), so their float32 rounding does
  not change with the batch size either;
* images are quantised as ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` and saved as PNG;
* every run folder holds ``metrics.json`` (NFE measured, not assumed), ``env.json`` and the resolved config.

Resume: each image is written on its own (``images/<seed>.png`` and ``records/<seed>.npz``, each atomically:
a temporary name, then ``os.replace``), so a killed run leaves only complete files; running the same command
again skips the seeds already there. ``settings.json`` records what determines the images (solver, grid,
model …); a rerun with other settings into the same folder is refused instead of mixing images.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import solvers as _solvers
from .denoisers import CountingDenoiser, DenoiserWrapper, GaussianMixtureDenoiser
from .distributed import DistContext, barrier, gather, resolve_device, shard
from .models import image_shape_of, label_dim_of
from .runfolder import IMAGES_DIR, RECORDS_DIR, SETTINGS_FILE, atomic_write, image_complete, mark_state, prepare_run_folder
from .runfolder import jsonable as _jsonable
from .runfolder import png_shape_ok
from .runfolder import write_json as _write_json
from .schedules import karras_sigmas

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
    "sample_run",
]

log = logging.getLogger(__name__)

#: Seeds are 32-bit (EDM takes ``seed % 2**32``); a run takes at most this many.
MAX_SEED = 2**32 - 1
MAX_SEEDS = 10_000_000

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")

# --------------------------------------------------------------------------------------------------
# Seeds and noise.


def parse_seeds(spec) -> list[int]:
    """Seeds from an int, a spec string (``"0-49999"``, ``"0,5,7-9"``; ranges inclusive) or a list of either.

    Raises ``ValueError`` naming the offending part for anything else: empty specs, negative or non-integer
    seeds, descending ranges (``"9-7"``), seeds above ``2**32 - 1``, duplicates.
    """
    seeds = _parse_seed_spec(spec)
    if not seeds:
        raise ValueError(f"seeds: no seeds given ({spec!r}); use e.g. 0-63 or 0,5,7-9")
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ValueError(f"seeds: seed {s} appears more than once in {spec!r}")
        seen.add(s)
    return seeds


def _parse_seed_spec(spec) -> list[int]:
    if isinstance(spec, bool) or spec is None:
        raise ValueError(f"seeds: expected a seed, a range like 0-63 or a list, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return [_check_seed(int(spec), spec)]
    if isinstance(spec, str):
        seeds: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if part.isdigit():
                seeds.append(_check_seed(int(part), spec))
                continue
            match = _RANGE.match(part)
            if not match:
                where = "" if part == spec else f" in {spec!r}"
                raise ValueError(
                    f"seeds: cannot parse {part!r}{where}; expected non-negative integers and "
                    f"ranges a-b separated by commas, e.g. 0-63 or 0,5,7-9"
                )
            lo, hi = (_check_seed(int(v), spec) for v in match.groups())
            if lo > hi:
                raise ValueError(f"seeds: range {part!r} in {spec!r} is descending; write {hi}-{lo}")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"seeds: {spec!r} names more than {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
        return seeds
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        seeds = []
        for item in spec:
            if isinstance(item, (list, tuple)):
                raise ValueError(f"seeds: nested lists are not seeds: {item!r}")
            seeds.extend(_parse_seed_spec(item))
        return seeds
    if isinstance(spec, float) and spec.is_integer():
        return [_check_seed(int(spec), spec)]
    raise ValueError(f"seeds: expected a seed, a range like 0-63 or a list, got {spec!r}")


def _check_seed(seed: int, spec) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seeds: seed {seed} in {spec!r} is outside [0, 2**32 - 1]")
    return seed


def format_seeds(seeds: Sequence[int]) -> str:
    """The shortest range spec for ``seeds`` in their order: ``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


class StackedRandomGenerator:
    """One ``torch.Generator`` per image, seeded with the image's seed (EDM's scheme): row k of every draw
    comes from generator k alone, so it does not depend on the batch it is in. ``randn_like`` can be handed
    to :func:`bdia.edm` as the churn noise, which keeps stochastic EDM sampling per-image reproducible too.

    Draws are made in float32 (what EDM draws) and cast, so seed k gives EDM's latents for seed k on the same
    device type (CPU and CUDA generators give different numbers).
    """

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape, dtype=torch.float64) -> torch.Tensor:
        """``[len(seeds), *shape]`` standard normal draws, row k from generator k."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows for {len(self.generators)} generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in ``[0, high)`` per image (``[len(seeds)]``, int64), from that image's generator."""
        return torch.stack([torch.randint(int(high), size=(), generator=g, device=self.device) for g in self.generators])


def seed_noise(seeds: Sequence[int], shape, sigma_max, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """The initial states ``sigma_max * n_k`` (``[len(seeds), *shape]``), ``n_k`` drawn by a generator seeded
    with ``seeds[k]`` alone. ``shape`` is one image's shape, e.g. ``(1, 16, 16)``."""
    noise = StackedRandomGenerator(parse_seeds(list(seeds)), device).randn(shape, dtype=dtype)
    return noise * torch.as_tensor(sigma_max, dtype=dtype, device=noise.device)


def class_labels_for(rng: StackedRandomGenerator, label_dim: int, class_idx: int | None = None):
    """Class labels as EDM's ``generate.py`` draws them, *after* the latents: image k's own generator picks
    ``randint(label_dim)``, the label is that row of ``eye(label_dim)`` (float32 one-hot). ``class_idx`` fixes
    the class for every image (the draw still happens, as in EDM, so later draws such as EDM's churn noise
    are unchanged). Returns ``(indices [B] int64, one_hot [B, label_dim])``, or ``(None, None)`` when
    ``label_dim`` is 0."""
    if not label_dim:
        return None, None
    indices = rng.randint(label_dim)
    if class_idx is not None:
        indices = torch.full_like(indices, int(class_idx))
    return indices, torch.eye(label_dim, device=indices.device)[indices]


#: Bounds on settings that size allocations (network rows per call, solver steps): far above any real run.
MAX_NETWORK_BATCH = 65536
MAX_NUM_STEPS = 100_000


def _check_network_batch(rows, allow_none: bool = True) -> None:
    if rows is None and allow_none:
        return
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_NETWORK_BATCH:
        raise ValueError(f"network_batch must be an integer in 1..{MAX_NETWORK_BATCH} or null, got {rows!r}")


class FixedBatchDenoiser(DenoiserWrapper):
    """Calls ``denoiser`` on chunks of exactly ``rows`` rows, padding the last chunk with copies of its final
    row and dropping their outputs.

    Float32 convolutions and matrix products pick their kernels, and so their rounding, by the input's shape
    (measured on the CPU: EDM's networks give other low bits for the same image in a batch of 1 and of 5).
    With the shape fixed, row k's output depends on row k alone, so an image is bit-identical whatever the
    batch size or number of processes. Per-row tensors among ``sigma``, ``class_labels`` and ``cond`` (first
    dimension = batch) are chunked alongside ``x``.
    """

    def __init__(self, denoiser, rows: int):
        super().__init__(denoiser)
        _check_network_batch(rows, allow_none=False)
        self.rows = rows

    def forward(self, x, sigma, class_labels=None, **cond):
        batch = x.shape[0]

        def take(value, start, stop):
            if not (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch):
                return value
            part = value[start:stop]
            missing = self.rows - part.shape[0]
            if missing:
                part = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
            return part

        outputs = []
        for start in range(0, batch, self.rows):
            stop = min(start + self.rows, batch)
            chunk = {k: take(v, start, stop) for k, v in cond.items()}
            out = self.denoiser(take(x, start, stop), take(sigma, start, stop), take(class_labels, start, stop), **chunk)
            outputs.append(out[: stop - start])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# --------------------------------------------------------------------------------------------------
# Images.


def quantize(x) -> torch.Tensor:
    """EDM's quantisation of ``[-1, 1]`` images: ``(x * 127.5 + 128).clip(0, 255).to(uint8)``.

    (The ``+ 128`` with truncation rounds ``x * 127.5 + 127.5`` to the nearest integer, halves up.)
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise TypeError(f"quantize expects floating-point images in [-1, 1], got dtype {x.dtype}")
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _as_uint8_nchw(images) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (see quantize), got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, C, H, W] with C = 1 or 3, got {tuple(array.shape)}")
    return array


def image_grid(images, nrow: int | None = None, padding: int = 0, pad_value: int = 0, scale: int = 1) -> np.ndarray:
    """Tile uint8 images ``[N, C, H, W]`` into one ``[H', W', C]`` array, ``nrow`` images per row (default
    ``ceil(sqrt(N))``), ``padding`` pixels of ``pad_value`` between and around tiles, each pixel repeated
    ``scale`` times (nearest-neighbour enlargement, for tiny images)."""
    array = _as_uint8_nchw(images)
    n, c, h, w = array.shape
    if n == 0:
        raise ValueError("no images to tile")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    if scale > 1:
        array = array.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol_tiles, nrow_tiles = min(nrow, n), math.ceil(n / nrow)
    grid = np.full(
        (padding + nrow_tiles * (h + padding), padding + ncol_tiles * (w + padding), c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = array[i].transpose(1, 2, 0)
    return grid


def _png_bytes(array_hwc: np.ndarray) -> bytes:
    import io

    from PIL import Image

    image = Image.fromarray(array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_grid(images, path, nrow: int | None = None, padding: int = 0, pad_value: int = 0, scale: int = 1) -> Path:
    """Write :func:`image_grid` of uint8 images ``[N, C, H, W]`` to ``path`` as PNG (atomically)."""
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value, scale=scale)
    with atomic_write(path) as f:
        f.write(_png_bytes(grid))
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Files.


def _package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("bdia")
    except metadata.PackageNotFoundError:
        return None


def environment_info(device=None, world_size: int = 1) -> dict:
    """What produced a run: git commit (and whether the tree had uncommitted changes), versions, device,
    number of processes."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    versions = {"python": platform.python_version(), "bdia": _package_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("hydra", "omegaconf", "sklearn", "PIL", "wandb"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = module.__version__
    device = torch.device(device or "cpu")
    info = {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(world_size),
    }
    return info



# --------------------------------------------------------------------------------------------------
# A sampling run.

#: Arguments of the solver functions that ``sample_run`` supplies itself (everything else is a solver option).
_SUPPLIED = {"denoiser", "x", "x_init", "sigmas", "gamma", "class_labels", "cond", "progress", "randn_like"}

#: What a run writes from all its images at the end: replaced (atomically) only when a run finishes, removed
#: by ``resume=false`` together with the images, records and run records (:mod:`bdia.runfolder`).
_ASSEMBLED_OUTPUTS = ("images.npz", "grid.png", "metrics.json")


def _solver_options(solver: str) -> list[str]:
    params = inspect.signature(getattr(_solvers, solver)).parameters
    return [name for name in params if name not in _SUPPLIED]


def _validate(solver, gamma, batch_size, solver_kwargs, sigmas) -> None:
    if solver not in _solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(_solvers.SOLVERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    allowed = _solver_options(solver)
    unknown = sorted(set(solver_kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"solver {solver!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(allowed) or 'none'}"
        )
    if "backward" in solver_kwargs and solver_kwargs["backward"] not in _solvers.BACKWARD_MAPS:
        raise ValueError(f"backward must be one of {list(_solvers.BACKWARD_MAPS)}, got {solver_kwargs['backward']!r}")
    for name in ("s_churn", "s_min", "s_max", "s_noise"):
        value = solver_kwargs.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(gamma, bool):
        raise ValueError(f"gamma must be a number in [0, 1], a list or a schedule name, got {gamma!r}")
    if solver in _solvers.INVERTIBLE_SOLVERS:
        _solvers.gamma_schedule(1.0 if gamma is None else gamma, sigmas, solver)  # raises on bad gamma
    elif gamma is not None and not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma == 0):
        raise ValueError(f"gamma applies to the BDIA solvers only; {solver!r} is gamma = 0 (use bdia_{solver})")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_grid(sigma_min=0.002, sigma_max=80.0, rho=7.0, grid_nrow=None, grid_scale=1, grid_padding=0) -> None:
    """The noise grid's and the image grid's settings, checked before anything is loaded or sampled."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if not _is_number(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    _check_grid_options(grid_nrow, grid_scale, grid_padding)


def _check_grid_options(grid_nrow, grid_scale, grid_padding) -> None:
    if grid_nrow is not None and (isinstance(grid_nrow, bool) or not isinstance(grid_nrow, int) or grid_nrow < 1):
        raise ValueError(f"grid_nrow must be a positive integer or null, got {grid_nrow!r}")
    if isinstance(grid_scale, bool) or not isinstance(grid_scale, int) or not 1 <= grid_scale <= 64:
        raise ValueError(f"grid_scale must be an integer in 1..64, got {grid_scale!r}")
    if isinstance(grid_padding, bool) or not isinstance(grid_padding, int) or not 0 <= grid_padding <= 1024:
        raise ValueError(f"grid_padding must be an integer in 0..1024, got {grid_padding!r}")


def _validate_labels(label_dim: int, class_idx) -> None:
    if class_idx is None:
        return
    if isinstance(class_idx, bool) or not isinstance(class_idx, int):
        raise ValueError(f"class_idx must be an integer class index or null, got {class_idx!r}")
    if not label_dim:
        raise ValueError(f"class_idx={class_idx} needs a class-conditional model; this one is unconditional")
    if not 0 <= class_idx < label_dim:
        raise ValueError(f"class_idx={class_idx} is outside the model's classes 0..{label_dim - 1}")


def _seed_name(seed: int) -> str:
    return f"{seed:06d}"


def seeds_done(out_dir, seeds: Sequence[int], need: Iterable[str] = (), shape: Sequence[int] | None = None) -> list[int]:
    """The seeds among ``seeds`` whose image is complete in ``out_dir`` (:func:`bdia.runfolder.image_complete`:
    ``images/<seed>.png`` decodes to ``shape`` and ``records/<seed>.npz`` reads back holding ``nfe`` and the
    arrays named in ``need``, e.g. ``x_end``). Anything damaged is simply sampled again."""
    need = set(need) | {"nfe"}
    return [seed for seed in seeds if image_complete(out_dir, _seed_name(seed), need, shape)]


def _prepare_out_dir(out_dir: Path, settings: dict, resume: bool, ctx: DistContext, config, device,
                     assembled: Sequence[str] = _ASSEMBLED_OUTPUTS, app: str = "sample",
                     extra_records: Mapping[str, str] | None = None) -> None:
    """:func:`bdia.runfolder.prepare_run_folder` for a sampling app: checks on every rank, then rank 0 writes
    ``settings.json``, ``config.yaml`` (``config``), ``env.json`` and ``extra_records`` (name -> text)."""
    from omegaconf import OmegaConf

    records = {}
    if config is not None:
        records["config.yaml"] = lambda: OmegaConf.to_yaml(OmegaConf.create(_jsonable(dict(config))))
    records["env.json"] = lambda: json.dumps(environment_info(device, ctx.world_size), indent=2) + "\n"
    for name, text in (extra_records or {}).items():
        records[name] = lambda text=text: text
    prepare_run_folder(out_dir, settings, resume, app, is_main=ctx.is_main, barrier=lambda: barrier(ctx),
                       assembled=assembled, records=records)


def _write_image(out_dir: Path, seed: int, image_chw: np.ndarray, record: dict) -> None:
    """One finished image: the PNG, then its record (NFE, class, states). Each file appears atomically; the
    record, written last, marks the seed as done."""
    name = _seed_name(seed)
    with atomic_write(out_dir / IMAGES_DIR / f"{name}.png") as f:
        f.write(_png_bytes(image_chw.transpose(1, 2, 0)))
    with atomic_write(out_dir / RECORDS_DIR / f"{name}.npz") as f:
        np.savez(f, **record)


def _read_png(path: Path, shape: Sequence[int]) -> np.ndarray:
    """The PNG at ``path`` as uint8 ``[C, H, W]``; ``ValueError`` unless it has ``shape``."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    array = array.transpose(2, 0, 1)
    if array.shape != tuple(shape):
        raise ValueError(f"{path}: shape {list(array.shape)}, expected {list(shape)}")
    return array


def sample_run(
    denoiser,
    solver: str = "bdia_edm",
    gamma=None,
    num_steps: int = 18,
    seeds="0-63",
    batch_size: int = 64,
    out_dir="results/sample",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    image_shape: Sequence[int] | None = None,
    device="cpu",
    class_idx: int | None = None,
    network_batch: int | None = 64,
    save_states: bool = False,
    resume: bool = True,
    grid_nrow: int | None = None,
    grid_scale: int = 1,
    grid_padding: int = 0,
    progress: bool = True,
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
    per seed; networks see exactly ``network_batch`` rows per call (:class:`FixedBatchDenoiser`; ``None``:
    the whole batch, faster but float32 rounding then depends on the batch size; analytic mixtures are
    row-independent and never padded). The grid is ``karras_sigmas(num_steps, sigma_min, sigma_max, rho)``
    with ``sigma_min``/``sigma_max`` clamped to the denoiser's range, as EDM's sampler does.

    ``resume``: skip seeds whose files are already there (the folder's ``settings.json`` must match, else
    ``ValueError``); ``False`` removes earlier outputs first. ``dist``: this process's place among several
    (:func:`bdia.distributed.init_distributed`); rank r samples ``seeds[r::K]`` and rank 0 writes the
    shared outputs after all ranks finish. Other options go to :func:`bdia.sample` (``backward`` for
    bdia_edm; ``s_churn`` … for edm, whose churn noise comes from the per-image generators).

    Inputs are checked before any sampling; mistakes raise ``ValueError``. Returns the metrics dict on rank 0
    and ``None`` on other ranks.
    """
    started = time.perf_counter()
    ctx = dist or DistContext()
    seeds = parse_seeds(seeds)
    device = resolve_device(device, ctx.local_rank)
    _validate_grid(sigma_min, sigma_max, rho, grid_nrow, grid_scale, grid_padding)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 2 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"num_steps must be an integer in 2..{MAX_NUM_STEPS}, got {num_steps!r}")
    sigma_min = max(float(sigma_min), float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(float(sigma_max), float(getattr(denoiser, "sigma_max", math.inf)))
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=getattr(denoiser, "round_sigma", None))
    _validate(solver, gamma, batch_size, solver_kwargs, sigmas)
    shape = tuple(int(s) for s in (image_shape if image_shape is not None else (image_shape_of(denoiser) or ())))
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be [C, H, W] with C = 1 or 3 (pass image_shape=...), got {list(shape)}")
    label_dim = label_dim_of(denoiser)
    _validate_labels(label_dim, class_idx)
    for name, flag in (("save_states", save_states), ("resume", resume)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be true or false, got {flag!r}")
    is_mixture = isinstance(denoiser, GaussianMixtureDenoiser)
    _check_network_batch(network_batch)
    network_batch = None if is_mixture else network_batch  # row-independent float64 maths: no padding needed
    bdia_solver = solver in _solvers.INVERTIBLE_SOLVERS
    keep_x = save_states or is_mixture  # mixture metrics need the float states
    keep_inner = save_states and bdia_solver
    need = {"x_end"} if keep_x else set()
    need |= {"x_inner"} if keep_inner else set()

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
    })
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, settings, resume, ctx, config, device)

    mine = shard(seeds, ctx)
    done = set(seeds_done(out_dir, mine, need, shape))
    todo = [s for s in mine if s not in done]
    if ctx.is_main and done:
        log.info("resuming %s: %d of rank 0's %d seeds already written", out_dir, len(done), len(mine))

    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device)
    net = denoiser if network_batch is None else FixedBatchDenoiser(denoiser, network_batch)
    counter = CountingDenoiser(net)
    nfe_per_batch: list[int] = []
    sampling_seconds = 0.0
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    desc = f"{solver} rank 0/{ctx.world_size}" if ctx.world_size > 1 else solver
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="img",
              disable=not (progress and ctx.is_main)) as bar:
        for batch_seeds in batches:
            rng = StackedRandomGenerator(batch_seeds, device)
            x_init = rng.randn(shape, dtype=torch.float64) * sigmas[0].to(device)
            label_idx, labels = class_labels_for(rng, label_dim, class_idx)
            kwargs = dict(solver_kwargs)
            if solver == "edm":
                kwargs["randn_like"] = rng.randn_like
            counter.reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = _solvers.sample(counter, x_init, sigmas, solver=solver, gamma=gamma, class_labels=labels,
                                      return_pair=keep_inner, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sampling_seconds += time.perf_counter() - t0
            nfe_per_batch.append(counter.nfe)
            x_end, x_inner = (out.x_end, out.x_inner) if keep_inner else (out, None)
            images = quantize(x_end).cpu().numpy()
            x_end = x_end.cpu().numpy() if keep_x else None
            x_inner = x_inner.cpu().numpy() if keep_inner else None
            label_idx = label_idx.cpu().numpy() if label_idx is not None else None
            for i, seed in enumerate(batch_seeds):
                record = {"nfe": np.int64(counter.nfe), "class_label": np.int64(-1 if label_idx is None else label_idx[i])}
                if keep_x:
                    record["x_end"] = x_end[i]
                if keep_inner:
                    record["x_inner"] = x_inner[i]
                _write_image(out_dir, seed, images[i], record)
            bar.update(len(batch_seeds))

    barrier(ctx)
    stats = gather(ctx, {"sampled": len(todo), "seconds": sampling_seconds, "nfe_per_batch": nfe_per_batch})
    if not ctx.is_main:
        barrier(ctx)  # wait for rank 0 to write the shared outputs
        return None
    try:
        assembled = _assemble(out_dir, seeds, shape, label_dim, sigmas, save_states, keep_inner,
                              denoiser if is_mixture else None, grid_nrow, grid_padding, grid_scale)
        sampled = sum(s["sampled"] for s in stats)
        seconds = max(s["seconds"] for s in stats)
        metrics = {
            "solver": solver,
            "gamma": gamma,
            "num_steps": num_steps,
            "solver_options": dict(solver_kwargs),
            "nfe": assembled["nfe"],
            "nfe_per_batch": [n for s in stats for n in s["nfe_per_batch"]],
            "num_images": len(seeds),
            "num_sampled": sampled,
            "num_resumed": len(seeds) - sampled,
            "seeds": format_seeds(seeds),
            "batch_size": batch_size,
            "network_batch": network_batch,
            "world_size": ctx.world_size,
            "image_shape": list(shape),
            "label_dim": label_dim,
            "class_idx": class_idx,
            "sigmas": {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "levels": sigmas.tolist()},
            "device": str(device),
            "model": dict(model_info) if model_info is not None else None,
            "sampling_seconds": round(seconds, 4),
            "images_per_second": round(sampled / seconds, 3) if sampled and seconds > 0 else None,
        }
        if "mixture" in assembled:
            metrics["mixture"] = assembled["mixture"]
        metrics["wall_seconds"] = round(time.perf_counter() - started, 4)
        metrics = _jsonable(metrics)
        _write_json(out_dir / "metrics.json", metrics)  # the last end-of-run file: its presence marks a finished run
        mark_state(out_dir, "sample", "complete")
        log.info(
            "%s: %d images (%d sampled now, %d resumed), NFE %s, %.2f s sampling (%s images/s) -> %s",
            solver, len(seeds), sampled, len(seeds) - sampled, metrics["nfe"], seconds,
            metrics["images_per_second"], out_dir,
        )
    finally:
        barrier(ctx)
    return metrics


def _assemble(out_dir: Path, seeds, shape, label_dim, sigmas, save_states, keep_inner, mixture, grid_nrow, grid_padding,
              grid_scale) -> dict:
    """Rank 0, after every rank finished: ``images.npz`` and ``grid.png`` from the per-seed files (in seed
    order), NFE from the records, mixture metrics from the float states."""
    images = np.empty((len(seeds), *shape), dtype=np.uint8)
    nfe = np.empty(len(seeds), dtype=np.int64)
    labels = np.empty(len(seeds), dtype=np.int64)
    keep_x = save_states or mixture is not None
    x_end = np.empty((len(seeds), *shape), dtype=np.float64) if keep_x else None
    x_inner = np.empty((len(seeds), *shape), dtype=np.float64) if keep_inner else None
    missing = []
    for i, seed in enumerate(seeds):
        name = _seed_name(seed)
        try:
            images[i] = _read_png(out_dir / IMAGES_DIR / f"{name}.png", shape)
            with np.load(out_dir / RECORDS_DIR / f"{name}.npz") as record:
                nfe[i], labels[i] = record["nfe"], record["class_label"]
                if keep_x:
                    x_end[i] = record["x_end"]
                if keep_inner:
                    x_inner[i] = record["x_inner"]
        except (OSError, KeyError, ValueError) as e:
            missing.append(f"{seed} ({type(e).__name__})")
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} image(s) missing or unreadable after sampling: {', '.join(missing[:5])}")

    arrays = {"images": images, "seeds": np.asarray(seeds, dtype=np.int64), "sigmas": sigmas.numpy()}
    if label_dim:
        arrays["class_labels"] = labels
    if save_states:
        arrays["x_end"] = x_end
        if keep_inner:
            arrays["x_inner"] = x_inner
    with atomic_write(out_dir / "images.npz") as f:
        np.savez_compressed(f, **arrays)
    save_image_grid(images, out_dir / "grid.png", nrow=grid_nrow, padding=grid_padding, pad_value=128, scale=grid_scale)
    distinct = sorted(set(nfe.tolist()))
    out = {"nfe": distinct[0] if len(distinct) == 1 else distinct}
    if mixture is not None:
        from .analytic import mixture_metrics

        out["mixture"] = mixture_metrics(mixture, torch.from_numpy(x_end))
    return out
