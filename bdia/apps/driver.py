"""The one sampling driver of the apps: work items into a run folder, resumable and sharded over ranks.

An app (``bdia.apps.sample.sample_run``: one item per seed; ``bdia.apps.text2image.text_to_image``: one per (prompt, seed))
hands :func:`drive` its items, their file names and a ``solve`` function that turns a batch of items into
images (uint8) and per-item records. The driver owns everything else:

* the run folder (:func:`bdia.runfolder.prepare_run_folder`: ownership, settings check, ``config.yaml``,
  ``env.json``) and resume (items whose PNG and record are complete are skipped);
* sharding: rank ``r`` of ``K`` takes items ``r, r + K, …`` (every item has its own generator in the apps, so
  which rank draws it does not change it);
* batching (``batch_size`` items per ``solve`` call), a progress bar on rank 0, per-item writes (PNG, then the
  record, each atomic), and the statistics every rank gathers: items sampled, seconds per phase, NFE per batch.

:func:`finish` then lets rank 0 write the end-of-run files (assembly, ``metrics.json``) while the other ranks
wait, so the folder is complete when any rank returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..distributed import DistContext, barrier, gather
from ..imageio import png_bytes
from ..runfolder import (
    IMAGES_DIR,
    RECORDS_DIR,
    atomic_write,
    environment_info,
    image_complete,
    jsonable,
    prepare_run_folder,
)

__all__ = ["ASSEMBLED_OUTPUTS", "BatchResult", "DriveStats", "drive", "finish", "write_item"]

log = logging.getLogger(__name__)

#: What a run writes from all its images at the end: replaced (atomically) only when a run finishes, removed
#: by ``resume=false`` together with the images, records and run records (:mod:`bdia.runfolder`). An app may
#: add its own files to these.
ASSEMBLED_OUTPUTS = ("images.npz", "grid.png", "metrics.json")


class BatchResult(NamedTuple):
    """What ``solve`` returns for a batch of B items: ``images`` uint8 ``[B, C, H, W]``, one record dict of
    arrays per item (the driver adds ``nfe`` and ``seconds_<phase>``: the batch's seconds for the phase over its
    item count, float64), the batch's measured NFE, and seconds per phase (e.g.
    ``{"sampling": 1.2, "decode": 0.3}``)."""

    images: np.ndarray
    records: list
    nfe: int
    seconds: dict


class DriveStats(NamedTuple):
    """Over all ranks: items sampled now, seconds per phase spent now (the slowest rank's), NFE of every batch
    sampled now; ``seconds_all``: per phase, the seconds of **every** item of the run summed (items sampled now
    and items resumed, each from its record's ``seconds_<phase>``), and ``resumed``: the items found complete."""

    sampled: int
    seconds: dict
    nfe_per_batch: list
    seconds_all: dict = {}
    resumed: int = 0


def write_item(out_dir: Path, name: str, image_chw: np.ndarray, record: Mapping[str, Any]) -> None:
    """One finished item: the PNG, then its record. Each file appears atomically; the record, written last,
    marks the item as done."""
    with atomic_write(out_dir / IMAGES_DIR / f"{name}.png") as f:
        f.write(png_bytes(image_chw.transpose(1, 2, 0)))
    with atomic_write(out_dir / RECORDS_DIR / f"{name}.npz") as f:
        np.savez(f, **record)


def run_records(config: Mapping[str, Any] | None, device, world_size: int) -> dict:
    """The text files a run folder gets when it is prepared: ``config.yaml`` (``config``) and ``env.json``."""
    records = {"env.json": lambda: json.dumps(environment_info(device, world_size), indent=2) + "\n"}
    if config is not None:
        records["config.yaml"] = lambda: OmegaConf.to_yaml(OmegaConf.create(jsonable(dict(config))))
    return records


def drive(
    items: Sequence,
    names: Sequence[str],
    solve: Callable[[list], BatchResult],
    out_dir,
    *,
    app: str,
    settings: Mapping[str, Any],
    resume: bool,
    batch_size: int,
    image_shape: Sequence[int],
    need: set = frozenset(),
    ctx: DistContext | None = None,
    config: Mapping[str, Any] | None = None,
    device=None,
    assembled: Sequence[str] = (),
    progress: bool = True,
    desc: str = "",
) -> DriveStats:
    """Prepare ``out_dir``, then ``solve`` this rank's unfinished items in batches and write each item.

    ``names[i]`` names item ``i``'s files (``images/<name>.png``, ``records/<name>.npz``); an item counts as
    done when they are complete (PNG of ``image_shape``, record holding ``nfe`` and the arrays in ``need``).
    Returns the statistics gathered from every rank (on every rank)."""
    ctx = ctx or DistContext()
    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, settings, resume, app, is_main=ctx.is_main, barrier=lambda: barrier(ctx),
                       assembled=assembled, records=run_records(config, device, ctx.world_size))
    mine = list(range(ctx.rank, len(items), ctx.world_size))
    need = set(need) | {"nfe"}  # (seconds_<phase>: summed when present)
    todo = [i for i in mine if not image_complete(out_dir, names[i], need, image_shape)]
    if ctx.is_main and len(todo) < len(mine):
        log.info("resuming %s: %d of rank 0's %d items already written", out_dir, len(mine) - len(todo), len(mine))
    seconds: dict = {}
    seconds_all: dict = {}
    nfe_per_batch: list = []
    for i in sorted(set(mine) - set(todo)):  # resumed items: their measured seconds, from their records
        for phase, value in _recorded_seconds(out_dir, names[i]).items():
            seconds_all[phase] = seconds_all.get(phase, 0.0) + value
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="img", dynamic_ncols=True,
              disable=not (progress and ctx.is_main)) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            result = solve([items[i] for i in batch])
            nfe_per_batch.append(int(result.nfe))
            per_item = {}
            for phase, value in result.seconds.items():
                seconds[phase] = seconds.get(phase, 0.0) + float(value)
                seconds_all[phase] = seconds_all.get(phase, 0.0) + float(value)
                per_item[f"seconds_{phase}"] = np.float64(float(value) / len(batch))
            for j, i in enumerate(batch):
                write_item(out_dir, names[i], result.images[j],
                           {"nfe": np.int64(result.nfe), **per_item, **result.records[j]})
            bar.update(len(batch))
    barrier(ctx)
    stats = gather(ctx, {"sampled": len(todo), "resumed": len(mine) - len(todo), "seconds": seconds,
                         "seconds_all": seconds_all, "nfe_per_batch": nfe_per_batch})
    phases = sorted({phase for s in stats for phase in s["seconds"]})
    phases_all = sorted({phase for s in stats for phase in s["seconds_all"]})
    return DriveStats(
        sampled=sum(s["sampled"] for s in stats),
        seconds={phase: max(s["seconds"].get(phase, 0.0) for s in stats) for phase in phases},
        nfe_per_batch=[n for s in stats for n in s["nfe_per_batch"]],
        seconds_all={phase: sum(s["seconds_all"].get(phase, 0.0) for s in stats) for phase in phases_all},
        resumed=sum(s["resumed"] for s in stats),
    )


def _recorded_seconds(out_dir: Path, name: str) -> dict:
    """``{phase: seconds}`` from an item's record (its ``seconds_<phase>`` scalars)."""
    with np.load(out_dir / RECORDS_DIR / f"{name}.npz", allow_pickle=False) as record:
        return {key[len("seconds_"):]: float(record[key]) for key in record.files
                if key.startswith("seconds_") and record[key].shape == ()}


def finish(ctx: DistContext | None, write_outputs: Callable[[], Any]) -> Any:
    """Rank 0 runs ``write_outputs()`` (assembly, ``metrics.json``) and returns its result; the other ranks
    wait for it and return ``None``."""
    ctx = ctx or DistContext()
    if not ctx.is_main:
        barrier(ctx)
        return None
    try:
        return write_outputs()
    finally:
        barrier(ctx)
