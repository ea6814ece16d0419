"""Run folders: what a sampling app may write where, how a rerun resumes, and when an image counts as done.

A run folder is created by a run and recognised by its marker file :data:`MARKER_FILE` (``.bdia-run.json``,
written first, naming the app). The rules, enforced by :func:`prepare_run_folder` before anything is written:

* a run writes only into a folder that does not exist yet, an **empty** folder, or its **own** run folder
  (marker of the same app; folders written before the marker existed are recognised by their
  ``settings.json``). Anything else — a folder holding other files, a file, a folder of another app — is
  refused with one line, and nothing in it is touched;
* ``settings.json`` records what determines the images. A rerun (``resume=True``) continues only when it
  reads back equal to the new settings; other settings are refused, and so is an unreadable
  ``settings.json`` (the images' settings are unknown, so they are never kept). ``resume=False`` replaces the
  run: the files the run wrote (never anything else) are removed first;
* an image counts as done only when its PNG decodes completely to the run's image shape and every array
  of its record reads back (CRC-checked); anything else is sampled again (:func:`image_complete`);
* files appear atomically (:func:`atomic_write`: a temporary name, then ``os.replace``), so readers see an
  old file or a complete new one. End-of-run files (``images.npz``, ``grid.png``, ``metrics.json``) of an
  earlier run stay in place, still describing the images they were built from, until the new ones are built
  and replace them; the marker's ``state`` says ``"sampling"`` until then and ``"complete"`` after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "IMAGES_DIR",
    "RECORDS_DIR",
    "SETTINGS_FILE",
    "MARKER_FILE",
    "RunFolderError",
    "atomic_write",
    "write_json",
    "check_out_dir",
    "claim_run_folder",
    "mark_state",
    "prepare_run_folder",
    "image_complete",
    "settings_mismatch",
    "environment_info",
]

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
RECORDS_DIR = "records"
SETTINGS_FILE = "settings.json"
MARKER_FILE = ".bdia-run.json"
#: What a run writes at its start besides the per-image folders (removed by ``resume=False``).
RUN_RECORDS = (SETTINGS_FILE, "config.yaml", "env.json")


class RunFolderError(ValueError):
    """An ``out_dir`` the run may not use (one line, naming the folder and what to do)."""


# --------------------------------------------------------------------------------------------------
# Atomic files.


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


def write_json(path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# Whose folder is it?


def _read_json(path: Path):
    """The JSON in ``path`` (a regular file of at most 16 MiB), or ``None`` when missing or unreadable."""
    try:
        if not path.is_file() or path.stat().st_size > 16 * 2**20:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _owner(out_dir: Path) -> str | None:
    """The app whose run folder ``out_dir`` is (``"legacy"`` for one written before the marker), or ``None``."""
    marker = out_dir / MARKER_FILE
    if marker.exists() or marker.is_symlink():
        data = _read_json(marker)
        return str(data.get("app")) if isinstance(data, dict) and data.get("app") else "unknown"
    settings = _read_json(out_dir / SETTINGS_FILE)
    if isinstance(settings, dict) and "solver" in settings and (out_dir / IMAGES_DIR).is_dir():
        return "legacy"
    return None


def _listing(out_dir: Path, limit: int = 3) -> str:
    names = []
    with os.scandir(out_dir) as entries:
        for entry in entries:
            names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            if len(names) > limit:
                break
    shown = ", ".join(repr(n) for n in sorted(names)[:limit])
    return shown + (", ..." if len(names) > limit else "")


def check_out_dir(out_dir, app: str) -> bool:
    """Check that ``app`` may write into ``out_dir`` (read-only; see the module notes). Returns whether it
    already is this app's run folder; raises :class:`RunFolderError` otherwise when it may not be used."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise RunFolderError(f"out_dir {out_dir} is a dangling symbolic link; choose another out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"out_dir {out_dir} is a file, not a folder; choose another out_dir")
    if not out_dir.exists():
        parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise RunFolderError(f"out_dir {out_dir}: {parent} is a file, not a folder; choose another out_dir")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"out_dir {out_dir} cannot be created: {parent} is not writable")
        return False
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunFolderError(f"out_dir {out_dir} is not writable; choose another out_dir")
    owner = _owner(out_dir)
    if owner is None:
        if not _has_files(out_dir):
            return False
        raise RunFolderError(
            f"out_dir {out_dir} exists and is not a bdia run folder (it holds {_listing(out_dir)}); "
            f"nothing was changed; choose a new or empty folder"
        )
    if owner not in (app, "legacy"):
        raise RunFolderError(f"out_dir {out_dir} is a run folder of the {owner!r} app, not of {app!r}; "
                             f"choose another out_dir")
    return True


# --------------------------------------------------------------------------------------------------
# Settings of a resumed run.


def _short(value) -> str:
    text = json.dumps(value)
    if isinstance(value, list) and len(value) > 4:
        text = f"[{len(value)} values: {json.dumps(value[0])} ... {json.dumps(value[-1])}]"
    return text if len(text) <= 80 else text[:77] + "..."


def settings_mismatch(old: Mapping, new: Mapping) -> str:
    """The differing keys, briefly (long lists are summarised; at most three keys are shown)."""
    keys = sorted(set(old) | set(new))
    diffs = [k for k in keys if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diffs[:3])
    return shown + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def _has_files(folder: Path) -> bool:
    """``folder`` is a folder with at least one entry."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return next(entries, None) is not None


def check_resume(out_dir: Path, settings: Mapping, resume: bool) -> None:
    """Refuse to resume ``out_dir`` (this app's run folder) unless its settings read back equal to ``settings``."""
    if not resume:
        return
    path = out_dir / SETTINGS_FILE
    hint = "pass resume=false to replace that run, or choose another out_dir"
    if not path.exists():
        if _has_files(out_dir / IMAGES_DIR) or _has_files(out_dir / RECORDS_DIR):
            raise RunFolderError(f"out_dir {out_dir} holds images but no {SETTINGS_FILE}, so their settings are "
                                 f"unknown; {hint}")
        return
    old = _read_json(path)
    if not isinstance(old, dict):
        raise RunFolderError(f"out_dir {out_dir}: {SETTINGS_FILE} is unreadable, so the settings of its images "
                             f"are unknown; {hint}")
    if old != settings:
        raise RunFolderError(f"out_dir {out_dir} holds images sampled with other settings "
                             f"({settings_mismatch(old, settings)}); {hint}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_temporaries(out_dir: Path) -> None:
    """Leftovers of killed runs: ``.<name>.tmp-<pid>`` files (see :func:`atomic_write`)."""
    for folder in (out_dir, out_dir / IMAGES_DIR, out_dir / RECORDS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                _remove(path)


def mark_state(out_dir, app: str, state: str) -> None:
    """Record in the marker whether the run is ``"sampling"`` (started or extended, not yet assembled) or
    ``"complete"`` (its end-of-run files describe every image it was asked for)."""
    write_json(Path(out_dir) / MARKER_FILE, {"app": app, "format": 1, "state": state})


def claim_run_folder(out_dir, app: str) -> Path:
    """Check ``out_dir`` (:func:`check_out_dir`), create it and write its marker; for apps without resume."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, app)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_state(out_dir, app, "sampling")
    return out_dir


def prepare_run_folder(out_dir, settings: Mapping, resume: bool, app: str, *, is_main: bool = True,
                       barrier: Callable[[], None] = lambda: None, assembled: Sequence[str] = (),
                       records: Mapping[str, Callable[[], str]] | None = None) -> None:
    """Make ``out_dir`` this run's folder (see the module notes); raises :class:`RunFolderError` before writing
    anything when it may not be used.

    Every process checks (read-only), all meet at ``barrier``; then the main process (``is_main``) writes the
    marker, removes temporaries (with ``resume=False``: also the files an earlier run wrote there, listed in
    ``assembled`` and :data:`RUN_RECORDS`, and the per-image folders), writes ``settings.json`` and the
    text files ``records`` maps names to (e.g. ``config.yaml``); all meet at ``barrier`` again.
    """
    out_dir = Path(out_dir)
    own = check_out_dir(out_dir, app)
    if own:
        check_resume(out_dir, settings, resume)
    barrier()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        mark_state(out_dir, app, "sampling")
        if own and not resume:
            for name in (IMAGES_DIR, RECORDS_DIR, *RUN_RECORDS, *assembled):
                _remove(out_dir / name)
        remove_temporaries(out_dir)
        (out_dir / IMAGES_DIR).mkdir(exist_ok=True)
        (out_dir / RECORDS_DIR).mkdir(exist_ok=True)
        write_json(out_dir / SETTINGS_FILE, dict(settings))
        for name, make_text in (records or {}).items():
            with atomic_write(out_dir / name, "w") as f:
                f.write(make_text())
    barrier()


# --------------------------------------------------------------------------------------------------
# Per-image completeness.


def png_shape_ok(path: Path, shape: Sequence[int] | None) -> bool:
    """``path`` decodes completely to an image of ``shape`` ``[C, H, W]`` (any shape when ``None``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image)
    except Exception:  # PIL raises many types for damaged files; any of them means "not done"
        return False
    if shape is None:
        return True
    channels = 1 if array.ndim == 2 else array.shape[2]
    return (channels, *array.shape[:2]) == tuple(int(s) for s in shape)


def record_ok(path: Path, need: Iterable[str]) -> bool:
    """``path`` is an ``.npz`` holding the arrays named in ``need``, and every array in it reads back."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not set(need) <= set(data.files):
                return False
            for key in data.files:
                data[key]  # reading an array checks its CRC
        return True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile):
        return False


def image_complete(out_dir, name: str, need: Iterable[str], shape: Sequence[int] | None = None) -> bool:
    """``images/<name>.png`` decodes to ``shape`` and ``records/<name>.npz`` reads back with the arrays in ``need``."""
    out_dir = Path(out_dir)
    png, record = out_dir / IMAGES_DIR / f"{name}.png", out_dir / RECORDS_DIR / f"{name}.npz"
    if not (png.is_file() and record.is_file()):
        return False
    return record_ok(record, need) and png_shape_ok(png, shape)


def jsonable(value) -> Any:
    """``value`` with tensors, numpy scalars, paths and non-finite floats (as strings) made JSON-friendly: the
    one converter of the run folders' JSON files."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# What produced a run (env.json).


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
