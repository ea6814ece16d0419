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
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_edm", "read_snapshot", "network_from_record", "PersistentRecord", "SnapshotError"]

PERSISTENCE_VERSION = 6
CACHE_SUFFIX = ".bdia.safetensors"


class SnapshotError(RuntimeError):
    """A snapshot was refused or could not be read; the message says what and why."""


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, kept as data. ``module_src`` is kept only
    as text (and its hash); it is never executed."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise SnapshotError(f"persistent-object record is a {type(meta).__name__}, expected a dict")
        missing = {"type", "version", "module_src", "class_name", "state"} - set(meta)
        if missing:
            raise SnapshotError(f"persistent-object record lacks {sorted(missing)}")
        if meta["type"] != "class" or meta["version"] != PERSISTENCE_VERSION:
            raise SnapshotError(
                f"unsupported persistent record (type={meta['type']!r}, version={meta['version']!r}); "
                f"EDM snapshots use type 'class', version {PERSISTENCE_VERSION}"
            )
        if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
            raise SnapshotError("persistent record has a non-string class_name or module_src")
        if not isinstance(meta["state"], dict):
            raise SnapshotError(f"record {meta['class_name']!r} has a state of type {type(meta['state']).__name__}")
        self.class_name: str = meta["class_name"]
        self.module_src_sha256 = hashlib.sha256(meta["module_src"].encode()).hexdigest()
        self.state = meta["state"]

    def __repr__(self):
        return f"PersistentRecord({self.class_name!r})"


class ContainerRecord:
    """An ``nn.ModuleDict`` / ``nn.ModuleList`` / ``nn.Sequential`` child, kept as data."""

    class_name = "container"

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

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _load_storage_from_bytes(data: bytes):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False); we use torch's restricted path.
    if not isinstance(data, (bytes, bytearray)):
        raise SnapshotError("tensor storage record is not a byte string")
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
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
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


def read_snapshot(path) -> object:
    """Unpickle an EDM snapshot without executing any of its code; persistent objects come back as
    :class:`PersistentRecord`. Raises :class:`SnapshotError` for refused globals and unreadable files."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, RuntimeError, AttributeError) as e:
        raise SnapshotError(
            f"{path}: not a readable EDM snapshot (truncated or corrupt pickle: {type(e).__name__}: {e})"
        ) from None


def _collect_tensors(record, prefix, classes, out):
    """Flatten a record tree into ``state_dict`` form, checking every class name on the way."""
    name = record.class_name
    if isinstance(record, PersistentRecord) and name not in classes:
        raise SnapshotError(f"unknown EDM class name {name!r} at '{prefix or '<root>'}'; known: {sorted(classes)}")
    state = record.state
    for group in ("_parameters", "_buffers"):
        for key, tensor in (state.get(group) or {}).items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise SnapshotError(f"'{prefix}{key}' is a {type(tensor).__name__}, not a tensor")
            out[prefix + key] = tensor
    for key, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ContainerRecord)):
            raise SnapshotError(f"submodule '{prefix}{key}' is a {type(child).__name__}, not an EDM module record")
        _collect_tensors(child, f"{prefix}{key}.", classes, out)
    return out


def _plain(value):
    """Constructor arguments as plain JSON-able containers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise SnapshotError(f"unsupported constructor argument of type {type(value).__name__}")


def _default_classes():
    from . import edm

    return edm.EDM_CLASSES


def _build(class_name, init_kwargs, state_dict, classes):
    cls = classes.get(class_name)
    if cls is None:
        raise SnapshotError(f"unknown EDM class name {class_name!r}; known: {sorted(classes)}")
    try:
        net = cls(**init_kwargs)
    except TypeError as e:
        raise SnapshotError(f"cannot build {class_name} from the recorded constructor arguments: {e}") from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise SnapshotError(f"the snapshot's tensors do not fit {class_name}{init_kwargs}: {e}") from None
    return net.eval().requires_grad_(False)


def network_from_record(record: PersistentRecord, classes=None):
    """Build our module for an EDM persistent record (the snapshot's ``ema`` entry)."""
    classes = classes or _default_classes()
    if not isinstance(record, PersistentRecord):
        raise SnapshotError(f"expected an EDM network record, got {type(record).__name__}")
    state = record.state
    init_args = state.get("_init_args") or ()
    if init_args:
        raise SnapshotError(f"{record.class_name} was recorded with positional arguments, which EDM networks do not use")
    init_kwargs = _plain(dict(state.get("_init_kwargs") or {}))
    tensors = _collect_tensors(record, "", classes, collections.OrderedDict())
    return _build(record.class_name, init_kwargs, tensors, classes), init_kwargs


def _atomic_save_safetensors(net, class_name, init_kwargs, path: Path, source_sha256: str):
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    metadata = {"class_name": class_name, "init_kwargs": json.dumps(init_kwargs), "source_sha256": source_sha256}
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_cached(path: Path, source_sha256: str, classes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("source_sha256") != source_sha256:
            return None  # stale: the snapshot changed since conversion
        tensors = load_file(str(path))
        return _build(metadata["class_name"], json.loads(metadata["init_kwargs"]), tensors, classes)
    except (OSError, KeyError, ValueError, SnapshotError):
        return None


def load_edm(source, device="cpu", cache: bool = True, classes=None, config_key: str = "model.path"):
    """Load an EDM network snapshot as our own module, without executing any code from the file.

    ``source``: a registry name (``"edm-cifar10-32x32-cond-vp"``), a URL, or a local ``.pkl`` path.
    The converted network is cached as ``<snapshot>.bdia.safetensors`` beside the snapshot (written
    atomically, only after a successful conversion) and reused while the snapshot's sha256 matches.
    Returns the preconditioned network (``EDMPrecond`` …) in eval mode on ``device``.
    """
    classes = classes or _default_classes()
    path = Path(source)
    if not path.exists():
        from ..download import resolve_checkpoint

        path = Path(resolve_checkpoint(str(source), config_key=config_key))
    digest = _sha256(path)
    cache_path = path.with_name(path.name + CACHE_SUFFIX)
    if cache and cache_path.exists():
        net = _load_cached(cache_path, digest, classes)
        if net is not None:
            return net.to(device)
    snapshot = read_snapshot(path)
    record = snapshot.get("ema") if isinstance(snapshot, dict) else snapshot
    if record is None:
        raise SnapshotError(f"{path}: the snapshot has no 'ema' network (keys: {sorted(snapshot)})")
    try:
        net, init_kwargs = network_from_record(record, classes)
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    if cache:
        _atomic_save_safetensors(net, record.class_name, init_kwargs, cache_path, digest)
    return net.to(device)
