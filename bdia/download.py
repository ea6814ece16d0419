"""Cached, resumable, verified downloads that fail fast and clearly when offline.

The bottom of the project: it imports no other bdia module, so every layer may use it.

* :func:`cache_dir` — where downloads live: ``$BDIA_CACHE`` or ``~/.cache/bdia``.
* :func:`fetch_file` — one URL to one local file: reuse a cached copy that verifies, otherwise download
  to ``<dest>.partial`` (resuming an existing partial file with an HTTP ``Range`` request), check the size
  and sha256 where known, and move it into place with an atomic :func:`os.replace`.
* :func:`open_regular_file`, :func:`sha256_of` — reading untrusted paths (regular files only).
* :func:`hub_cache_path` — where huggingface_hub keeps a Hub repository.

What a ``model.path``-style value means (a local file, an EDM registry name or a URL) is
:func:`bdia.networks.registry.resolve_checkpoint`.

Offline behaviour: when ``HF_HUB_OFFLINE`` or ``BDIA_OFFLINE`` is set
to a true value, nothing touches the network; a missing asset raises :class:`AssetUnavailableError`
at once. Online, there is no retry loop: one attempt with a short timeout. Either way the error is a
single exception whose message names the URL, the cache path and the config key that takes a local
file, e.g.::

    EDM checkpoint 'edm-cifar10-32x32-cond-vp' is not available: offline mode (HF_HUB_OFFLINE=1).
      URL:        https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
      cache path: /home/me/.cache/bdia/edm/edm-cifar10-32x32-cond-vp.pkl
    Put the file at the cache path yourself, or pass a local file: model.path=/path/to/edm-cifar10-32x32-cond-vp.pkl

Only the standard library is needed (``urllib``); ``tqdm`` draws the progress bar when installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

__all__ = [
    "AssetUnavailableError",
    "AssetVerificationError",
    "NotARegularFileError",
    "sha256_of",
    "hub_reachable",
    "DEFAULT_TIMEOUT",
    "cache_dir",
    "fetch_file",
    "hub_cache_path",
    "is_offline",
    "open_regular_file",
]

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for connecting and for each read (``$BDIA_DOWNLOAD_TIMEOUT`` overrides it)."""

OFFLINE_ENV_VARS = ("BDIA_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
_CHUNK = 1 << 20
_USER_AGENT = "bdia-downloader/0.1 (python-urllib)"


class AssetUnavailableError(RuntimeError):
    """A file the run needs is neither on disk nor downloadable (offline, unreachable, HTTP error …).

    Attributes:
        url: where the file would be downloaded from (``None`` for a missing local path).
        cache_path: where it is, or would be, stored locally.
        config_key: the config key that accepts a local file instead (e.g. ``"model.path"``).
        reason: short description of what went wrong.
        what: human name of the asset (e.g. ``"EDM checkpoint 'edm-cifar10-32x32-cond-vp'"``).
    """

    def __init__(self, url, cache_path, config_key=None, reason="", what=None):
        self.url = url
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.config_key = config_key
        self.reason = reason
        self.what = what
        super().__init__(self._format())

    def _format(self) -> str:
        name = Path(urllib.parse.urlparse(self.url).path).name if self.url else None
        name = name or (self.cache_path.name if self.cache_path else "file")
        what = self.what or f"file {name!r}"
        lines = [f"{what} is not available" + (f": {self.reason}" if self.reason else "") + "."]
        if self.url:
            lines.append(f"  {'URL:':<12}{self.url}")
        if self.cache_path is not None:
            lines.append(f"  {'cache path:' if self.url else 'path:':<12}{self.cache_path}")
        hint = "Put the file at the cache path yourself, or pass a local file" if self.url else "Pass a file that exists"
        if self.config_key:
            lines.append(f"{hint}: {self.config_key}=/path/to/{name}")
        else:
            lines.append(f"{hint} (its path) instead.")
        return "\n".join(lines)

    def __reduce__(self):  # keep the exception picklable (multiprocessing, torchrun workers)
        return (type(self), (self.url, self.cache_path, self.config_key, self.reason, self.what))


class AssetVerificationError(AssetUnavailableError):
    """A downloaded file failed its size or sha256 check; it was deleted and no final file was written."""


# --- configuration --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the download cache: ``$BDIA_CACHE`` if set, else ``~/.cache/bdia`` (not created here)."""
    root = os.environ.get("BDIA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bdia"


def is_offline() -> bool:
    """True when ``BDIA_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in OFFLINE_ENV_VARS)


def hub_reachable(timeout: float = 3.0) -> str | None:
    """``None`` when the Hugging Face Hub's host (``HF_ENDPOINT``, default huggingface.co) accepts a TCP
    connection within ``timeout`` seconds, else why not: a one-shot probe, so that a missing model fails at once
    instead of after the Hub client's retries (about 30 s). Behind an HTTPS proxy the probe says nothing
    (``None``)."""
    import socket

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urllib.parse.urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {host} ({e.__class__.__name__}: {e})"


def _offline_reason() -> str:
    var = next(k for k in OFFLINE_ENV_VARS if os.environ.get(k, "").strip().lower() in _TRUE)
    return f"offline mode ({var}={os.environ[var]}), the network was not tried"


def _default_timeout() -> float:
    value = os.environ.get("BDIA_DOWNLOAD_TIMEOUT")
    return float(value) if value else DEFAULT_TIMEOUT


# --- verification ---------------------------------------------------------------------------------------


class NotARegularFileError(ValueError):
    """A path that should be a file is a directory, FIFO, device or socket; refused before reading it."""


def kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular_file(path, what: str = "file"):
    """Open ``path`` for binary reading only if it is a regular file (symlinks followed).

    Directories, FIFOs, devices (``/dev/zero``) and sockets raise :class:`NotARegularFileError` with one
    line, before anything is read: the path is checked with ``os.stat`` before opening, opened with
    ``O_NONBLOCK`` (so a FIFO without a writer cannot block the open) and checked again on the open
    descriptor, so what is read is the regular file that was checked.
    """
    path = os.fspath(path)

    def refuse(mode):
        return NotARegularFileError(f"{what} {path} is {kind_of(mode)}, not a regular file")

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_of(path) -> str:
    """sha256 of a regular file (:class:`NotARegularFileError` for anything else, before reading): the one file
    hash of the project (downloads, reference statistics, weights cards)."""
    h = hashlib.sha256()
    with open_regular_file(path) as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


_sha256_of = sha256_of  # the name the loader's red-team tests use


def _verify(path: Path, expected_size: int | None, sha256: str | None) -> str | None:
    """``None`` if ``path`` passes the checks that are known, else a description of the mismatch (also
    when ``path`` is not a regular file: nothing else is ever hashed)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        return f"it is {kind_of(mode)}, not a regular file"
    size = path.stat().st_size
    if expected_size is not None and size != int(expected_size):
        return f"size mismatch: got {size} bytes, expected {int(expected_size)}"
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256.strip().lower():
            return f"sha256 mismatch: got {digest}, expected {sha256.strip().lower()}"
    return None


# --- locking (several torchrun ranks may ask for the same file) -----------------------------------------


@contextlib.contextmanager
def _file_lock(dest: Path):
    """Exclusive inter-process lock on ``<dest>.lock`` (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, downloads are still atomic
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- the download itself --------------------------------------------------------------------------------


def _progress_bar(total, initial, desc, enabled):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        leave=False)
        except ImportError:
            pass
    return contextlib.nullcontext(None)


def _open(url: str, start: int, timeout: float):
    """One request; a fresh opener each time so proxy / no_proxy settings are read now."""
    headers = {"User-Agent": _USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.build_opener().open(request, timeout=timeout)


def _download_to_partial(url: str, partial: Path, timeout: float, progress: bool, expected_size):
    """Write the body of ``url`` into ``partial``, resuming from its current length when the server allows.

    No retries: any network problem propagates to the caller (the partial file is kept for a later resume).
    """
    start = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and start:
        if start == int(expected_size):
            return  # nothing left to fetch; the caller verifies what is there
        if start > int(expected_size):
            partial.unlink()  # longer than the real file: stale, start again
            start = 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:  # 416: Range Not Satisfiable
            raise
        e.close()
        total = _total_from_content_range(e.headers.get("Content-Range"))
        if total == start:
            return  # the partial file is already complete
        partial.unlink()  # partial is longer than (or unrelated to) the file: restart once from zero
        start = 0
        response = _open(url, 0, timeout)
    with response:
        status = response.getcode()
        if start and status != 206:
            start = 0  # server ignored the Range header and is sending the whole file
        elif start:
            content_range = response.headers.get("Content-Range", "")
            m = re.match(r"bytes\s+(\d+)-", content_range)
            if not m or int(m.group(1)) != start:
                raise http.client.HTTPException(f"unexpected Content-Range {content_range!r} for a resume at {start}")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else expected_size
        with open(partial, "ab" if start else "wb") as f, _progress_bar(total, start, partial.name[:-8], progress) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        if length and length.isdigit() and partial.stat().st_size != start + int(length):
            raise http.client.IncompleteRead(b"", start + int(length) - partial.stat().st_size)


def _total_from_content_range(value) -> int | None:
    m = re.match(r"bytes\s+\*/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "the connection timed out"
    return f"download failed ({type(exc).__name__}: {exc})"


def fetch_file(url: str, dest=None, expected_size: int | None = None, sha256: str | None = None,
               progress: bool = True, timeout: float | None = None, config_key: str | None = None,
               what: str | None = None) -> Path:
    """Return a local, verified copy of ``url``, downloading it only when needed.

    Args:
        url: ``http(s)://`` (or ``file://``) address.
        dest: final local path; default ``cache_dir()/"downloads"/<file name of the URL>``.
        expected_size: size in bytes, checked when given.
        sha256: hex digest, checked when given.
        progress: draw a tqdm progress bar while downloading.
        timeout: seconds for the connection and for each read (default :data:`DEFAULT_TIMEOUT`, or
            ``$BDIA_DOWNLOAD_TIMEOUT``). There is exactly one attempt, never a retry loop.
        config_key: config key that accepts a local file instead, named in the error message.
        what: human name of the asset for the error message.

    Behaviour: an existing ``dest`` that verifies is returned without any network access (also offline);
    one that fails verification is deleted and fetched again. Otherwise the body goes to
    ``<dest>.partial`` — appended to an existing partial file through an HTTP ``Range`` request — and,
    once its size / sha256 check out, is renamed to ``dest`` with :func:`os.replace`, so ``dest`` is never
    a half-written file. Concurrent callers (torchrun ranks) serialise on ``<dest>.lock``.

    Raises:
        AssetUnavailableError: offline (``HF_HUB_OFFLINE`` / ``BDIA_OFFLINE``), unreachable server, HTTP
            error or timeout. A partially downloaded file is kept for a later resume.
        AssetVerificationError: size or sha256 mismatch (a subclass; the bad file is deleted).
    """
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / "downloads" / url_basename(url)
    timeout = _default_timeout() if timeout is None else float(timeout)

    def unavailable(reason, cls=AssetUnavailableError):
        return cls(url, dest, config_key=config_key, reason=reason, what=what)

    for existing in (dest, dest.with_name(dest.name + ".partial")):
        if existing.exists() and not existing.is_file():  # a directory, FIFO, device: never read or replaced
            raise unavailable(f"{existing} is {kind_of(existing.stat().st_mode)}, not a regular file; remove it "
                              "or choose another path")

    if dest.is_file():
        problem = _verify(dest, expected_size, sha256)
        if problem is None:
            return dest
        warnings.warn(f"cached file {dest} is invalid ({problem}); fetching it again", stacklevel=2)
        dest.unlink()

    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme != "file" and is_offline():
        raise unavailable(_offline_reason())

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unavailable(f"cannot create the cache directory ({e})") from None

    partial = dest.with_name(dest.name + ".partial")
    with _file_lock(dest):
        if dest.is_file() and _verify(dest, expected_size, sha256) is None:
            return dest  # another process finished it while we waited for the lock
        try:
            _download_to_partial(url, partial, timeout, progress, expected_size)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise unavailable(_describe(e)) from None
        problem = _verify(partial, expected_size, sha256)
        if problem is not None:
            partial.unlink(missing_ok=True)
            raise unavailable(f"the downloaded file failed verification ({problem}); it was deleted",
                              AssetVerificationError)
        os.replace(partial, dest)
    return dest


def hub_cache_path(repo_id: str) -> Path:
    """Where huggingface_hub caches the Hub repository ``repo_id`` (``models--<org>--<name>`` in its cache)."""
    try:
        from huggingface_hub import constants  # optional here: only the SD / CLIP loaders need it

        root = Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        root = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return root / f"models--{repo_id.replace('/', '--')}"


def url_basename(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or hashlib.sha1(url.encode()).hexdigest()[:16]
