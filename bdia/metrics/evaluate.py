"""Evaluate run folders with a set of metrics and merge the numbers into each run's ``metrics.json``.

A *metric* is any callable ``metric(images, run_dir=None) -> dict`` (:class:`bdia.metrics.FID`,
:class:`~bdia.metrics.DigitsFD`, :class:`~bdia.metrics.CLIPScore`, :class:`~bdia.metrics.Reconstruction`,
or your own); ``metrics`` maps names to metrics (what a ``metrics/*.yaml`` config instantiates to).

Results go into ``metrics.json`` under ``"evaluation"``, one entry per metric name, merged with what is
there (other metrics' entries are kept, the same metric's entry is replaced); the file is rewritten
atomically. Under torchrun every rank computes (each on its shard) and rank 0 writes and logs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

from ..distributed import is_main_process
from ..runfolder import atomic_write, jsonable
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
        if not (path / "metrics.json").is_file():
            raise ValueError(f"run_dir={path}: images.npz but no metrics.json — an unfinished sampling run "
                             f"(metrics.json is written last); finish it first")
        return [path]
    candidates = sorted(p.parent for p in path.rglob("images.npz")
                        if not any(part.startswith(".") for part in p.parts[len(path.parts):]))
    runs = [p for p in candidates if (p / "metrics.json").is_file()]
    unfinished = [p for p in candidates if p not in runs]
    if unfinished:
        log.warning("skipping %d unfinished run(s) (images.npz without metrics.json): %s", len(unfinished),
                    ", ".join(str(p) for p in unfinished[:5]))
    if not runs:
        raise ValueError(f"run_dir={path}: no finished run folders (images.npz and metrics.json) in it")
    return runs


def merge_metrics_json(run_dir, results: Mapping[str, Any]) -> dict:
    """Merge ``results`` (metric name -> dict) into ``run_dir/metrics.json["evaluation"]``; atomic rewrite."""
    path = Path(run_dir) / "metrics.json"
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); refusing to overwrite it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
    evaluation = dict(data.get(EVALUATION_KEY) or {})
    evaluation.update(jsonable(dict(results)))
    data[EVALUATION_KEY] = evaluation
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
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
    """Compute every metric on one run folder's images; merge into its ``metrics.json`` (rank 0) if ``write``."""
    run_dir = Path(run_dir)
    source = open_images(run_dir)
    results = {}
    for name, metric in metrics.items():
        started = time.perf_counter()
        values = dict(metric(source, run_dir=run_dir))
        values["seconds"] = round(time.perf_counter() - started, 3)
        results[name] = values
    if write and is_main_process():
        merge_metrics_json(run_dir, results)
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
