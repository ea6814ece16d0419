"""Denoisers from model configs (``configs/sample/model/``): plain functions that Hydra's ``_target_`` points at.

* :func:`edm_network` — one of NVIDIA's published EDM networks (:mod:`bdia.networks.registry`) by name,
  downloaded into the cache on first use, or a local snapshot (``model.path=/data/edm.pkl``);
* :func:`digits_network` — the embedded digits model (EDM-style, trained by ``scripts/train.py``, weights
  shipped in ``bdia/assets/``);
* the analytic digits mixture is :func:`bdia.analytic.digits_gmm` itself (``configs/sample/model/gmm-digits.yaml``).

:func:`load_model` instantiates a model config and re-raises the loader's own exception (Hydra wraps it),
so callers can report missing checkpoints in one line. :func:`image_shape_of` and :func:`label_dim_of` read
what a sampling run needs to know about a denoiser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .configs import instantiate
from .download import AssetUnavailableError
from .networks import load_edm
from .networks.loader import SnapshotError, load_network_file

__all__ = ["edm_network", "digits_network", "load_model", "image_shape_of", "label_dim_of", "ModelNotShippedError"]


class ModelNotShippedError(ValueError):
    """A model config whose weights this version of the package does not contain."""


def _local_file(path, config_key: str) -> Path:
    local = Path(str(path)).expanduser()
    if not local.is_file():
        if local.is_dir():
            reason = "it is a directory, not a file"
        elif local.exists():
            reason = "it is not a regular file (a FIFO, device or socket)"
        else:
            reason = "no such file"
        raise AssetUnavailableError(None, local, config_key, reason=reason, what=f"{config_key}={path}")
    return local


def edm_network(name: str | None = None, path: str | None = None):
    """An EDM network (``EDMPrecond``, ``VPPrecond`` …, eval mode, CPU) read by :func:`bdia.networks.load_edm`,
    which never executes code from the pickle.

    ``path``: a local snapshot (``.pkl``) or a URL; when set it wins over ``name``. ``name``: a registry name
    such as ``"edm-cifar10-32x32-cond-vp"``, downloaded into :func:`bdia.download.cache_dir` on first use.
    Raises :class:`bdia.download.AssetUnavailableError` (URL, cache path and ``model.path``) when the file
    is neither there nor downloadable, e.g. offline.
    """
    if path is not None and str(path).strip():
        text = str(path).strip()
        source = text if "://" in text else _local_file(text, "model.path")
        return load_edm(source, config_key="model.path")
    if name is None or not str(name).strip():
        raise ValueError("model: give a registry name (model.name=...) or a local snapshot (model.path=...)")
    return load_edm(str(name).strip(), config_key="model.path")


#: The shipped embedded model (trained by ``scripts/train.py``; its card and training log sit beside it).
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_edm.safetensors"


def digits_network(path: str | None = None):
    """The embedded digits model: an EDM-style network (``EDMPrecond`` + ``SongUNet``) trained on the training
    split of scikit-learn's digits at 16x16 by ``scripts/train.py``. ``path`` (``model.path=``) takes another
    network written by that script; by default the weights shipped in ``bdia/assets/`` are used."""
    if path is None or not str(path).strip():
        if not DIGITS_WEIGHTS.is_file():
            raise ModelNotShippedError(
                f"model=digits: the embedded model's weights are missing from this installation ({DIGITS_WEIGHTS}); "
                "train one with `python scripts/train.py` and pass model.path=results/train/digits/final.safetensors"
            )
        local = DIGITS_WEIGHTS
    else:
        local = _local_file(path, "model.path")
    try:
        return load_network_file(local)
    except SnapshotError as e:  # refused by the loader's checks (limits, header, shapes): its one line
        raise ValueError(f"{'model=digits' if local == DIGITS_WEIGHTS else 'model.path'}: {e}") from None
    except Exception as e:  # safetensors / metadata problems: say which file
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"model.path={path}: not a network written by scripts/train.py ({type(e).__name__}: {detail})") from None


def load_model(model_cfg: Mapping[str, Any] | Any):
    """Instantiate a model config (a mapping with ``_target_``) and return the denoiser.

    The target's own errors reach the user unchanged (:func:`bdia.configs.instantiate`).
    """
    if model_cfg is None or "_target_" not in model_cfg:
        raise ValueError("model: the config has no _target_ (choose one with model=<name>)")
    if model_cfg["_target_"] == "bdia.networks.sd.load_sd":
        raise ValueError("model: Stable Diffusion is a text-to-image model; use scripts/text2image.py (or scripts/edit.py), not scripts/sample.py")
    return instantiate(model_cfg, "model")


def image_shape_of(denoiser) -> tuple[int, ...] | None:
    """``(C, H, W)`` of the images a denoiser models: EDM networks' ``img_channels``/``img_resolution``,
    analytic models' ``event_shape``; ``None`` if it does not say."""
    if hasattr(denoiser, "img_resolution") and hasattr(denoiser, "img_channels"):
        return (int(denoiser.img_channels), int(denoiser.img_resolution), int(denoiser.img_resolution))
    shape = getattr(denoiser, "event_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def label_dim_of(denoiser) -> int:
    """Number of classes of a class-conditional denoiser (EDM's ``label_dim``), 0 if unconditional."""
    return int(getattr(denoiser, "label_dim", 0) or 0)
