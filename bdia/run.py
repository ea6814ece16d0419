"""A sampling run as plain functions: seeds, per-image noise, quantisation, image grids, run outputs.

``scripts/sample.py`` is a thin Hydra shell around :func:`sample_run`; tests call these functions directly.

Conventions (EDM's ``generate.py``, ``shared/DESIGN.md`` section 4):

* seeds are a list or a range spec (``"0-63"``, ``"0,5,7-9"``); image k's noise comes from its own
  ``torch.Generator`` seeded with k, so an image does not depend on the batch size or on the other seeds;
* images are quantised as ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` and saved as PNG;
* every run folder holds ``metrics.json`` (NFE measured, not assumed), ``env.json`` and the resolved config.

Files are written atomically (to a temporary name, then ``os.replace``); ``images/`` is replaced as a whole
at the end of a run, so a folder never mixes images from two runs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import solvers as _solvers
from .denoisers import CountingDenoiser, GaussianMixtureDenoiser
from .schedules import karras_sigmas

__all__ = [
    "parse_seeds",
    "format_seeds",
    "StackedRandomGenerator",
    "seed_noise",
    "quantize",
    "image_grid",
    "save_image_grid",
    "atomic_write",
    "environment_info",
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


def seed_noise(seeds: Sequence[int], shape, sigma_max, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """The initial states ``sigma_max * n_k`` (``[len(seeds), *shape]``), ``n_k`` drawn by a generator seeded
    with ``seeds[k]`` alone. ``shape`` is one image's shape, e.g. ``(1, 16, 16)``."""
    noise = StackedRandomGenerator(parse_seeds(list(seeds)), device).randn(shape, dtype=dtype)
    return noise * torch.as_tensor(sigma_max, dtype=dtype, device=noise.device)


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


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success ``os.replace`` it onto ``path``, on
    failure remove it. Readers see the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move the finished ``tmp_dir`` onto ``final_dir``, removing what was there before."""
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def _package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("bdia")
    except metadata.PackageNotFoundError:
        return None


def environment_info(device=None) -> dict:
    """What produced a run: git commit (and whether the tree had uncommitted changes), versions, device."""
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
    for name in ("hydra", "omegaconf", "sklearn", "PIL"):
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
    }
    return info


# --------------------------------------------------------------------------------------------------
# A sampling run.

#: Arguments of the solver functions that ``sample_run`` supplies itself (everything else is a solver option).
_SUPPLIED = {"denoiser", "x", "x_init", "sigmas", "gamma", "class_labels", "cond", "progress", "randn_like"}


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
    if solver in _solvers.INVERTIBLE_SOLVERS:
        _solvers.gamma_schedule(1.0 if gamma is None else gamma, sigmas, solver)  # raises on bad gamma
    elif gamma is not None and not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma == 0):
        raise ValueError(f"gamma applies to the BDIA solvers only; {solver!r} is gamma = 0 (use bdia_{solver})")


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here; use device=cpu")
    return device


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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
    grid_nrow: int | None = None,
    grid_scale: int = 1,
    grid_padding: int = 0,
    save_images: bool = True,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    **solver_kwargs,
) -> dict:
    """Sample one image per seed with ``solver`` on EDM's Karras grid and write the run folder ``out_dir``:

    * ``images/<seed:06d>.png`` (if ``save_images``) and ``images.npz`` (``images``: uint8 ``[N, C, H, W]``,
      ``seeds``: int64 ``[N]``);
    * ``grid.png``: all images tiled, ``grid_nrow`` per row, enlarged ``grid_scale`` times;
    * ``metrics.json``: solver settings, NFE counted per batch by :class:`bdia.CountingDenoiser`, image
      count, wall time, images/s, and for Gaussian-mixture models :func:`bdia.analytic.mixture_metrics`;
    * ``env.json`` (:func:`environment_info`) and ``config.yaml`` (``config``, e.g. Hydra's resolved config).

    ``gamma`` and ``solver_kwargs`` (``backward`` for bdia_edm; ``s_churn``, ``s_min``, ``s_max``, ``s_noise``
    for edm) go to :func:`bdia.sample`; EDM's churn noise comes from the per-image generators. The grid is
    ``karras_sigmas(num_steps, sigma_min, sigma_max, rho)`` with ``sigma_min``/``sigma_max`` clipped to the
    denoiser's range, as EDM's sampler does. ``image_shape`` defaults to ``denoiser.event_shape``.
    Inputs are checked before any sampling; mistakes raise ``ValueError``. Returns the metrics dict.
    """
    started = time.perf_counter()
    seeds = parse_seeds(seeds)
    device = _device(device)
    sigma_min = max(float(sigma_min), float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(float(sigma_max), float(getattr(denoiser, "sigma_max", math.inf)))
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=getattr(denoiser, "round_sigma", None))
    _validate(solver, gamma, batch_size, solver_kwargs, sigmas)
    shape = tuple(int(s) for s in (image_shape if image_shape is not None else getattr(denoiser, "event_shape", ())))
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be [C, H, W] with C = 1 or 3 (pass image_shape=...), got {list(shape)}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images_tmp = out_dir / f".images.tmp-{os.getpid()}"
    if save_images:
        images_tmp.mkdir()
    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device)
    counter = CountingDenoiser(denoiser)
    keep_states = isinstance(denoiser, GaussianMixtureDenoiser)

    all_images, states, nfe_per_batch = [], [], []
    sampling_seconds = 0.0
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    try:
        for batch_seeds in tqdm(batches, desc=f"{solver} ({len(seeds)} images)", unit="batch", disable=not progress):
            rng = StackedRandomGenerator(batch_seeds, device)
            x_init = rng.randn(shape, dtype=torch.float64) * sigmas[0].to(device)
            kwargs = dict(solver_kwargs)
            if solver == "edm":
                kwargs["randn_like"] = rng.randn_like
            counter.reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                x = _solvers.sample(counter, x_init, sigmas, solver=solver, gamma=gamma, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sampling_seconds += time.perf_counter() - t0
            nfe_per_batch.append(counter.nfe)
            images = quantize(x).cpu()
            all_images.append(images)
            if keep_states:
                states.append(x.cpu())
            if save_images:
                for seed, image in zip(batch_seeds, images.numpy()):
                    (images_tmp / f"{seed:06d}.png").write_bytes(_png_bytes(image.transpose(1, 2, 0)))
        if save_images:
            _replace_dir(images_tmp, out_dir / "images")
    finally:
        if images_tmp.exists():
            shutil.rmtree(images_tmp)

    images = torch.cat(all_images).numpy()
    with atomic_write(out_dir / "images.npz") as f:
        np.savez_compressed(f, images=images, seeds=np.asarray(seeds, dtype=np.int64))
    save_image_grid(images, out_dir / "grid.png", nrow=grid_nrow, padding=grid_padding, pad_value=128, scale=grid_scale)

    num_images = len(seeds)
    metrics = {
        "solver": solver,
        "gamma": gamma,
        "num_steps": num_steps,
        "solver_options": dict(solver_kwargs),
        "nfe": nfe_per_batch[0] if len(set(nfe_per_batch)) == 1 else nfe_per_batch,
        "nfe_per_batch": nfe_per_batch,
        "num_images": num_images,
        "seeds": format_seeds(seeds),
        "batch_size": batch_size,
        "image_shape": list(shape),
        "sigmas": {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "levels": sigmas.tolist()},
        "device": str(device),
        "sampling_seconds": round(sampling_seconds, 4),
        "images_per_second": round(num_images / sampling_seconds, 3) if sampling_seconds > 0 else None,
    }
    if keep_states:
        from .analytic import mixture_metrics

        metrics["mixture"] = mixture_metrics(denoiser, torch.cat(states))
    if config is not None:
        from omegaconf import OmegaConf

        with atomic_write(out_dir / "config.yaml", "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(_jsonable(dict(config)))))
    _write_json(out_dir / "env.json", environment_info(device))
    metrics["wall_seconds"] = round(time.perf_counter() - started, 4)
    metrics = _jsonable(metrics)
    _write_json(out_dir / "metrics.json", metrics)  # written last: its presence marks a finished run
    log.info(
        "%s: %d images, NFE %s, %.2f s sampling (%.1f images/s) -> %s",
        solver, num_images, metrics["nfe"], sampling_seconds, metrics["images_per_second"] or 0.0, out_dir,
    )
    return metrics
