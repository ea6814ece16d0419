"""Invert a sampling run's records back to the noise they came from, and regenerate them: BDIA's exactness on
a finished run, with the run's own settings.

A run sampled with ``save_states=true`` and a BDIA solver keeps each image's last two float64 states
(``records/<seed>.npz``: ``x_end``, ``x_inner``). :func:`invert_run_records` rebuilds the run's denoiser exactly
as sampling ran it -- the model from ``config.yaml``, the network precision of ``settings.json`` and, what
exactness needs, the same **network batch**: float32 kernels round differently for other batch shapes, so a
record inverted with the network called on other row counts than sampling used misses its noise by far more
than round-off (the embedded digits model, ``bdia_ddim`` gamma 1, 18 steps, 16 images sampled with
``network_batch=16``: noise recovered to 3e-12 absolute with the run's batch, 1.9e-3 with one row per call).
It then inverts every pair, compares the recovered state at ``sigmas[0]`` with the seed's own noise
(:class:`bdia.imageio.StackedRandomGenerator`), regenerates the pair from it and compares that with the record.

``python scripts/evaluate.py <run folder> metrics=inversion`` (configs/image_metrics/metrics/inversion.yaml) runs
it on a finished run and merges the numbers into its ``metrics.json`` under ``evaluation.inversion``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import solvers as _solvers
from ..denoisers import FixedBatchDenoiser
from ..distributed import current, gather, shard_indices
from ..imageio import StackedRandomGenerator, parse_seeds, quantize, read_png
from ..models import load_model
from ..runfolder import MAX_JSON_BYTES, read_npz
from ..speed import with_speed

__all__ = ["invert_run_records", "RecordInversion"]

#: A record holds one image's states; larger files are not records a run wrote.
MAX_RECORD_BYTES = 256 * 2**20


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a finished sampling run folder)")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB; not a file this project wrote")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _run_model(run_dir: Path):
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no config.yaml to rebuild the model from (a run made through the Python API: "
                         f"pass the denoiser, invert_run_records(run_dir, denoiser=...))")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return load_model((config or {}).get("model"))


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: ``max |a - b| / max |b|``."""
    dims = tuple(range(1, a.ndim))
    return (a - b).abs().amax(dim=dims) / b.abs().amax(dim=dims)


def invert_run_records(run_dir, seeds=None, denoiser=None, device=None, network_batch="run", batch_size: int = 64,
                       return_states: bool = False) -> dict:
    """Invert the records of the sampling run ``run_dir`` and regenerate them (see the module notes).

    Args:
        seeds: which of the run's seeds (a spec or list; default every seed of the run).
        denoiser: the run's denoiser; default the ``model`` of the run's ``config.yaml`` (loaded as sampling
            loaded it), with the precision of ``settings.json``.
        device: default the run's device type (``settings.json``).
        network_batch: ``"run"`` (default): the rows per network call the run sampled with, so the inversion
            is exact; a number or ``None`` (whole batch) to see what another choice does.
        batch_size: images per solver call (the result does not depend on it under a fixed network batch).
        return_states: also return the recovered noise pairs and regenerated pairs (float64, CPU).

    Returns per-run numbers: ``noise_relative_error`` / ``noise_max_abs_error`` (recovered state at
    ``sigmas[0]`` against the seed's noise, worst image), ``pair_relative_error`` (regenerated ``(x_end,
    x_inner)`` against the record, worst image), ``images_identical`` (regenerated images equal to the PNGs),
    ``num_images``, and the settings used. Raises ``ValueError`` for a run that cannot be inverted (not a BDIA
    solver, no saved states, missing files).
    """
    run_dir = Path(run_dir)
    settings = _read_json(run_dir / "settings.json")
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(settings, dict) or "solver" not in settings or "sigmas" not in settings:
        raise ValueError(f"{run_dir}: settings.json is not a sampling run's (scripts/sample.py)")
    solver = settings["solver"]
    if solver not in _solvers.INVERTIBLE_SOLVERS:
        raise ValueError(f"{run_dir}: sampled with {solver!r}, which has no exact inverse (invertible: "
                         f"{', '.join(_solvers.INVERTIBLE_SOLVERS)})")
    run_seeds = parse_seeds(metrics.get("seeds"))
    seeds = run_seeds if seeds is None else parse_seeds(seeds)
    missing = sorted(set(seeds) - set(run_seeds))
    if missing:
        raise ValueError(f"{run_dir}: seeds {missing[:5]} are not in the run (seeds {metrics.get('seeds')})")
    shape = tuple(settings["image_shape"])
    sigmas = torch.tensor(settings["sigmas"], dtype=torch.float64)
    options = dict(settings.get("solver_options") or {})
    gamma = settings.get("gamma")
    label_dim = int(settings.get("label_dim") or 0)
    if network_batch == "run":
        network_batch = settings.get("network_batch")
    device = torch.device(device or settings.get("device_type") or "cpu")
    if denoiser is None:
        denoiser = _run_model(run_dir)
    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device)
    net = with_speed(denoiser, **(settings.get("speed") or {}))
    net = net if network_batch is None else FixedBatchDenoiser(net, int(network_batch))

    ctx = current()
    mine = [seeds[i] for i in shard_indices(len(seeds), ctx)]
    rows: list[tuple] = []
    states: dict = {}
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        records = [read_npz(run_dir / "records" / f"{seed:06d}.npz", MAX_RECORD_BYTES, f"record of seed {seed}")
                   for seed in chunk]
        if any("x_end" not in r or "x_inner" not in r for r in records):
            raise ValueError(f"{run_dir}: the records hold no states (x_end, x_inner); sample with save_states=true")
        pair = _solvers.StatePair(torch.from_numpy(np.stack([r["x_end"] for r in records])).to(device),
                                  torch.from_numpy(np.stack([r["x_inner"] for r in records])).to(device))
        labels = None
        if label_dim:
            index = torch.as_tensor(np.stack([r["class_label"] for r in records]), device=device).long()
            labels = torch.eye(label_dim, device=device)[index]
        noise = StackedRandomGenerator(chunk, device).randn(shape, dtype=torch.float64) * sigmas[0].to(device)
        with torch.no_grad():
            noise_pair = _solvers.invert(net, pair, sigmas, solver=solver, gamma=gamma, class_labels=labels, **options)
            again = _solvers.sample(net, noise_pair, sigmas, solver=solver, gamma=gamma, class_labels=labels,
                                    return_pair=True, **options)
        images = quantize(again.x_end).cpu().numpy()
        for i, seed in enumerate(chunk):
            png = read_png(run_dir / "images" / f"{seed:06d}.png", shape)
            rows.append((seed,
                         float(_relative(noise_pair.x_end[i:i + 1], noise[i:i + 1])),
                         float((noise_pair.x_end[i] - noise[i]).abs().max()),
                         max(float(_relative(again.x_end[i:i + 1], pair.x_end[i:i + 1])),
                             float(_relative(again.x_inner[i:i + 1], pair.x_inner[i:i + 1]))),
                         bool(np.array_equal(images[i], png))))
        if return_states:
            for i, seed in enumerate(chunk):
                states[seed] = {"noise_pair": (noise_pair.x_end[i].cpu(), noise_pair.x_inner[i].cpu()),
                                "regenerated_pair": (again.x_end[i].cpu(), again.x_inner[i].cpu())}
    rows = sorted(row for part in gather(ctx, rows) for row in part)
    worst = lambda column: max((row[column] for row in rows), default=math.nan)  # noqa: E731
    out = {
        "label": "BDIA round trip of the run's records (noise recovered from the saved pair, then the pair regenerated)",
        "num_images": len(rows),
        "solver": solver,
        "gamma": gamma,
        "num_steps": len(sigmas) - 1,
        "network_batch": network_batch,
        "run_network_batch": settings.get("network_batch"),
        "noise_relative_error": worst(1),
        "noise_max_abs_error": worst(2),
        "pair_relative_error": worst(3),
        "images_identical": sum(row[4] for row in rows),
    }
    if return_states:
        for part in gather(ctx, states):
            states.update(part)
        out["states"] = states
    return out


class RecordInversion:
    """``metrics=inversion``: :func:`invert_run_records` on a run folder (the evaluate protocol
    ``metric(images, run_dir=...) -> dict``). ``seeds``: a subset (default all); ``network_batch``: ``run``
    (the run's, exact) or a number to compare."""

    def __init__(self, seeds: Sequence[int] | str | None = None, network_batch: int | str | None = "run",
                 batch_size: int = 64, device: str | None = None):
        self.seeds, self.network_batch, self.batch_size, self.device = seeds, network_batch, int(batch_size), device

    def __call__(self, images, run_dir=None) -> Mapping[str, Any]:
        if run_dir is None:
            raise ValueError("metrics.inversion needs a sampling run folder (its records and settings)")
        return invert_run_records(run_dir, self.seeds, device=self.device, network_batch=self.network_batch,
                                  batch_size=self.batch_size)
