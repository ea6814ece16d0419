"""Safe loading of NVIDIA EDM network snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``).

EDM writes its snapshots with plain ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))``. Every EDM module pickles as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with

    meta = {type: 'class', version: 6, module_src: <source of the defining .py file>,
            class_name: <name>, state: <the object's __dict__>}

and EDM's own unpickling ``exec``s ``module_src``. We never do: a restricted unpickler turns each such call
into an inert :class:`PersistentRecord`, allows a short list of other globals (tensor rebuilding, plain
containers, numpy scalars) and refuses everything else by name. The network is then rebuilt from *our*
classes (:mod:`bdia.networks.edm`) with the recorded constructor arguments, and its parameters and buffers
are filled from the record tree with a strict ``load_state_dict``.

Untrusted input is bounded before anything expensive happens (see "Limits" below): the record tree's depth,
number of modules and tensors; the nesting and size of the constructor arguments (self-references refused);
each constructor argument's type and range; the network's parameter count, computed by building its U-Net
on the ``meta`` device (no memory); the tensors' declared bytes against the file's size; and every tensor
name and shape against that plan. Only then is the real network allocated. Every refusal is a
:class:`SnapshotError` whose message is one line naming the file and the argument or record at fault.

The conversion cache ``<snapshot>.bdia.safetensors`` goes through the same checks and also carries a sha256 of
its own tensors; a cache that is stale, truncated, unparsable, tampered with or refused is rebuilt from the
snapshot (with a one-line :class:`CacheWarning` when it was not merely stale), and a cache that cannot be
written (read-only folder) leaves the converted network in use without caching.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from ..download import NotARegularFileError, open_regular_file
from .edm import EDM_CLASSES, _make_unet
from .registry import resolve_checkpoint

__all__ = [
    "load_edm",
    "read_snapshot",
    "network_from_record",
    "load_safetensors_network",
    "load_network_file",
    "check_constructor_arguments",
    "plan_network",
    "PersistentRecord",
    "SnapshotError",
    "CacheWarning",
]

PERSISTENCE_VERSION = 6
CACHE_SUFFIX = ".bdia.safetensors"


class SnapshotError(RuntimeError):
    """A snapshot was refused or could not be read; the message (one line) says what and why."""


class CacheWarning(UserWarning):
    """The conversion cache was not used (damaged, tampered with, refused) or could not be written."""


def _brief(text, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters (for messages that quote other exceptions)."""
    line = re.sub(r"\s+", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short_repr(value, limit: int = 60) -> str:
    return _brief(repr(value) if not isinstance(value, torch.Tensor) else f"tensor{list(value.shape)}", limit)


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

#: The classes a snapshot's network (its ``ema`` entry), a conversion cache or a digits network may be.
PRECONDITIONERS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")


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


# --------------------------------------------------------------------------------------------------
# Constructor arguments: types and ranges, then the network planned on the meta device.

_INT_ARGS = {  # name: (smallest, largest)
    "img_resolution": (1, MAX_RESOLUTION),
    "img_channels": (1, MAX_IMAGE_CHANNELS),
    "label_dim": (0, MAX_LABEL_DIM),
    "augment_dim": (0, MAX_AUGMENT_DIM),
    "model_channels": (1, MAX_MODEL_CHANNELS),
    "channel_mult_emb": (1, MAX_CHANNEL_MULT_EMB),
    "channel_mult_noise": (1, MAX_CHANNEL_MULT_NOISE),
    "num_blocks": (0, MAX_NUM_BLOCKS),
    "M": (1, MAX_M),
}
_INT_LIST_ARGS = {  # name: (shortest, longest, smallest entry, largest entry)
    "channel_mult": (1, MAX_LEVELS, 1, MAX_CHANNEL_MULT),
    "attn_resolutions": (0, MAX_ATTN_RESOLUTIONS, 1, MAX_RESOLUTION),
}
_NUMBER_LIST_ARGS = {"resample_filter": (1, MAX_FILTER_TAPS)}
_NUMBER_ARGS = {  # name: infinity allowed
    "dropout": False, "label_dropout": False, "sigma_min": False, "sigma_max": True, "sigma_data": False,
    "beta_d": False, "beta_min": False, "epsilon_t": False, "C_1": False, "C_2": False,
}
_BOOL_ARGS = {"use_fp16"}
_CHOICE_ARGS = {
    "model_type": ("SongUNet", "DhariwalUNet"),
    "embedding_type": ("positional", "fourier"),
    "encoder_type": ("standard", "skip", "residual"),
    "decoder_type": ("standard", "skip"),
}


def _is_number(value, allow_inf=False) -> bool:
    if type(value) is int:
        return True
    return type(value) is float and not math.isnan(value) and (allow_inf or math.isfinite(value))


def check_constructor_arguments(class_name: str, kwargs) -> None:
    """Refuse (:class:`SnapshotError`, one line naming the argument) constructor arguments of a
    preconditioned EDM network that are of the wrong type or outside the limits of this module."""
    if class_name not in PRECONDITIONERS:
        known = _default_classes()
        if not isinstance(class_name, str) or class_name not in known:
            raise SnapshotError(f"unknown EDM class name {_short_repr(class_name)}; known: {sorted(known)}")
        raise SnapshotError(
            f"the network is a {_short_repr(class_name)}, not one of EDM's preconditioned networks {list(PRECONDITIONERS)}"
        )
    if not isinstance(kwargs, dict):
        raise SnapshotError(f"the constructor arguments are a {type(kwargs).__name__}, expected a dict")
    for name, value in kwargs.items():
        shown = f"constructor argument {name}={_short_repr(value)}"
        if name in _INT_ARGS:
            lo, hi = _INT_ARGS[name]
            if type(value) is not int:
                raise SnapshotError(f"{shown} must be an integer")
            if not lo <= value <= hi:
                raise SnapshotError(f"{shown} is outside the allowed range [{lo}, {hi}]")
        elif name in _INT_LIST_ARGS:
            shortest, longest, lo, hi = _INT_LIST_ARGS[name]
            if not isinstance(value, list) or any(type(v) is not int for v in value):
                raise SnapshotError(f"{shown} must be a list of integers")
            if not shortest <= len(value) <= longest:
                raise SnapshotError(f"{shown} must have {shortest} to {longest} entries")
            if any(not lo <= v <= hi for v in value):
                raise SnapshotError(f"{shown} has an entry outside the allowed range [{lo}, {hi}]")
        elif name in _NUMBER_LIST_ARGS:
            shortest, longest = _NUMBER_LIST_ARGS[name]
            if not isinstance(value, list) or not all(_is_number(v) for v in value):
                raise SnapshotError(f"{shown} must be a list of finite numbers")
            if not shortest <= len(value) <= longest:
                raise SnapshotError(f"{shown} must have {shortest} to {longest} entries")
        elif name in _NUMBER_ARGS:
            if not _is_number(value, allow_inf=_NUMBER_ARGS[name]):
                raise SnapshotError(f"{shown} must be a {'number' if _NUMBER_ARGS[name] else 'finite number'}")
        elif name in _BOOL_ARGS:
            if type(value) is not bool:
                raise SnapshotError(f"{shown} must be true or false")
        elif name in _CHOICE_ARGS:
            if value not in _CHOICE_ARGS[name] or type(value) is not str:
                raise SnapshotError(f"{shown} must be one of {list(_CHOICE_ARGS[name])}")
        else:
            raise SnapshotError(f"unknown constructor argument {_short_repr(name)} for {class_name}")


def plan_network(class_name: str, kwargs, classes=None) -> dict:
    """Names and shapes of the tensors (``state_dict``) the network ``class_name(**kwargs)`` has, found
    without allocating it: the arguments are checked (:func:`check_constructor_arguments`), the inner U-Net
    is built on the ``meta`` device, and a total above :data:`MAX_PARAMETERS` is refused."""
    check_constructor_arguments(class_name, kwargs)
    classes = classes or _default_classes()
    cls = classes.get(class_name)
    if cls is None:
        raise SnapshotError(f"unknown EDM class name {class_name!r}; known: {sorted(classes)}")
    # What _Preconditioned._add_unet passes to the U-Net; the preconditioners' own arguments are their named
    # parameters, the rest is **model_kwargs. iDDPMPrecond's U-Net also outputs the learned variance and the
    # class holds the u buffer (M + 1 levels).
    params = inspect.signature(cls.__init__).parameters
    own = [n for n, p in list(params.items())[1:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
    missing = [n for n in own if n not in kwargs and params[n].default is inspect.Parameter.empty]
    if missing:
        raise SnapshotError(f"cannot build {class_name}: constructor argument(s) {missing} are missing")
    args = {n: kwargs.get(n, params[n].default) for n in own}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in own}
    wide = class_name == "iDDPMPrecond"
    try:
        with torch.device("meta"):
            unet = _make_unet(
                args["model_type"], img_resolution=args["img_resolution"], in_channels=args["img_channels"],
                out_channels=args["img_channels"] * (2 if wide else 1), label_dim=args["label_dim"], **model_kwargs,
            )
    except Exception as e:
        raise SnapshotError(f"cannot build {class_name} from the recorded constructor arguments: {_brief(e)}") from None
    shapes = {f"model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    if wide:
        shapes["u"] = (args["M"] + 1,)
    count = sum(math.prod(s) for s in shapes.values())
    if count > MAX_PARAMETERS:
        raise SnapshotError(
            f"{class_name} with the recorded constructor arguments would hold {count:,} parameters and buffers, "
            f"more than the limit {MAX_PARAMETERS:,}; refused before allocating it"
        )
    return shapes


def _check_fit(class_name: str, planned: dict, shapes: dict) -> None:
    """The tensors found (name -> shape) must be exactly those of the planned network."""
    missing = [k for k in planned if k not in shapes]
    unexpected = [k for k in shapes if k not in planned]
    wrong = [f"'{k}' has shape {list(shapes[k])}, expected {list(planned[k])}"
             for k in planned if k in shapes and tuple(shapes[k]) != tuple(planned[k])]
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected {[_short_repr(k) for k in unexpected[:3]]}"
                        + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    problems += wrong[:3]
    if problems:
        raise SnapshotError(f"the snapshot's tensors do not fit {class_name}: {'; '.join(problems)}")


def _default_classes():
    return EDM_CLASSES


def _build(class_name, init_kwargs, state_dict, classes):
    cls = classes.get(class_name)
    if cls is None:
        raise SnapshotError(f"unknown EDM class name {class_name!r}; known: {sorted(classes)}")
    try:
        net = cls(**init_kwargs)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"cannot build {class_name} from the recorded constructor arguments: {_brief(e)}") from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise SnapshotError(f"the snapshot's tensors do not fit {class_name}: {_brief(e)}") from None
    return net.eval().requires_grad_(False)


def network_from_record(record: PersistentRecord, classes=None, file_size: int | None = None):
    """Build our module for an EDM persistent record (the snapshot's ``ema`` entry), checking everything
    against the limits first. ``file_size``: the snapshot's size in bytes; the tensors may not declare more."""
    classes = classes or _default_classes()
    if not isinstance(record, PersistentRecord):
        raise SnapshotError(f"expected an EDM network record, got {type(record).__name__}")
    state = record.state
    init_args = _field(state, "_init_args")
    if init_args is None:
        init_args = ()
    if not isinstance(init_args, (tuple, list)):
        raise SnapshotError(f"{record.class_name!r} has _init_args of type {type(init_args).__name__}, expected a tuple")
    if init_args:
        raise SnapshotError(f"{record.class_name!r} was recorded with positional arguments, which EDM networks do not use")
    recorded = _field(state, "_init_kwargs")
    _mapping(recorded, "_init_kwargs")  # a dict (or None)
    init_kwargs = _plain(recorded if recorded is not None else {})
    check_constructor_arguments(record.class_name, init_kwargs)
    tensors = _collect_tensors(record, classes)
    declared = sum(t.numel() * t.element_size() for t in tensors.values())
    if file_size is not None and declared > file_size:
        raise SnapshotError(
            f"the snapshot's tensors declare {declared:,} bytes, more than the file's {file_size:,} bytes "
            "(tensors repeating or overlapping stored data; EDM never writes such tensors)"
        )
    planned = plan_network(record.class_name, init_kwargs, classes)
    _check_fit(record.class_name, planned, {k: tuple(t.shape) for k, t in tensors.items()})
    return _build(record.class_name, init_kwargs, tensors, classes), init_kwargs


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


def load_safetensors_network(path, default_class: str = "EDMPrecond", allowed=PRECONDITIONERS,
                             what: str = "network file", classes=None, verify_sha256: str | None = "auto"):
    """A network saved as safetensors with ``class_name`` and ``init_kwargs`` (JSON) metadata (the
    conversion cache; networks written by ``scripts/train.py``), checked like a snapshot before allocation.

    Returns ``(net, metadata)``. ``verify_sha256``: ``"auto"`` checks the ``tensors_sha256`` metadata when
    present; ``"required"`` refuses a file without it. Raises :class:`SnapshotError` (one line)."""
    path = Path(path)
    classes = classes or _default_classes()
    with _open_regular(path, what) as f:
        metadata, shapes, data = _read_safetensors(f, path, what)
        class_name = metadata.get("class_name", default_class)
        if class_name not in allowed:
            raise SnapshotError(f"{path}: the {what} holds a {_short_repr(class_name)}, expected one of {list(allowed)}")
        kwargs = _metadata_kwargs(metadata, path, what)
        try:
            planned = plan_network(class_name, kwargs, classes)
            _check_fit(class_name, planned, shapes)
        except SnapshotError as e:
            raise SnapshotError(f"{path}: {e}") from None
        expected = metadata.get("tensors_sha256")
        if expected is None and verify_sha256 == "required":
            raise SnapshotError(f"{path}: the {what} carries no tensors_sha256")
        tensors = data()
    if expected is not None and verify_sha256 and _tensors_sha256(tensors) != expected:
        raise SnapshotError(f"{path}: the {what}'s tensors do not match its tensors_sha256 (edited or damaged)")
    try:
        return _build(class_name, kwargs, tensors, classes), metadata
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None


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


def _load_cached(path: Path, source_sha256: str, classes):
    """The cached network, or None: silently when the cache is stale (the snapshot changed), with a
    :class:`CacheWarning` when it is damaged, edited, refused by the checks or lacks its tensors' hash."""
    try:
        if _source_of_cache(path) != source_sha256:
            return None  # stale: the snapshot changed since conversion
        net, _ = load_safetensors_network(path, what="conversion cache", classes=classes, verify_sha256="required")
        return net
    except SnapshotError as e:
        _cache_warning(f"ignored the conversion cache: {e}; rebuilding it from the snapshot")
    except Exception as e:  # e.g. I/O errors: the snapshot is still there to rebuild from
        _cache_warning(f"ignored the conversion cache {path} ({type(e).__name__}: {_brief(e, 200)}); rebuilding it from the snapshot")
    return None


def load_edm(source, device="cpu", cache: bool = True, classes=None, config_key: str = "model.path"):
    """Load an EDM network snapshot as our own module, without executing any code from the file.

    ``source``: a registry name (``"edm-cifar10-32x32-cond-vp"``), a URL, or a local ``.pkl`` path (a regular
    file: directories, FIFOs and devices are refused before reading).
    The converted network is cached as ``<snapshot>.bdia.safetensors`` beside the snapshot (written
    atomically, only after a successful conversion) and reused while the snapshot's sha256 and the cache's
    own ``tensors_sha256`` match; a damaged cache is rebuilt, an unwritable one skipped (:class:`CacheWarning`).
    Returns the preconditioned network (``EDMPrecond`` …) in eval mode on ``device``.
    Raises :class:`SnapshotError` (one line) for anything refused.
    """
    classes = classes or _default_classes()
    path = Path(source)
    if not path.exists():
        path = Path(resolve_checkpoint(str(source), config_key=config_key))
    cache_path = path.with_name(path.name + CACHE_SUFFIX)
    with _open_regular(path, "EDM snapshot") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        digest = h.hexdigest()
        cache_usable = True
        if cache and cache_path.exists():
            if not cache_path.is_file():
                cache_usable = False
                _cache_warning(f"{cache_path} is not a regular file; the conversion cache is neither read nor written")
            else:
                net = _load_cached(cache_path, digest, classes)
                if net is not None:
                    return net.to(device)
        snapshot = read_snapshot(path, f)
    record = dict.get(snapshot, "ema") if isinstance(snapshot, dict) else snapshot
    if record is None:
        keys = sorted(_short_repr(k, 30) for k in list(snapshot)[:20])
        raise SnapshotError(f"{path}: the snapshot has no 'ema' network (keys: {keys})")
    try:
        net, init_kwargs = network_from_record(record, classes, file_size=size)
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    if cache and cache_usable:
        from safetensors import SafetensorError

        try:
            _save_cache(net, record.class_name, init_kwargs, cache_path, digest)
        except (OSError, SafetensorError) as e:  # read-only folder, disk full: the network is still good
            _cache_warning(
                f"could not write the conversion cache {cache_path} ({type(e).__name__}: {_brief(getattr(e, 'strerror', None) or e, 120)}); "
                "using the converted network without caching"
            )
    return net.to(device)


def load_network_file(path):
    """A network saved by :func:`bdia.train.save_network` (``EDMPrecond``, eval mode, no gradients). The file is
    untrusted input: its size, header, constructor arguments and tensor shapes are checked before the network is
    allocated (:func:`load_safetensors_network`); refusals raise the one-line :class:`SnapshotError`."""
    net, _ = load_safetensors_network(path, default_class="EDMPrecond", allowed=("EDMPrecond",), what="network file")
    return net
