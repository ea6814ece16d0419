"""Run folders: the one way every app writes its results, how a rerun resumes, and when an item counts as done.

Every app (sample, text2image, edit, train, evaluate's ``metrics.json``) writes through :func:`open_run`::

    with open_run(out_dir, "sample", settings, resume, written=SAMPLE_FILES, records=...) as run:
        run.write_bytes("images/000001.png", png)      # atomic; never through a symbolic link
        run.write_json("metrics.json", metrics)
        run.mark("complete")

and ``scripts/fid_ref.py``, whose output is one statistics file rather than a folder, through
:func:`open_output_file`. The contract:

* **Whose folder.** A run writes only into a folder that does not exist yet, an **empty** folder, or its
  **own** run folder: one holding the marker :data:`MARKER_FILE` (``.bdia-run.json``, a regular file naming
  the app) that bdia writes first. Nothing else proves ownership: a folder holding other files (even a
  ``settings.json`` and ``images/`` as runs wrote them before the marker existed), a file, a symbolic link that
  leads nowhere, or another app's run folder is refused with one line, and nothing in it is touched.
* **One writer.** The run holds an advisory lock (``fcntl.flock`` on :data:`LOCK_FILE` inside the folder,
  which also records the holder's pid, host and start time) from its checks to its last write. A second
  writer is refused in one line naming the holder; a lock left by a process that died is released by the
  kernel and taken over (the log says so). Under torchrun rank 0 holds it for all ranks.
* **Settings.** ``settings.json`` records what determines the results. A rerun (``resume=True``) continues
  only when it reads back equal to the new settings; other settings, an unreadable ``settings.json`` or
  results without one are refused. ``resume=False`` replaces the run: first the files the run writes are
  removed, and only those: regular files whose names match the app's ``written`` patterns (e.g.
  ``images/<6+ digits>.png``), never a folder, a link or another name.
* **No links.** The folder is opened once; every file is created, replaced and read relative to that open
  folder with ``O_NOFOLLOW`` (subfolders too), so a symbolic link placed in the run folder (``images ->
  /elsewhere``) is refused, never written through or read as a result.
* **Done means ours.** An item (``images/<name>.png`` + ``records/<name>.npz``) is done only when its record
  reads back within bounds (uncompressed members whose ``.npy`` headers are checked before any array is
  allocated), holds the arrays the app needs with the right shapes and kinds, and its ``png_sha256`` equals the
  sha256 of the PNG's bytes: a file of the right name and size that the run did not write is sampled again.
* **Atomic files.** Every file appears whole (temporary name, then rename): readers see the old file or the
  new one. End-of-run files of an earlier run stay, still describing the images they were built from, until
  the new ones replace them; the marker's ``state`` is ``"running"`` until then and ``"complete"`` after.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .distributed import DistContext, barrier, gather

__all__ = [
    "IMAGES_DIR",
    "RECORDS_DIR",
    "SETTINGS_FILE",
    "MARKER_FILE",
    "LOCK_FILE",
    "RUN_RECORDS",
    "RunFolderError",
    "RunFolder",
    "open_run",
    "open_finished_run",
    "open_output_file",
    "check_output_file",
    "check_out_dir",
    "settings_mismatch",
    "atomic_write",
    "write_json",
    "read_npz",
    "npz_members",
    "jsonable",
    "environment_info",
]

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
RECORDS_DIR = "records"
SETTINGS_FILE = "settings.json"
MARKER_FILE = ".bdia-run.json"
LOCK_FILE = ".bdia-run.lock"
#: What every run writes when it starts (``config.yaml`` when the app has a config), besides the marker and lock.
RUN_RECORDS = (SETTINGS_FILE, "config.yaml", "env.json")
#: JSON files bdia reads back (settings, marker, metrics) are small; larger ones are not ours.
MAX_JSON_BYTES = 16 * 2**20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_TEMPORARY = re.compile(r"\.(.+)\.tmp-[0-9]+")


class RunFolderError(ValueError):
    """An ``out_dir`` the run may not use (one line, naming the folder and what to do)."""


# --------------------------------------------------------------------------------------------------
# Small helpers: names, JSON, files relative to an open folder.


def _split(name: str) -> tuple[str | None, str]:
    """``"images/000001.png"`` -> ``("images", "000001.png")``; names are plain (no ``..``, no hidden files, at
    most one subfolder), so a name can never leave the run folder."""
    parts = str(name).split("/")
    if len(parts) > 2 or not all(_NAME.fullmatch(p) for p in parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"not a run-folder file name: {name!r}")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _read_regular(name: str, dir_fd: int, limit: int) -> bytes | None:
    """The bytes of the regular file ``name`` (never through a link), or ``None`` when it is missing, not a
    regular file, larger than ``limit`` or unreadable."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _json_or_none(data: bytes | None):
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _json_text(obj) -> str:
    return json.dumps(jsonable(obj), indent=2) + "\n"


@contextlib.contextmanager
def _atomic_in(dir_fd: int, name: str, where: str) -> Iterator[io.BufferedWriter]:
    """A new temporary file (``O_EXCL | O_NOFOLLOW``) in the open folder ``dir_fd``, renamed onto ``name`` when the
    block ends without error, unless ``name`` is something other than a regular file (a link, a folder)."""
    tmp = f".{name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # our own leftover (same pid): a temporary name is never a user's file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        existing = _lstat(name, dir_fd)
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(existing.st_mode) else "not a regular file"
            raise RunFolderError(f"{where}/{name} is {kind}; bdia never writes through links or over other kinds of "
                                 f"files; remove it or choose another out_dir")
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _write_atomic(dir_fd: int, name: str, data: bytes, where: str) -> None:
    """``data`` as ``name`` in the open folder ``dir_fd``, atomically (:func:`_atomic_in`)."""
    with _atomic_in(dir_fd, name, where) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success rename it onto ``path``, on failure remove
    it. Readers see the old file or the complete new one. For files outside run folders (caches, cards); a run's
    files go through :class:`RunFolder`."""
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
    """``obj`` as indented JSON at ``path``, atomically (outside run folders; see :meth:`RunFolder.write_json`)."""
    with atomic_write(path, "w") as f:
        f.write(_json_text(obj))


# --------------------------------------------------------------------------------------------------
# Bounded .npz reading (records, images.npz, reference statistics).


def npz_members(source, max_bytes: int, what: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in the ``.npz`` ``source`` (a path or bytes), read from the zip and
    ``.npy`` headers only: nothing is decompressed or allocated. Raises ``ValueError`` naming ``what`` when it
    is not a readable ``.npz`` of plain arrays, or when its arrays declare more than ``max_bytes`` in all, or
    more bytes than their member holds (a forged header)."""
    from numpy.lib import format as npy

    members: dict = {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{what}: not a readable .npz ({type(e).__name__}: {e})") from None
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{what}: holds {info.filename!r}, which is not an array")
            total += info.file_size
            if total > max_bytes:
                raise ValueError(f"{what}: its arrays take more than {max_bytes / 2**20:.0f} MiB unpacked, more than "
                                 f"this reader accepts")
            try:
                with archive.open(info) as f:
                    version = npy.read_magic(f)
                    reader = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                    if reader is None:
                        raise ValueError(f"unsupported .npy version {version}")
                    shape, _, dtype = reader(f)
                    header = f.tell()
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as e:
                raise ValueError(f"{what}: array {info.filename!r} is unreadable ({e})") from None
            if dtype.hasobject:
                raise ValueError(f"{what}: array {info.filename!r} holds Python objects; only plain arrays are read")
            count = math.prod(shape)
            if count * dtype.itemsize > info.file_size - header:
                raise ValueError(f"{what}: array {info.filename!r} declares {list(shape)} {dtype}, more than its "
                                 f"{info.file_size} bytes hold")
            members[info.filename[:-4]] = (tuple(int(s) for s in shape), dtype)
    return members


def read_npz(source, max_bytes: int, what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` ``source`` (path or bytes) after :func:`npz_members` bounded it and every
    member's CRC was checked. ``ValueError`` naming ``what`` for anything damaged."""
    npz_members(source, max_bytes, what)
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as archive:
            damaged = archive.testzip()  # every member's CRC (np.load checks one only when it reads to its end)
        if damaged is not None:
            raise ValueError(f"{damaged} fails its CRC check")
        with np.load(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                     allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{what}: cannot read it ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# Whose folder is it? (read-only checks)


def _as_folder(out_dir, key: str = "out_dir") -> Path:
    if isinstance(out_dir, bool) or not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise RunFolderError(f"{key} must be a folder path, got {out_dir!r}")
    return Path(os.path.expanduser(os.fspath(out_dir)))


def _owner(folder: Path) -> str | None:
    """The app named by the folder's marker; ``"?"`` for a marker that is not a readable regular file of ours;
    ``None`` without a marker."""
    if not os.path.lexists(folder / MARKER_FILE):
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return "?"
    try:
        data = _json_or_none(_read_regular(MARKER_FILE, fd, MAX_JSON_BYTES))
    finally:
        os.close(fd)
    return str(data["app"]) if isinstance(data, dict) and isinstance(data.get("app"), str) and data["app"] else "?"


def _looks_like_an_old_run(folder: Path) -> bool:
    return (folder / SETTINGS_FILE).is_file() and ((folder / IMAGES_DIR).is_dir() or (folder / RECORDS_DIR).is_dir()
                                                   or (folder / "metrics.json").is_file())


def _listing(folder: Path, limit: int = 3) -> str:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            if len(names) > limit:
                break
    shown = ", ".join(repr(n) for n in sorted(names)[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _has_entries(folder: Path) -> bool:
    """``folder`` holds anything besides a lock file of ours (left when a run died before writing its marker)."""
    with os.scandir(folder) as entries:
        return any(not (e.name == LOCK_FILE and e.is_file(follow_symlinks=False)) for e in entries)


def _lock_holder(folder: Path) -> str | None:
    """A description of the live process holding ``folder``'s lock, or ``None`` when nobody holds it."""
    path = folder / LOCK_FILE
    if not os.path.lexists(path) or path.is_symlink():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(_json_or_none(os.pread(fd, 4096, 0)))
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(info) -> str:
    if not isinstance(info, dict):
        return "another process"
    app = f"{info.get('app')} " if info.get("app") else ""
    since = f" since {info.get('started')}" if info.get("started") else ""
    return f"a {app}run (pid {info.get('pid')} on {info.get('host')}{since})"


def check_out_dir(out_dir, app: str, settings: Mapping | None = None, resume: bool = True,
                  subfolders: Sequence[str] = (), written: Sequence[str] = ()) -> bool:
    """Check (read-only) that ``app`` may write into ``out_dir``; returns whether it already is this app's run
    folder. Raises :class:`RunFolderError` (one line) for a folder it may not use, one that another run is
    writing, or (with ``settings`` and ``resume``) one whose results were made with other settings. Cheap: apps
    call it before loading anything; :func:`open_run` repeats it under the lock."""
    out_dir = _as_folder(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise RunFolderError(f"out_dir {out_dir} is a symbolic link to nothing; choose another out_dir")
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
        if not _has_entries(out_dir):
            return False
        if _looks_like_an_old_run(out_dir):
            raise RunFolderError(
                f"out_dir {out_dir} holds {_listing(out_dir)} but no run marker ({MARKER_FILE}): it may be a run of "
                f"a bdia version before markers, but only the marker proves a folder is bdia's, so nothing was changed "
                f"or will be removed; choose a new or empty out_dir (or move its files away)")
        raise RunFolderError(f"out_dir {out_dir} exists and is not a bdia run folder (it holds {_listing(out_dir)}); "
                             f"nothing was changed; choose a new or empty folder")
    if owner == "?":
        raise RunFolderError(f"out_dir {out_dir}: its run marker {MARKER_FILE} is not a readable bdia marker, so "
                             f"whose folder it is is unknown; nothing was changed; choose another out_dir")
    if owner != app:
        raise RunFolderError(f"out_dir {out_dir} is a run folder of the {owner!r} app, not of {app!r}; "
                             f"choose another out_dir")
    for sub in subfolders:
        path = out_dir / sub
        if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
            raise RunFolderError(f"out_dir {out_dir}: {sub} is {'a symbolic link' if path.is_symlink() else 'a file'}"
                                 f", not the run's folder; bdia never writes or resumes through links; remove it or "
                                 f"choose another out_dir")
    holder = _lock_holder(out_dir)
    if holder:
        raise RunFolderError(f"out_dir {out_dir} is in use by {holder}; wait for it to finish or choose another "
                             f"out_dir")
    if settings is not None and resume:
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _check_resume(fd, out_dir, settings, subfolders, written)
        finally:
            os.close(fd)
    return True


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


def _has_results(out_dir: Path, subfolders: Sequence[str], written: Sequence[str]) -> bool:
    """Anything in the subfolders, or a top-level file matching one of the ``written`` patterns."""
    if any(os.path.isdir(out_dir / sub) and _has_entries(out_dir / sub) for sub in subfolders):
        return True
    patterns = _patterns(written)
    return any(p.fullmatch(name) for name in os.listdir(out_dir) for p in patterns)


def _check_resume(fd: int, out_dir: Path, settings: Mapping, subfolders: Sequence[str],
                  written: Sequence[str] = ()) -> None:
    """Refuse to resume this app's run folder unless its settings read back equal to ``settings``."""
    hint = "pass resume=false to replace that run, or choose another out_dir"
    if _lstat(SETTINGS_FILE, fd) is None:
        if _has_results(out_dir, subfolders, [w for w in written if w not in map(re.escape, RUN_RECORDS)]):
            raise RunFolderError(f"out_dir {out_dir} holds results but no {SETTINGS_FILE}, so their settings are "
                                 f"unknown; {hint}")
        return
    old = _json_or_none(_read_regular(SETTINGS_FILE, fd, MAX_JSON_BYTES))
    if not isinstance(old, dict):
        raise RunFolderError(f"out_dir {out_dir}: {SETTINGS_FILE} is unreadable, so the settings of its results are "
                             f"unknown; {hint}")
    new = json.loads(json.dumps(jsonable(dict(settings))))
    if old != new:
        raise RunFolderError(f"out_dir {out_dir} holds results made with other settings "
                             f"({settings_mismatch(old, new)}); {hint}")


# --------------------------------------------------------------------------------------------------
# The lock.


class _Lock:
    """An exclusive ``flock`` on :data:`LOCK_FILE` in the open folder ``dir_fd``, with the holder recorded."""

    def __init__(self, dir_fd: int, folder: Path, app: str, name: str = LOCK_FILE):
        self.name, self.dir_fd = name, dir_fd
        try:
            self.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunFolderError(f"{folder}/{name} is a symbolic link; remove it or choose another out_dir") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise RunFolderError(f"{folder}/{name} is not a regular file; remove it or choose another out_dir")
            previous = _json_or_none(os.pread(self.fd, 4096, 0))
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(f"out_dir {folder} is in use by {_describe_holder(previous)}; wait for it to "
                                     f"finish or choose another out_dir") from None
            except OSError as e:  # a file system without locks: the recorded holder is all there is
                log.warning("%s: cannot lock (%s); relying on the recorded holder only", folder, e)
                if _alive_here(previous):
                    raise RunFolderError(f"out_dir {folder} is in use by {_describe_holder(previous)} (its lock "
                                         f"file says so); wait for it or choose another out_dir") from None
            now = _lstat(name, dir_fd)
            if now is None or now.st_ino != os.fstat(self.fd).st_ino:  # removed by a writer finishing meanwhile
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                raise RunFolderError(f"out_dir {folder} was in use by another run a moment ago; rerun")
            if isinstance(previous, dict) and previous.get("pid") is not None:
                if _alive_here(previous) and previous.get("pid") != os.getpid():
                    # the kernel says nobody holds the lock, yet the recorded holder lives here: locks are not
                    # working on this file system (or the pid was reused); refuse rather than risk two writers
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    raise RunFolderError(
                        f"out_dir {folder}: its lock file names {_describe_holder(previous)}, still running, but the "
                        f"lock is not held (a file system without locks?); if no bdia run uses the folder, delete "
                        f"{folder / name} and rerun")
                log.info("%s: taking over the lock of %s, which ended without releasing it", folder,
                         _describe_holder(previous))
            holder = {"app": app, "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(holder).encode(), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # released cleanly: no holder recorded
        except OSError:
            pass
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _alive_here(info) -> bool:
    """The recorded holder is a live process on this host."""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# An open run folder.


def _patterns(written: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(p) for p in written]


class RunFolder:
    """A run folder opened by :func:`open_run` (or :func:`open_output_file`): every write of the run goes through
    it. Names are relative (``"metrics.json"``, ``"images/000001.png"``); files are created and read relative to
    the folder opened once, never through a symbolic link. Reading :attr:`path` is for display and for readers
    of finished runs."""

    def __init__(self, path: Path, app: str, dir_fd: int, subfolders: Sequence[str] = (), written: Sequence[str] = (),
                 lock: _Lock | None = None, create: bool = True):
        self.path, self.app, self._fd, self._lock = path, app, dir_fd, lock
        self._written = _patterns(written)
        self._sub_fds: dict[str, int] = {}
        self._absent: set = set()
        #: The marker's state when the run resumed its own folder (``"complete"``: finished before), else ``None``.
        self.previous_state: str | None = None
        try:
            for sub in subfolders:
                self._sub_fds[sub] = self._open_subfolder(sub, create)
        except BaseException:
            for fd in self._sub_fds.values():
                os.close(fd)
            raise

    @classmethod
    @contextlib.contextmanager
    def for_reading(cls, path, subfolders: Sequence[str] = ()) -> Iterator["RunFolder"]:
        """A run folder opened to read its items (no lock, nothing created); missing subfolders read as empty."""
        path = Path(path)
        fd = os.open(path.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        run = None
        try:
            run = cls(path, _owner(path) or "?", fd, [s for s in subfolders if os.path.lexists(path / s)], create=False)
            run._absent = {s for s in subfolders if s not in run._sub_fds}
            yield run
        finally:
            if run is not None:
                run.close()
            else:
                os.close(fd)

    # -- folders
    def _open_subfolder(self, sub: str, create: bool = True) -> int:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o755, dir_fd=self._fd)
        try:
            return os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RunFolderError(f"out_dir {self.path}: {sub} is a symbolic link or a file, not the run's folder; "
                                     f"bdia never writes or resumes through links; remove it or choose another "
                                     f"out_dir") from None
            raise

    def _where(self, name: str) -> tuple[int, str, str]:
        sub, base = _split(name)
        if sub is None:
            return self._fd, base, str(self.path)
        if sub not in self._sub_fds:
            raise ValueError(f"{name!r}: {sub!r} is not one of this run's folders {list(self._sub_fds)}")
        return self._sub_fds[sub], base, f"{self.path}/{sub}"

    # -- writing
    def write_bytes(self, name: str, data: bytes) -> None:
        """``data`` as the file ``name``, atomically, never through a link."""
        fd, base, where = self._where(name)
        _write_atomic(fd, base, bytes(data), where)

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[io.BufferedWriter]:
        """A binary file to write ``name`` into; it appears (atomically, never through a link) when the block
        ends without error. For large files written in pieces (``np.savez(f, ...)``)."""
        fd, base, where = self._where(name)
        with _atomic_in(fd, base, where) as f:
            yield f

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        """``obj`` (made JSON-friendly by :func:`jsonable`) as indented JSON."""
        self.write_text(name, _json_text(obj))

    def write_npz(self, name: str, arrays: Mapping[str, Any], compressed: bool = False) -> None:
        buffer = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
        self.write_bytes(name, buffer.getvalue())

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[io.TextIOBase]:
        """A text file written line by line (a log that grows while the run goes on): created or truncated
        without following links; not atomic."""
        fd, base, where = self._where(name)
        existing = _lstat(base, fd)
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            raise RunFolderError(f"{where}/{base} is not a regular file; bdia never writes through links; remove it")
        handle = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
        with os.fdopen(handle, "w") as f:
            yield f

    def mark(self, state: str) -> None:
        """Record in the marker whether the run is ``"running"`` or ``"complete"`` (its end-of-run files describe
        every result it was asked for)."""
        _write_atomic(self._fd, MARKER_FILE, _json_text({"app": self.app, "format": 2, "state": state}).encode(),
                      str(self.path))

    # -- reading
    def read_bytes(self, name: str, limit: int) -> bytes | None:
        """The bytes of the regular file ``name`` (at most ``limit``), or ``None``: missing, a link, too large."""
        if _split(name)[0] in self._absent:
            return None
        fd, base, _ = self._where(name)
        return _read_regular(base, fd, limit)

    def sha256(self, name: str) -> str | None:
        """The sha256 of the regular file ``name`` (read without following links), or ``None``."""
        fd, base, _ = self._where(name)
        try:
            handle = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            return None
        with os.fdopen(handle, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        return digest.hexdigest()

    def is_regular_file(self, name: str) -> bool:
        """``name`` exists in the folder as a regular file (not a link, not a folder)."""
        fd, base, _ = self._where(name)
        info = _lstat(base, fd)
        return info is not None and stat.S_ISREG(info.st_mode)

    def read_json(self, name: str):
        return _json_or_none(self.read_bytes(name, MAX_JSON_BYTES))

    def state(self) -> str | None:
        marker = _json_or_none(_read_regular(MARKER_FILE, self._fd, MAX_JSON_BYTES))
        return marker.get("state") if isinstance(marker, dict) else None

    def listdir(self, sub: str | None = None) -> list[str]:
        fd = self._fd if sub is None else self._sub_fds[sub]
        return sorted(os.listdir(fd))

    # -- removing
    def is_written(self, name: str) -> bool:
        """``name`` is a file this app writes (it matches one of the app's ``written`` patterns)."""
        return any(p.fullmatch(name) for p in self._written)

    def remove_written(self) -> list[str]:
        """Remove the files this app writes (regular files matching its ``written`` patterns, and temporaries
        left by killed runs), nothing else; returns their names."""
        removed = []
        for sub, fd in ((None, self._fd), *self._sub_fds.items()):
            for base in os.listdir(fd):
                name = base if sub is None else f"{sub}/{base}"
                temporary = _TEMPORARY.fullmatch(base)
                if not (temporary or self.is_written(name)):
                    continue
                info = _lstat(base, fd)
                if info is not None and stat.S_ISREG(info.st_mode):
                    os.unlink(base, dir_fd=fd)
                    removed.append(name)
        return removed

    def remove_temporaries(self) -> None:
        """Leftovers of killed runs: ``.<name>.tmp-<pid>`` regular files (see :func:`_write_atomic`)."""
        for fd in (self._fd, *self._sub_fds.values()):
            for base in os.listdir(fd):
                info = _lstat(base, fd) if _TEMPORARY.fullmatch(base) else None
                if info is not None and stat.S_ISREG(info.st_mode):
                    os.unlink(base, dir_fd=fd)

    def close(self) -> None:
        for fd in self._sub_fds.values():
            os.close(fd)
        self._sub_fds = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- items: images/<name>.png with records/<name>.npz
    def item_record(self, name: str, need: Mapping[str, tuple], shape: Sequence[int] | None = None,
                    max_record_bytes: int = 64 * 2**20) -> tuple[bytes, dict] | None:
        """``(png bytes, record arrays)`` of a done item, else ``None`` (see the module notes): the record reads
        back within ``max_record_bytes`` from uncompressed members, holds every array of ``need`` (name ->
        ``(shape or None, dtype kinds)``, e.g. ``{"nfe": ((), "iu")}``), and its ``png_sha256`` is the sha256 of
        ``images/<name>.png``, whose header says ``shape`` ``[C, H, W]``."""
        data = self.read_bytes(f"{RECORDS_DIR}/{name}.npz", max_record_bytes)
        if data is None:
            return None
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                if any(i.compress_type != zipfile.ZIP_STORED for i in archive.infolist()):
                    return None  # the run writes records uncompressed; anything else is not its file
            record = read_npz(data, max_record_bytes, name)
        except (ValueError, zipfile.BadZipFile):
            return None
        for key, (want_shape, kinds) in {**need, "png_sha256": ((), "U")}.items():
            array = record.get(key)
            if array is None or array.dtype.kind not in kinds:
                return None
            if want_shape is not None and tuple(array.shape) != tuple(want_shape):
                return None
        png = self.read_bytes(f"{IMAGES_DIR}/{name}.png", max_record_bytes)
        if png is None or hashlib.sha256(png).hexdigest() != str(record["png_sha256"]):
            return None
        if shape is not None and _png_shape(png) != tuple(int(s) for s in shape):
            return None
        return png, record


def _png_shape(png: bytes) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` from a PNG's IHDR (8-bit grey, RGB and RGBA only)."""
    if len(png) < 33 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    channels = {0: 1, 2: 3, 6: 4}.get(png[25])
    return None if channels is None or png[24] != 8 else (channels, height, width)


# --------------------------------------------------------------------------------------------------
# Opening a run folder.


@contextlib.contextmanager
def open_run(out_dir, app: str, settings: Mapping | None = None, resume: bool = True, *,
             written: Sequence[str] = (), subfolders: Sequence[str] = (),
             records: Mapping[str, Callable[[], str]] | None = None, ctx=None) -> Iterator[RunFolder]:
    """Open ``out_dir`` as ``app``'s run folder for writing (the contract: module notes); the lock is held until
    the ``with`` block ends.

    Args:
        settings: what determines the results (``settings.json``); ``None`` for an app without resume checks.
        resume: keep an own run's results when the settings match (else refuse); ``False``: remove the files
            the run writes (``written``), then start afresh.
        written: regular-expression patterns (full match) of the file names the app writes, e.g.
            ``r"images/[0-9]{6,}\\.png"``; the marker's, ``settings.json``'s and the run records' are added.
        subfolders: the run's folders (``images``, ``records``), created and opened without following links.
        records: text files written once the folder is claimed (name -> function returning the text), e.g.
            ``config.yaml``, ``env.json``.
        ctx: a :class:`bdia.distributed.DistContext`: every rank checks, rank 0 claims (lock, removal, marker,
            settings, records), then every rank opens the folder; a refusal on rank 0 is raised on every rank.

    Raises :class:`RunFolderError` (one line) before changing anything when the folder may not be used.
    """
    ctx = ctx or DistContext()
    path = _as_folder(out_dir)
    check_out_dir(path, app, settings, resume, subfolders, written)
    written = [*written, *(re.escape(n) for n in RUN_RECORDS)]
    run = error = None
    barrier(ctx)
    if ctx.is_main:
        try:
            run = _claim(path, app, settings, resume, written, subfolders, records)
        except RunFolderError as e:
            error = str(e)
    error = gather(ctx, error)[0] if ctx.enabled else error
    if error is not None:
        raise RunFolderError(error)
    if not ctx.is_main:
        fd = os.open(path.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        run = RunFolder(path, app, fd, subfolders, written)
    barrier(ctx)
    try:
        yield run
    finally:
        run.close()


def _claim(path: Path, app, settings, resume, written, subfolders, records) -> RunFolder:
    """Rank 0: create and lock the folder, check it again under the lock, replace or keep its results."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock = None
    try:
        lock = _Lock(fd, path, app)
        # under the lock, the folder is what it is: check again (another run may have claimed it meanwhile)
        own = _owner(path)
        if own is None and _has_entries(path):
            raise RunFolderError(f"out_dir {path} changed while it was being claimed (it holds {_listing(path)}); "
                                 f"nothing was changed; choose a new or empty folder")
        if own not in (None, app):
            raise RunFolderError(f"out_dir {path} is a run folder of the {own!r} app, not of {app!r}; choose another "
                                 f"out_dir")
        if own and settings is not None and resume:
            _check_resume(fd, path, settings, subfolders, written)
        run = RunFolder(path, app, fd, subfolders, written, lock)
        run.previous_state = run.state() if own and resume else None
    except BaseException:
        if lock is not None:
            lock.release()
        os.close(fd)
        raise
    try:
        if own and not resume:
            removed = run.remove_written()
            if removed:
                log.info("resume=false: removed %d files the earlier run wrote in %s", len(removed), path)
        run.mark("running")
        run.remove_temporaries()
        if settings is not None:
            run.write_json(SETTINGS_FILE, dict(settings))
        for name, make_text in (records or {}).items():
            run.write_text(name, make_text())
    except BaseException:
        run.close()
        raise
    return run


@contextlib.contextmanager
def open_finished_run(run_dir, *, key: str = "run_dir") -> Iterator[RunFolder]:
    """Open a **complete** run folder of any app to add to it (``scripts/evaluate.py``'s ``metrics.json``), with its
    lock held. Refuses one line for a folder without a bdia marker, one still running, or one in use."""
    path = _as_folder(run_dir, key)
    if not path.is_dir():
        raise RunFolderError(f"{key}={path}: not a folder")
    owner = _owner(path)
    if owner in (None, "?"):
        raise RunFolderError(f"{key}={path} has no bdia run marker ({MARKER_FILE}), so it is not known to be a bdia "
                             f"run folder; nothing is written there (write=false computes without writing)")
    fd = os.open(path.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lock = _Lock(fd, path, owner)
    except BaseException:
        os.close(fd)
        raise
    run = RunFolder(path, owner, fd, lock=lock)
    try:
        if run.state() != "complete":
            raise RunFolderError(f"{key}={path}: the {owner} run there has not finished (its marker says "
                                 f"{run.state()!r}); finish it first")
        yield run
    finally:
        run.close()


@contextlib.contextmanager
def open_output_file(path, app: str, is_own: Callable[[RunFolder, str], bool], *, key: str = "out",
                     companions: Sequence[str] = ()) -> Iterator[RunFolder]:
    """Open the folder of the single output file ``path`` (and its ``companions``, e.g. ``"<name>.json"``) for
    ``app`` to write, with a lock (``.<name>.lock`` beside it, removed afterwards). An existing ``path`` or
    companion is replaced only when ``is_own(folder, name)`` says this app wrote it (e.g. a card holding its
    sha256); anything else, a link or a folder there is refused in one line. The returned folder writes only
    ``path``'s name and its companions."""
    path = _as_folder(path, key)
    if path.name in ("", ".", ".."):
        raise RunFolderError(f"{key}={path}: not a file name")
    names = [path.name, *companions]
    if path.parent.exists() and not path.parent.is_dir():
        raise RunFolderError(f"{key}={path}: {path.parent} is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock_name = f".{path.name}.lock"
    lock = None
    try:
        lock = _Lock(fd, path.parent, app, lock_name)
        folder = RunFolder(path.parent, app, fd, written=[re.escape(n) for n in names], lock=lock)
        _check_outputs(folder, path, names, app, is_own, key)
    except BaseException:
        if lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_name, dir_fd=fd)
            lock.release()
        os.close(fd)
        raise
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_name, dir_fd=fd)  # while still holding it: a waiting writer then finds no file
        folder.close()


def _check_outputs(folder: RunFolder, path: Path, names, app: str, is_own, key: str) -> None:
    for name in names:
        info = _lstat(name, folder._fd)
        if info is None:
            continue
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise RunFolderError(f"{key}={path}: {path.parent / name} is {kind}; choose another {key}")
        if not is_own(folder, name):
            raise RunFolderError(f"{key}={path}: {path.parent / name} exists and was not written by {app} (or was "
                                 f"changed since); it is left as it is; choose another {key} or move it away")


def check_output_file(path, app: str, is_own: Callable[[RunFolder, str], bool], *, key: str = "out",
                      companions: Sequence[str] = ()) -> None:
    """:func:`open_output_file`'s checks, read-only and without the lock: an app calls it before hours of work."""
    path = _as_folder(path, key)
    if path.name in ("", ".", ".."):
        raise RunFolderError(f"{key}={path}: not a file name")
    if not path.parent.exists():
        return
    if not path.parent.is_dir():
        raise RunFolderError(f"{key}={path}: {path.parent} is not a folder")
    fd = os.open(path.parent.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    folder = RunFolder(path.parent, app, fd, create=False)
    try:
        _check_outputs(folder, path, [path.name, *companions], app, is_own, key)
    finally:
        folder.close()


# --------------------------------------------------------------------------------------------------
# JSON-friendly values and what produced a run (env.json).


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
