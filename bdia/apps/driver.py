"""The one sampling driver of the apps: work items into a run folder, resumable and sharded over ranks.

An app (``bdia.apps.sample.sample_run``: one item per seed; ``bdia.apps.text2image.text_to_image``: one per
(prompt, seed)) opens its run folder with :func:`open_run_folder` and, inside it, hands :func:`drive` its items,
their file names and a ``solve`` function that turns a batch of items into images (uint8) and per-item records::

    with open_run_folder(out_dir, app="sample", settings=settings, resume=resume, item_pattern=r"[0-9]{6,}",
                         outputs=ASSEMBLED_OUTPUTS, ctx=ctx, config=config, device=device) as run:
        stats = drive(run, items, names, solve, batch_size=..., image_shape=..., need=..., ctx=ctx)
        return finish(ctx, lambda: write_outputs(run, stats))

The driver owns everything else:

* the run folder (:func:`bdia.runfolder.open_run`: ownership, the lock held for the whole run, settings check,
  ``config.yaml``, ``env.json``) and resume: an item is skipped only when its record and PNG are the ones the
  run wrote (:meth:`bdia.runfolder.RunFolder.item_record`: the record holds the PNG's sha256 and every array
  the app needs, of the right shape and kind);
* sharding: rank ``r`` of ``K`` takes items ``r, r + K, …`` (every item has its own generator in the apps, so
  which rank draws it does not change it);
* batching (``batch_size`` items per ``solve`` call), a progress bar on rank 0, per-item writes (PNG, then the
  record, each atomic), and the statistics every rank gathers: items sampled and resumed, seconds per phase,
  NFE per batch.

:func:`finish` then lets rank 0 write the end-of-run files (assembly, ``metrics.json``) while the other ranks
wait, so the folder is complete when any rank returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..distributed import DistContext, barrier, gather
from ..imageio import png_bytes, read_png
from ..runfolder import IMAGES_DIR, RECORDS_DIR, RunFolder, environment_info, jsonable, open_run

__all__ = ["ASSEMBLED_OUTPUTS", "BatchResult", "DriveStats", "open_run_folder", "drive", "finish", "write_item",
           "read_item", "item_need"]

log = logging.getLogger(__name__)

#: What a run writes from all its images at the end: replaced (atomically) only when a run finishes, removed
#: by ``resume=false`` together with the images, records and run records (:mod:`bdia.runfolder`). An app may
#: add its own files to these.
ASSEMBLED_OUTPUTS = ("images.npz", "grid.png", "metrics.json")


class BatchResult(NamedTuple):
    """What ``solve`` returns for a batch of B items: ``images`` uint8 ``[B, C, H, W]``, one record dict of
    arrays per item (the driver adds ``nfe``, ``png_sha256`` and ``seconds_<phase>``: the batch's seconds for the
    phase over its item count, float64), the batch's measured NFE, and seconds per phase (e.g.
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


def run_records(config: Mapping[str, Any] | None, device, world_size: int) -> dict:
    """The text files a run folder gets when it is claimed: ``config.yaml`` (``config``) and ``env.json``."""
    records = {"env.json": lambda: json.dumps(environment_info(device, world_size), indent=2) + "\n"}
    if config is not None:
        records["config.yaml"] = lambda: OmegaConf.to_yaml(OmegaConf.create(jsonable(dict(config))))
    return records


def open_run_folder(out_dir, *, app: str, settings: Mapping[str, Any], resume: bool, item_pattern: str,
                    outputs: Sequence[str] = ASSEMBLED_OUTPUTS, ctx: DistContext | None = None,
                    config: Mapping[str, Any] | None = None, device=None) -> contextlib.AbstractContextManager:
    """:func:`bdia.runfolder.open_run` for an item app: subfolders ``images/`` and ``records/``; the files it
    writes are ``images/<name>.png`` and ``records/<name>.npz`` for names matching ``item_pattern`` (a regular
    expression), the end-of-run ``outputs``, ``config.yaml`` (from ``config``) and ``env.json``."""
    ctx = ctx or DistContext()
    written = [rf"{IMAGES_DIR}/{item_pattern}\.png", rf"{RECORDS_DIR}/{item_pattern}\.npz",
               *(name.replace(".", r"\.") for name in outputs)]
    return open_run(out_dir, app, settings, resume, written=written, subfolders=(IMAGES_DIR, RECORDS_DIR),
                    records=run_records(config, device, ctx.world_size), ctx=ctx)


def item_need(need: Mapping[str, Any] | Sequence[str] = ()) -> dict:
    """The arrays a record must hold to count as done: ``need`` (name -> ``(shape or None, dtype kinds)``, or
    just names: any shape, any kind) plus the driver's own ``nfe`` (an integer scalar)."""
    if not isinstance(need, Mapping):
        need = {name: (None, "biufcUS") for name in need}
    return {"nfe": ((), "iu"), **dict(need)}


def _record_limit(need: Mapping[str, tuple]) -> int:
    """Bytes a record may take: 1 MiB plus twice the float64 arrays the app keeps per item."""
    arrays = sum(math.prod(shape) for shape, _ in need.values() if shape)
    return 2**20 + 16 * arrays


def write_item(run: RunFolder, name: str, image_chw: np.ndarray, record: Mapping[str, Any]) -> None:
    """One finished item: the PNG, then its record holding the PNG's sha256. Each file appears atomically; the
    record, written last, marks the item as done."""
    png = png_bytes(np.ascontiguousarray(image_chw.transpose(1, 2, 0)))
    run.write_bytes(f"{IMAGES_DIR}/{name}.png", png)
    run.write_npz(f"{RECORDS_DIR}/{name}.npz", {**record, "png_sha256": np.str_(hashlib.sha256(png).hexdigest())})


def read_item(run: RunFolder, name: str, need: Mapping[str, tuple], shape: Sequence[int]) -> tuple[np.ndarray, dict]:
    """A done item's image (uint8 ``[C, H, W]``) and record, verified as :func:`drive` verifies it; a
    ``RuntimeError`` naming the item when it is not done (assembly after every rank finished)."""
    need = item_need(need)
    found = run.item_record(name, need, shape, _record_limit(need))
    if found is None:
        raise RuntimeError(f"{run.path}: item {name} is missing or damaged after sampling")
    png, record = found
    return read_png(io.BytesIO(png), shape), record


def drive(
    run: RunFolder,
    items: Sequence,
    names: Sequence[str],
    solve: Callable[[list], BatchResult],
    *,
    batch_size: int,
    image_shape: Sequence[int],
    need: Mapping[str, tuple] | Sequence[str] = (),
    ctx: DistContext | None = None,
    progress: bool = True,
    desc: str = "",
) -> DriveStats:
    """``solve`` this rank's unfinished items in batches and write each item into the open ``run``.

    ``names[i]`` names item ``i``'s files (``images/<name>.png``, ``records/<name>.npz``); an item counts as
    done when :meth:`~bdia.runfolder.RunFolder.item_record` finds its PNG (of ``image_shape``) and record (the
    arrays of :func:`item_need` ``(need)``) complete and its own. Returns the statistics gathered from every rank
    (on every rank)."""
    ctx = ctx or DistContext()
    need = item_need(need)
    limit = _record_limit(need)
    mine = list(range(ctx.rank, len(items), ctx.world_size))
    seconds: dict = {}
    seconds_all: dict = {}
    nfe_per_batch: list = []
    todo = []
    for i in mine:
        found = run.item_record(names[i], need, image_shape, limit)
        if found is None:
            todo.append(i)
            continue
        record = found[1]
        for key, value in record.items():  # resumed items: their measured seconds, from their records
            if key.startswith("seconds_") and value.shape == () and value.dtype.kind == "f":
                seconds_all[key[len("seconds_"):]] = seconds_all.get(key[len("seconds_"):], 0.0) + float(value)
    if ctx.is_main and len(todo) < len(mine):
        log.info("resuming %s: %d of rank 0's %d items already written", run.path, len(mine) - len(todo), len(mine))
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
                write_item(run, names[i], result.images[j], {"nfe": np.int64(result.nfe), **per_item, **result.records[j]})
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
