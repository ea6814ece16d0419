"""The restricted, bounded reader of NVIDIA EDM network snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``):
the file's bytes become inert records, never code. What network the records describe, and whether it may be
built, is decided by :mod:`bdia.networks.loader`.

EDM writes its snapshots with plain ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))``. Every EDM module pickles as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with

    meta = {type: 'class', version: 6, module_src: <source of the defining .py file>,
            class_name: <name>, state: <the object's __dict__>}

and EDM's own unpickling ``exec``s ``module_src``. We never do: a restricted unpickler turns each such call
into an inert :class:`PersistentRecord`, allows a short list of other globals (tensor rebuilding, plain
containers, numpy scalars) and refuses everything else by name.

Trust conventions (the snapshot is untrusted input):

* Nothing named by the file is imported or run: a global outside ``_ALLOWED_GLOBALS`` is refused. EDM's
  reconstructor name resolves to a function, so a crafted NEWOBJ cannot create a :class:`PersistentRecord`
  without its checks, and a BUILD opcode cannot overwrite a record's fields or give an ``EasyDict``
  attributes. Tensor storages nested in the pickle are read by ``torch.load(weights_only=True)``, and only
  after a compressed (deflated) archive, which could expand far beyond the file's size, has been refused.
* Untrusted dicts are read with dict's own methods (``dict.get(d, k)``, ``dict.items(d)``): a pickled
  ``OrderedDict`` may carry instance attributes named ``get`` or ``items``.
* Walking the record tree (:func:`_collect_tensors`) and converting the constructor arguments
  (:func:`_plain`) are bounded: depth, number of records, tensors and values; records or containers met
  twice (shared or self-referencing) are refused.
* The "Limits" below bound all untrusted input of :mod:`bdia.networks` (snapshots, conversion caches,
  network files); they live here because this is the lowest module that needs them.
* Every refusal is a :class:`SnapshotError` whose message is one line; callers prefix the file's path.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import pickle
import re
import types
from pathlib import Path

import numpy as np
import torch

from ..download import NotARegularFileError, open_regular_file

__all__ = [
    "read_snapshot",
    "PersistentRecord",
    "SnapshotError",
]

PERSISTENCE_VERSION = 6


class SnapshotError(RuntimeError):
    """A snapshot was refused or could not be read; the message (one line) says what and why."""


def _brief(text, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters (for messages that quote other exceptions)."""
    line = re.sub(r"\s+", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short_repr(value, limit: int = 60) -> str:
    if isinstance(value, torch.Tensor):
        return _brief(f"tensor{list(value.shape)}", limit)
    try:
        return _brief(repr(value), limit)
    except RecursionError:  # a crafted value nested too deeply for repr (a 100000-deep tuple)
        return f"<a {type(value).__name__} nested too deeply to show>"


# --------------------------------------------------------------------------------------------------
# Limits. Derived from the largest networks NVIDIA publishes (bdia.networks.registry; EDM's train.py):
#   ImageNet-64 ADM (DhariwalUNet): model_channels 192, channel_mult [1, 2, 3, 4], num_blocks 3,
#     attn_resolutions [32, 16, 8], channel_mult_emb 4, label_dim 1000: about 295.9 million parameters, 553 tensors,
#     317 modules, record depth 5 (precond > U-Net > ModuleDict > block > layer);
#   CIFAR-10 / FFHQ / AFHQv2 DDPM++ / NCSN++ (SongUNet): model_channels 128, channel_mult [2, 2, 2] or
#     [1, 2, 2, 2], num_blocks 4, attn_resolutions [16], channel_mult_noise 1 or 2, augment_dim 9,
#     resample_filter [1, 1] or [1, 3, 3, 1], 32 or 64 pixels; iDDPMPrecond's M = 1000.
# Each limit is a generous multiple of those (so retrained or larger variants still load), small enough that
# a file cannot make us allocate more than a few GB or loop for long.
MAX_RESOLUTION = 1024  # img_resolution, attn_resolutions entries: 16x the largest published (64)
MAX_IMAGE_CHANNELS = 64  # img_channels: ~21x RGB's 3 (latent-space models use 4)
MAX_LABEL_DIM = 100_000  # label_dim: 100x ImageNet's 1000 classes
MAX_AUGMENT_DIM = 1024  # augment_dim: >100x EDM's 9 augmentation labels
MAX_MODEL_CHANNELS = 1024  # model_channels: ~5x ADM's 192 (DDPM++ / NCSN++: 128)
MAX_CHANNEL_MULT = 16  # each channel_mult entry: 4x ADM's largest (4)
MAX_LEVELS = 8  # len(channel_mult): 2x the 4 levels of the 64-pixel models
MAX_CHANNEL_MULT_EMB = 16  # channel_mult_emb: 4x EDM's 4
MAX_CHANNEL_MULT_NOISE = 8  # channel_mult_noise: 4x NCSN++'s 2
MAX_NUM_BLOCKS = 16  # num_blocks: 4x DDPM++'s 4
MAX_ATTN_RESOLUTIONS = 16  # len(attn_resolutions): >5x ADM's 3
MAX_FILTER_TAPS = 16  # len(resample_filter): 4x NCSN++'s [1, 3, 3, 1]
MAX_M = 10_000  # iDDPMPrecond's M (its u buffer is built by an M-step loop): 10x EDM's 1000
MAX_PARAMETERS = 2_000_000_000  # parameters + buffers: ~6.8x ADM's 295.9M; 8 GB in float32
MAX_TENSORS = 10_000  # tensors in a snapshot or cache: ~18x ADM's 553
MAX_MODULE_RECORDS = 10_000  # module records in a snapshot: ~30x ADM's 317
MAX_RECORD_DEPTH = 16  # nesting of module records: >3x EDM's 5
MAX_ARGUMENT_DEPTH = 4  # nesting of plain containers in the constructor arguments: 2x EDM's 2 (a list in a dict)
MAX_ARGUMENT_ITEMS = 10_000  # values in the constructor arguments all together: EDM's are ~25
MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of a safetensors JSON header: ADM's is ~70 KB


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, kept as data. ``module_src`` is kept only
    as text (and its hash); it is never executed."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise SnapshotError(f"persistent-object record is a {type(meta).__name__}, expected a dict")
        missing = {"type", "version", "module_src", "class_name", "state"} - set(meta)
        if missing:
            raise SnapshotError(f"persistent-object record lacks {sorted(missing)}")
        kind, version = meta["type"], meta["version"]
        if not (type(kind) is str and kind == "class" and type(version) is int and version == PERSISTENCE_VERSION):
            raise SnapshotError(
                f"unsupported persistent record (type={_short_repr(kind)}, version={_short_repr(version)}); "
                f"EDM snapshots use type 'class', version {PERSISTENCE_VERSION}"
            )
        if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
            raise SnapshotError("persistent record has a non-string class_name or module_src")
        if not isinstance(meta["state"], dict):
            raise SnapshotError(f"record {_short_repr(meta['class_name'])} has a state of type {type(meta['state']).__name__}")
        self.class_name: str = meta["class_name"]
        self.module_src_sha256 = hashlib.sha256(meta["module_src"].encode()).hexdigest()
        self.state = meta["state"]

    def __setstate__(self, state):  # a crafted BUILD opcode must not replace the checked fields
        raise SnapshotError("refused a persistent record whose fields are overwritten after construction")

    def __repr__(self):
        return f"PersistentRecord({self.class_name!r})"


def _reconstruct_persistent_obj(meta):
    # What the pickle's name for EDM's reconstructor resolves to: a function, not the class, so that a crafted
    # NEWOBJ opcode cannot create a PersistentRecord without running (and passing) its checks.
    return PersistentRecord(meta)


class ContainerRecord:
    """An ``nn.ModuleDict`` / ``nn.ModuleList`` / ``nn.Sequential`` child, kept as data."""

    class_name = "container"
    state = types.MappingProxyType({})  # created by NEWOBJ without a BUILD: no children, no tensors

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise SnapshotError("container module with a non-dict state")
        self.state = state


def _container(name):
    return type(name, (ContainerRecord,), {"class_name": name})


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

    def __setstate__(self, state):  # EasyDicts pickle without instance state; refuse attributes smuggled in
        if state:
            raise SnapshotError("refused an EasyDict with instance attributes")

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _check_stored_zip(data):
    """Refuse a nested ``torch.save`` archive with compressed entries (a few KB of deflated zeros would
    expand to GB of storage: memory not paid for by the file's size) or entries larger than the archive."""
    import zipfile

    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SnapshotError(f"a tensor storage inside the snapshot is not a readable archive ({_brief(e, 120)})") from None
    if len(entries) > MAX_TENSORS + 16:
        raise SnapshotError(f"a tensor storage inside the snapshot is an archive of {len(entries):,} entries")
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise SnapshotError("a tensor storage inside the snapshot is compressed (torch.save never compresses; "
                            "refused: it could expand far beyond the file's size)")
    if sum(e.file_size for e in entries) > len(data):
        raise SnapshotError("a tensor storage inside the snapshot declares more bytes than it holds")


def _load_storage_from_bytes(data: bytes):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False); we use torch's restricted path.
    if not isinstance(data, (bytes, bytearray)):
        raise SnapshotError("tensor storage record is not a byte string")
    if bytes(data[:2]) == b"PK":  # torch.save's zip format: it writes every entry uncompressed ("stored")
        _check_stored_zip(data)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise SnapshotError(f"a tensor storage inside the snapshot could not be read safely: {e}") from e


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise SnapshotError("parameter record does not hold a tensor")
    return data  # plain tensors: we only need the values


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise SnapshotError(f"refused numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item() if data is not None else dtype.type()


def _numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise SnapshotError("refused numpy object dtype")
    return dtype


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): _container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _container("Sequential"),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise SnapshotError(
                f"refused to load global '{module}.{name}': it is not on the list of objects an EDM network "
                f"snapshot needs, so the file may be tampered with or is not an EDM snapshot"
            ) from None

    def persistent_load(self, pid):
        raise SnapshotError("refused a pickle persistent id (EDM snapshots have none; torch.save files are not EDM snapshots)")


def _open_regular(path: Path, what: str):
    """``open_regular_file`` with its refusals and OS errors as one-line :class:`SnapshotError`."""
    try:
        return open_regular_file(path, what)
    except NotARegularFileError as e:
        raise SnapshotError(str(e)) from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open the {what} ({_brief(e.strerror or e)})") from None


def _unpickle(f, path) -> object:
    try:
        return _RestrictedUnpickler(f).load()
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    except Exception as e:  # anything else raised while reading untrusted bytes means a damaged file
        raise SnapshotError(
            f"{path}: not a readable EDM snapshot (truncated or corrupt pickle: {type(e).__name__}: {_brief(e, 200)})"
        ) from None


def _no_deep_recursion(fn):
    """Turn a RecursionError (hashing or comparing a crafted, deeply nested value) into a refusal."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecursionError:
            raise SnapshotError("the snapshot holds a value nested too deeply to examine (limit: Python's recursion "
                                "depth)") from None

    return wrapper


def read_snapshot(path, file=None) -> object:
    """Unpickle an EDM snapshot without executing any of its code; persistent objects come back as
    :class:`PersistentRecord`. Raises :class:`SnapshotError` for refused globals, unreadable files and
    anything that is not a regular file (directories, FIFOs, devices). ``file``: the snapshot already opened
    (by :func:`load_edm`, which hashed it first), read from its start; ``path`` then only names it."""
    path = Path(path)
    if file is not None:
        file.seek(0)
        return _unpickle(file, path)
    with _open_regular(path, "EDM snapshot") as f:
        return _unpickle(f, path)


# --------------------------------------------------------------------------------------------------
# The record tree and the constructor arguments, walked with bounds.

_KEY = re.compile(r"[A-Za-z0-9_]{1,100}")


# Untrusted dicts are read with dict's own methods (``dict.get(d, k)``, ``dict.items(d)``): an OrderedDict from a
# pickle may carry instance attributes named ``get`` or ``items`` that would shadow the methods.


def _mapping(value, where: str) -> list:
    """The (key, value) pairs of an untrusted dict (``None`` = empty)."""
    if value is None:
        return []
    if not isinstance(value, (dict, types.MappingProxyType)):
        raise SnapshotError(f"'{where}' is a {type(value).__name__}, expected a dict")
    return list(dict.items(value) if isinstance(value, dict) else value.items())


def _field(state, key):
    return dict.get(state, key) if isinstance(state, dict) else state.get(key)


def _check_key(key, where: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise SnapshotError(f"invalid name {_short_repr(key)} in '{where}' (EDM names are letters, digits and '_')")
    return key


@_no_deep_recursion
def _collect_tensors(record, classes) -> "collections.OrderedDict[str, torch.Tensor]":
    """Flatten a record tree into ``state_dict`` form, checking every class name on the way. Iterative, with
    bounded depth, number of records and number of tensors; a record met twice (shared or self-referencing,
    which EDM never writes) is refused."""
    out = collections.OrderedDict()
    seen = set()
    stack = [(record, "", 1)]
    while stack:
        rec, prefix, depth = stack.pop()
        where = prefix[:-1] or "<root>"
        if id(rec) in seen:
            raise SnapshotError(f"module record '{where}' appears more than once (shared or self-referencing)")
        seen.add(id(rec))
        if len(seen) > MAX_MODULE_RECORDS:
            raise SnapshotError(f"the snapshot has more than {MAX_MODULE_RECORDS} module records (limit)")
        if depth > MAX_RECORD_DEPTH:
            raise SnapshotError(f"module records are nested deeper than {MAX_RECORD_DEPTH} levels at '{where}' (limit)")
        name = rec.class_name
        if isinstance(rec, PersistentRecord) and name not in classes:
            raise SnapshotError(f"unknown EDM class name {_short_repr(name)} at '{where}'; known: {sorted(classes)}")
        state = rec.state
        for group in ("_parameters", "_buffers"):
            for key, tensor in _mapping(_field(state, group), f"{where}.{group}"):
                full = prefix + _check_key(key, f"{where}.{group}")
                if tensor is None:
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise SnapshotError(f"'{full}' is a {type(tensor).__name__}, not a tensor")
                if full in out:
                    raise SnapshotError(f"tensor '{full}' appears twice")
                out[full] = tensor
                if len(out) > MAX_TENSORS:
                    raise SnapshotError(f"the snapshot has more than {MAX_TENSORS} tensors (limit)")
        children = []
        for key, child in _mapping(_field(state, "_modules"), f"{where}._modules"):
            full = prefix + _check_key(key, f"{where}._modules")
            if child is None:
                continue
            if not isinstance(child, (PersistentRecord, ContainerRecord)):
                raise SnapshotError(f"submodule '{full}' is a {type(child).__name__}, not an EDM module record")
            children.append((child, full + ".", depth + 1))
        stack.extend(reversed(children))
    return out


@_no_deep_recursion
def _plain(value, what: str = "constructor arguments"):
    """Constructor arguments as plain JSON-able containers: dicts with string keys, lists, str, int, float,
    bool, None (numpy scalars become Python ones). Nesting depth, total number of values and self-references
    are bounded, so a crafted nest of shared lists cannot make the conversion explode."""
    budget = [MAX_ARGUMENT_ITEMS]

    def convert(v, depth, path_ids):
        budget[0] -= 1
        if budget[0] < 0:
            raise SnapshotError(f"the {what} hold more than {MAX_ARGUMENT_ITEMS} values (limit)")
        if isinstance(v, (dict, list, tuple)):
            if id(v) in path_ids:
                raise SnapshotError(f"the {what} contain a container that includes itself")
            if depth >= MAX_ARGUMENT_DEPTH:
                raise SnapshotError(f"the {what} are nested deeper than {MAX_ARGUMENT_DEPTH} levels (limit)")
            inner = path_ids | {id(v)}
            if isinstance(v, dict):
                result = {}
                for k, item in dict.items(v):
                    if not isinstance(k, str):
                        raise SnapshotError(f"the {what} have a key {_short_repr(k)} that is not a string")
                    result[k] = convert(item, depth + 1, inner)
                return result
            return [convert(item, depth + 1, inner) for item in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, np.generic):
            return convert(v.item(), depth, path_ids)
        raise SnapshotError(f"unsupported value of type {type(v).__name__} in the {what}")

    return convert(value, 0, frozenset())
