"""Evaluate run folders with a set of metrics and merge the numbers into each run's ``metrics.json``.

A *metric* is any callable ``metric(images, run_dir=None) -> dict`` (:class:`bdia.metrics.FID`,
:class:`~bdia.metrics.DigitsFD`, :class:`~bdia.metrics.CLIPScore`, :class:`~bdia.metrics.Reconstruction`,
or your own); ``metrics`` maps names to metrics (what a ``metrics/*.yaml`` config instantiates to).

Results go into ``metrics.json`` under ``"evaluation"``, one entry per metric name, merged with what is
there (other metrics' entries are kept, the same metric's entry is replaced); the file is rewritten
atomically, through the run folder (:func:`bdia.runfolder.open_finished_run`): only into a finished bdia run
folder (its marker says ``complete``), with its lock held from reading the images to writing the file, so a
run that is sampling there (or another evaluation) is refused in one line. Under torchrun every rank computes
(each on its shard) and rank 0 writes and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..distributed import current, gather, is_main_process
from ..runfolder import MARKER_FILE, MAX_JSON_BYTES, RunFolder, RunFolderError, jsonable, open_finished_run
from .images import open_images

__all__ = ["find_runs", "evaluate_run", "evaluate_runs", "merge_metrics_json", "flatten_numbers"]

EVALUATION_KEY = "evaluation"
log = logging.getLogger(__name__)


def find_runs(path) -> list[Path]:
    """``path`` itself if it is a run folder (holds ``images.npz``), else every folder below it that holds
    ``images.npz`` (a sweep), sorted.

    Only finished runs count: ``bdia.apps.sample.sample_run`` writes ``metrics.json`` last, so a folder with
    ``images.npz`` but no ``metrics.json`` is unfinished — an error for a single run, skipped (with a warning)
    in a sweep, so that evaluating never creates the marker of a finished run. Raises ``ValueError`` if there
    is no finished run."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"run_dir={path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"run_dir={path}: not a directory")
    if (path / "images.npz").is_file():
        if not _finished(path):
            raise ValueError(f"run_dir={path}: an unfinished sampling run (no metrics.json yet, or its marker says "
                             f"it is still running); finish it first")
        return [path]
    candidates = sorted(p.parent for p in path.rglob("images.npz")
                        if not any(part.startswith(".") for part in p.parts[len(path.parts):]))
    runs = [p for p in candidates if _finished(p)]
    unfinished = [p for p in candidates if p not in runs]
    if unfinished:
        log.warning("skipping %d unfinished run(s) (no metrics.json yet, or still running): %s", len(unfinished),
                    ", ".join(str(p) for p in unfinished[:5]))
    if not runs:
        raise ValueError(f"run_dir={path}: no finished run folders (images.npz and metrics.json) in it")
    return runs


def _finished(folder: Path) -> bool:
    """A run folder whose ``metrics.json`` is there and whose marker (when it has one) says ``complete``."""
    if not (folder / "metrics.json").is_file():
        return False
    if not os.path.lexists(folder / MARKER_FILE):
        return True  # no marker: readable (evaluating it writes nothing there: open_finished_run refuses)
    with RunFolder.for_reading(folder) as run:
        return run.state() == "complete"


def _read_metrics(run: RunFolder) -> dict:
    """The run's ``metrics.json`` as a dict (``{}`` when there is none); anything else is refused, naming it."""
    path = run.path / "metrics.json"
    if not run.is_regular_file("metrics.json"):
        if (run.path / "metrics.json").is_symlink() or (run.path / "metrics.json").exists():
            raise ValueError(f"{path}: not a regular file (a link or a folder); refusing to write over it")
        return {}
    raw = run.read_bytes("metrics.json", MAX_JSON_BYTES)
    if raw is None:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB or unreadable; refusing to overwrite it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text (byte {e.start} is not UTF-8); refusing to overwrite it") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e)[:120]}); refusing to overwrite it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}; refusing to overwrite it")
    if not isinstance(data.get(EVALUATION_KEY, {}), (dict, type(None))):
        raise ValueError(f"{path}: its {EVALUATION_KEY!r} entry is a {type(data[EVALUATION_KEY]).__name__}, not an "
                         f"object; refusing to overwrite it")
    return data


def merge_metrics_json(run_dir, results: Mapping[str, Any]) -> dict:
    """Merge ``results`` (metric name -> dict) into ``metrics.json["evaluation"]`` of the finished run folder
    ``run_dir`` (a path, opened with its lock, or an open :class:`bdia.runfolder.RunFolder`); atomic rewrite."""
    if not isinstance(run_dir, RunFolder):
        with open_finished_run(run_dir) as run:
            return merge_metrics_json(run, results)
    data = _read_metrics(run_dir)
    evaluation = dict(data.get(EVALUATION_KEY) or {})
    evaluation.update(jsonable(dict(results)))
    data[EVALUATION_KEY] = evaluation
    run_dir.write_json("metrics.json", data)
    return data


def flatten_numbers(results: Mapping[str, Any], prefix: str = EVALUATION_KEY) -> dict[str, float]:
    """Numeric leaves of nested dicts as ``{"evaluation/<metric>/<key>": value}`` (lists and strings skipped)."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, name))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)) and math.isfinite(value):
            flat[name] = value
    return flat


def evaluate_run(run_dir, metrics: Mapping[str, Any], write: bool = True) -> dict:
    """Compute every metric on one run folder's images; merge into its ``metrics.json`` (rank 0) if ``write``,
    holding the run folder's lock from reading the images to writing (module notes). Under torchrun rank 0
    takes the lock first and every rank learns whether it could (a refusal is raised on every rank, so no rank
    waits in a collective for one that stopped)."""
    run_dir = Path(run_dir)
    ctx = current()
    with contextlib.ExitStack() as stack:
        run, error = None, None
        if write and ctx.is_main:
            try:
                run = stack.enter_context(open_finished_run(run_dir))
                _read_metrics(run)  # a metrics.json that cannot be merged into is refused before any computing
            except ValueError as e:  # RunFolderError too
                error = e
        if write and ctx.enabled:
            shared = gather(ctx, None if error is None else (type(error).__name__, str(error)))[0]
            if shared is not None and error is None:
                error = RunFolderError(shared[1]) if shared[0] == "RunFolderError" else ValueError(shared[1])
        if error is not None:
            raise error
        source = open_images(run_dir)
        results = {}
        for name, metric in metrics.items():
            started = time.perf_counter()
            values = dict(metric(source, run_dir=run_dir))
            values["seconds"] = round(time.perf_counter() - started, 3)
            results[name] = values
        if run is not None:
            merge_metrics_json(run, results)
    return results


def evaluate_runs(path, metrics: Mapping[str, Any], logger=None, config=None, name: str | None = None,
                  group: str | None = None, write: bool = True) -> dict[str, dict]:
    """Evaluate the run folder ``path`` or every run folder below it (:func:`find_runs`).

    ``logger`` follows the project's logger contract: ``start(config, run_dir, name, group)``,
    ``log_metrics(dict)``, ``finish()`` — one logged run per evaluated folder (rank 0 only); ``name``
    defaults to the folder name, ``group`` to the sweep folder's name for sweeps.
    """
    runs = find_runs(path)
    root = Path(path).expanduser()
    sweep = len(runs) > 1 or runs[0] != root
    out = {}
    for run_dir in runs:
        results = evaluate_run(run_dir, metrics, write=write)
        out[str(run_dir)] = results
        if logger is not None and is_main_process():
            run_name = name if (name and not sweep) else (f"{name}/{run_dir.name}" if name else run_dir.name)
            logger.start(config, str(run_dir), run_name, group if group is not None else (root.name if sweep else None))
            try:
                logger.log_metrics(flatten_numbers(results))
            finally:
                logger.finish()
    return out
