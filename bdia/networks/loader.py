"""Safe loading of NVIDIA EDM network snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``) and safetensors
network files as our own modules: :func:`load_edm`, :func:`load_network_file`. It composes the restricted
snapshot reader (:mod:`bdia.networks.snapshot`) and the safetensors files of the conversion cache
(:mod:`bdia.networks.cache`) with the checks on what the file asks us to build.

The network is rebuilt from *our* classes (:mod:`bdia.networks.edm`) with the recorded constructor
arguments, and its parameters and buffers are filled from the record tree with a strict ``load_state_dict``.
Untrusted input is bounded before anything expensive happens (the limits are in :mod:`bdia.networks.snapshot`):
the record tree's depth, number of modules and tensors; the nesting and size of the constructor arguments
(self-references refused); each constructor argument's type and range; the network's parameter count,
computed by building its U-Net on the ``meta`` device (no memory); the tensors' declared bytes against the
file's size; and every tensor name and shape against that plan. Only then is the real network allocated.
Every refusal is a :class:`SnapshotError` whose message is one line naming the file and the argument or
record at fault.

The conversion cache ``<snapshot>.bdia.safetensors`` goes through the same checks and also carries a sha256 of
its own tensors; a cache that is stale, truncated, unparsable, tampered with or refused is rebuilt from the
snapshot (with a one-line :class:`CacheWarning` when it was not merely stale), and a cache that cannot be
written (read-only folder) leaves the converted network in use without caching.

Conventions that bite:

* :func:`_build` is the only place a real network is allocated, always after
  :func:`check_constructor_arguments`, :func:`plan_network` and :func:`_check_fit`. The tests replace
  ``_build`` and ``read_snapshot`` on this module (to prove that a refusal comes before any allocation, and
  that a valid cache is used without unpickling the snapshot), so every function that calls them lives here
  and finds them as this module's globals.
* The names other modules and the tests import from here (``SnapshotError``, ``read_snapshot``,
  ``PersistentRecord``, ``CacheWarning``, ``CACHE_SUFFIX``, the limits) are re-exported from the modules that
  define them.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from pathlib import Path

import torch

from .cache import (
    CACHE_SUFFIX,
    CacheWarning,
    _cache_warning,
    _metadata_kwargs,
    _read_safetensors,
    _save_cache,
    _source_of_cache,
    _tensors_sha256,
)
from .edm import EDM_CLASSES, _make_unet
from .registry import resolve_checkpoint
from .snapshot import (
    MAX_ATTN_RESOLUTIONS,
    MAX_AUGMENT_DIM,
    MAX_CHANNEL_MULT,
    MAX_CHANNEL_MULT_EMB,
    MAX_CHANNEL_MULT_NOISE,
    MAX_FILTER_TAPS,
    MAX_IMAGE_CHANNELS,
    MAX_LABEL_DIM,
    MAX_LEVELS,
    MAX_M,
    MAX_MODEL_CHANNELS,
    MAX_NUM_BLOCKS,
    MAX_PARAMETERS,
    MAX_RESOLUTION,
    MAX_TENSORS,
    PersistentRecord,
    SnapshotError,
    _brief,
    _collect_tensors,
    _field,
    _mapping,
    _open_regular,
    _plain,
    _short_repr,
    read_snapshot,
)

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
    # limits, re-exported from bdia.networks.snapshot
    "MAX_PARAMETERS",
    "MAX_TENSORS",
]

#: The classes a snapshot's network (its ``ema`` entry), a conversion cache or a digits network may be.
PRECONDITIONERS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")


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


def load_edm(source, device="cpu", cache: bool = True, classes=None, config_key: str = "source"):
    """Load an EDM network snapshot as our own module, without executing any code from the file.

    ``source``: a registry name (``"edm-cifar10-32x32-cond-vp"``), a URL, or a local ``.pkl`` path (a regular
    file: directories, FIFOs and devices are refused before reading). ``config_key``: what error messages tell
    the user to set to a local file (``source`` here; the apps pass their config key, ``model.path``).
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
