"""safetensors network files: the conversion cache ``<snapshot>.bdia.safetensors`` that
:func:`bdia.networks.loader.load_edm` writes beside a snapshot, and the bounded reader it shares with the
networks written by ``scripts/train.py`` (:func:`bdia.networks.loader.load_safetensors_network`).

Trust conventions (a safetensors file is untrusted input, as much as a snapshot: the cache sits in a folder
anyone may write to):

* :func:`_read_safetensors` checks the JSON header (its size, the number of tensors, each dtype, shape and
  offsets, and that they account for the file's size exactly) before any tensor data is read; the data is
  read only through the callable it returns, after the caller has checked the constructor arguments and
  planned the network.
* ``tensors_sha256`` (:func:`_tensors_sha256`: name, dtype, shape and bytes of every tensor, in name order)
  detects a damaged or edited cache; it authenticates nothing (a crafted cache can re-hash its tensors), so
  a cache's metadata goes through the same argument checks as a snapshot. ``source_sha256`` ties a cache to
  the bytes of the snapshot it was converted from.
* The cache is written atomically (a temporary file in the same folder, then ``os.replace``): a failed
  write never leaves a partial cache behind.
* Refusals are the one-line :class:`~bdia.networks.snapshot.SnapshotError`, naming the file; a cache that is
  not used or cannot be written is reported by a one-line :class:`CacheWarning`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from .snapshot import (
    MAX_SAFETENSORS_HEADER,
    MAX_TENSORS,
    SnapshotError,
    _brief,
    _open_regular,
    _plain,
    _short_repr,
)

__all__ = ["CACHE_SUFFIX", "CacheWarning"]

CACHE_SUFFIX = ".bdia.safetensors"


class CacheWarning(UserWarning):
    """The conversion cache was not used (damaged, tampered with, refused) or could not be written."""


# --------------------------------------------------------------------------------------------------
# safetensors files: the conversion cache and networks written by scripts/train.py.


def _tensors_sha256(tensors) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    return h.hexdigest()


_SAFETENSORS_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _read_safetensors(f, path, what: str):
    """(metadata, {name: shape}, data) of an open safetensors file, refusing oversized or inconsistent headers
    before the tensor data is read. ``data`` is a callable that reads and returns the tensors."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise SnapshotError(f"{path}: not a {what} (too short for a safetensors header)")
    n = int.from_bytes(raw, "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise SnapshotError(
            f"{path}: not a {what} (its header claims {n:,} bytes; the limit is {MAX_SAFETENSORS_HEADER:,} and the file has {size:,})"
        )
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"{path}: not a {what} (unreadable safetensors header: {_brief(e, 120)})") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: not a {what} (the safetensors header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SnapshotError(f"{path}: not a {what} (its metadata is not a map of strings)")
    if len(header) > MAX_TENSORS:
        raise SnapshotError(f"{path}: the {what} has {len(header):,} tensors, more than the limit {MAX_TENSORS:,}")
    shapes, end = {}, 0
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in _SAFETENSORS_DTYPE_SIZES
              and isinstance(info.get("shape"), list) and all(type(d) is int and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(type(o) is int for o in info["data_offsets"]))
        if not ok:
            raise SnapshotError(f"{path}: not a {what} (bad header entry for tensor {_short_repr(name)})")
        begin, stop = info["data_offsets"]
        if not 0 <= begin <= stop or stop - begin != math.prod(info["shape"]) * _SAFETENSORS_DTYPE_SIZES[info["dtype"]]:
            raise SnapshotError(f"{path}: not a {what} (tensor {_short_repr(name)} has inconsistent offsets)")
        shapes[name] = tuple(info["shape"])
        end = max(end, stop)
    if 8 + n + end != size:
        raise SnapshotError(f"{path}: the {what} is truncated or has trailing data ({size:,} bytes, header says {8 + n + end:,})")

    def data():
        from safetensors.torch import load

        f.seek(0)
        try:
            return load(f.read())
        except Exception as e:
            raise SnapshotError(f"{path}: not a {what} ({type(e).__name__}: {_brief(e, 200)})") from None

    return metadata, shapes, data


def _metadata_kwargs(metadata, path, what):
    try:
        kwargs = json.loads(metadata.get("init_kwargs", ""))
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"{path}: the {what}'s init_kwargs metadata is not readable JSON ({_brief(e, 120)})") from None
    if not isinstance(kwargs, dict):
        raise SnapshotError(f"{path}: the {what}'s init_kwargs metadata is not a JSON object")
    return _plain(kwargs, f"{what}'s constructor arguments")


# --------------------------------------------------------------------------------------------------
# The conversion cache.


def _save_cache(net, class_name, init_kwargs, path: Path, source_sha256: str):
    """Write the cache atomically: a fresh temporary file in the same folder (``OSError`` when the folder is
    not writable), then ``os.replace``. Raises ``OSError`` or safetensors' ``SafetensorError``."""
    import tempfile

    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {"class_name": class_name, "init_kwargs": json.dumps(init_kwargs), "source_sha256": source_sha256,
                "tensors_sha256": _tensors_sha256(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _cache_warning(message: str):
    warnings.warn(_brief(message, 500), CacheWarning, stacklevel=3)


def _source_of_cache(path: Path) -> str | None:
    """The ``source_sha256`` a cache file names (header only), or None when it has none."""
    with _open_regular(path, "conversion cache") as f:
        metadata, _, _ = _read_safetensors(f, path, "conversion cache")
    return metadata.get("source_sha256")
