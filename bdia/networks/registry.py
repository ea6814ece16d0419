"""Registry of NVIDIA's published EDM network snapshots (facts only, no weights).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022) publish
two families of network pickles:

* ``edm-*``      — their "config F" models, trained with EDM's preconditioning (``EDMPrecond``), at
  ``https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/<name>.pkl``;
* ``baseline-*`` — "config A": the VP / VE / iDDPM-style baselines (some converted from Song et al.'s
  score_sde and Dhariwal & Nichol's guided-diffusion checkpoints, the rest trained by NVIDIA with the
  baseline recipe) at ``https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/baseline/<name>.pkl``.

Every snapshot, code and weights alike, is licensed CC BY-NC-SA 4.0 (EDM README, "License"). Nothing here
downloads anything; :mod:`bdia.download` does that. Provenance of every field is written up in
``third_party/edm/CHECKPOINTS.md``.

Sampler settings are those of EDM's own sampler (``generate.py``'s ``edm_sampler``): a Karras grid with
``num_steps`` noise levels from ``sigma_max`` down to ``sigma_min`` (exponent ``rho``), then 0; Heun steps
except the last, so NFE = 2·num_steps − 1. EDM *clamps* ``sigma_min``/``sigma_max`` to the range the
network's preconditioner supports (``max(sigma_min, net.sigma_min)``, ``min(sigma_max, net.sigma_max)``);
the values stored here are the requested ones, before that clamp (e.g. a ``VEPrecond`` network
supports σ ∈ [0.02, 100] by default, so the effective σ_min is 0.02 for the VE baselines).
``s_churn = 0`` means the deterministic ODE sampler — the one BDIA builds on.

Unknown facts are ``None`` and never guessed: file sizes and sha256 digests (NVIDIA publishes neither),
and FID values except the four that EDM's ``example.py`` prints next to a named checkpoint with the
settings stored here.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from ..download import AssetUnavailableError, cache_dir, fetch_file, kind_of, url_basename

__all__ = [
    "BASELINE_ROOT",
    "CHECKPOINTS",
    "Checkpoint",
    "EDM_LICENSE",
    "EDM_ROOT",
    "FID_REF_ROOT",
    "checkpoint_names",
    "checkpoint_path",
    "find_by_url",
    "get_checkpoint",
    "resolve_checkpoint",
]

EDM_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
BASELINE_ROOT = f"{EDM_ROOT}/baseline"
FID_REF_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs"
EDM_LICENSE = "CC BY-NC-SA 4.0"


@dataclass(frozen=True)
class Checkpoint:
    """One published EDM network snapshot and the sampler settings EDM recommends for it.

    Attributes:
        name: registry key, equal to the file name without ``.pkl``.
        url: where NVIDIA serves the pickle (https, ends in ``.pkl``).
        dataset: ``"cifar10"``, ``"ffhq"``, ``"afhqv2"`` or ``"imagenet"``.
        resolution: image side in pixels (32 or 64).
        channels: image channels (3).
        label_dim: number of classes for class-conditional models (one-hot labels), 0 if unconditional.
        preconditioner: EDM class name of the outer network: ``EDMPrecond``, ``VPPrecond``,
            ``VEPrecond`` or ``iDDPMPrecond``. For baselines this follows the file-name suffix and EDM's
            code (vp→VPPrecond, ve→VEPrecond, adm→iDDPMPrecond); the loader reads the real class from the
            pickle, which is authoritative.
        architecture: inner UNet: ``ddpmpp`` / ``ncsnpp`` (EDM's ``SongUNet``) or ``adm`` (``DhariwalUNet``).
        num_steps: recommended number of noise levels N of EDM's sampler (NFE = 2N − 1).
        sigma_min, sigma_max, rho: Karras grid requested from EDM's sampler (before the clamp to the
            network's supported range, see the module docstring).
        s_churn, s_min, s_max, s_noise: EDM's stochasticity settings (``S_churn`` … ``S_noise``);
            ``s_churn == 0`` is the deterministic sampler.
        family: ``"edm"`` (config F) or ``"baseline"`` (config A).
        size_bytes, sha256: of the published file, ``None`` where not known (NVIDIA publishes neither).
        fid_reported: FID that EDM's own repository states for exactly this checkpoint and these settings,
            else ``None``.
        fid_ref_url: EDM's reference Inception statistics to compare this model against.
        derived_from: upstream work a converted baseline comes from (``None`` for NVIDIA-trained ones).
        name_source: how the file name was established (see ``third_party/edm/CHECKPOINTS.md``).
        license: licence of the published file.
    """

    name: str
    url: str
    dataset: str
    resolution: int
    channels: int
    label_dim: int
    preconditioner: str
    architecture: str
    num_steps: int
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0
    family: str = "edm"
    size_bytes: int | None = None
    sha256: str | None = None
    fid_reported: float | None = None
    fid_ref_url: str | None = None
    derived_from: str | None = None
    name_source: str = ""
    license: str = EDM_LICENSE

    @property
    def filename(self) -> str:
        """File name of the snapshot, e.g. ``edm-cifar10-32x32-cond-vp.pkl``."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def conditional(self) -> bool:
        """True for class-conditional models (``label_dim > 0``)."""
        return self.label_dim > 0

    @property
    def deterministic(self) -> bool:
        """True when the recommended sampler is EDM's deterministic (ODE) sampler."""
        return self.s_churn == 0

    @property
    def nfe(self) -> int:
        """Network evaluations per image of EDM's Heun sampler with ``num_steps`` levels (2N − 1)."""
        return 2 * self.num_steps - 1

    def sampler_kwargs(self) -> dict:
        """The recommended sampler settings as a dict (keys as in this class, lower-case)."""
        keys = ("num_steps", "sigma_min", "sigma_max", "rho", "s_churn", "s_min", "s_max", "s_noise")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        """All fields as a plain dict (for logging into a run's ``metrics.json``/``env.json``)."""
        return asdict(self)


# --- construction helpers -------------------------------------------------------------------------------

_FID_REFS = {
    "cifar10": f"{FID_REF_ROOT}/cifar10-32x32.npz",
    "ffhq": f"{FID_REF_ROOT}/ffhq-64x64.npz",
    "afhqv2": f"{FID_REF_ROOT}/afhqv2-64x64.npz",
    "imagenet": f"{FID_REF_ROOT}/imagenet-64x64.npz",
}
_IMAGENET_BASELINE_FID_REF = f"{FID_REF_ROOT}/imagenet-64x64-baseline.npz"

_RESOLUTION = {"cifar10": 32, "ffhq": 64, "afhqv2": 64, "imagenet": 64}
# EDM README, "For best results ...": CIFAR-10 18 steps (NFE 35), FFHQ/AFHQv2 40 steps (NFE 79), ImageNet
# 256 steps (NFE 511) with S_churn=40, S_min=0.05, S_max=50, S_noise=1.003.
_STEPS = {"cifar10": 18, "ffhq": 40, "afhqv2": 40, "imagenet": 256}
_IMAGENET_EDM_CHURN = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)

_ARCH = {"vp": "ddpmpp", "ve": "ncsnpp", "adm": "adm"}
_BASELINE_PRECOND = {"vp": "VPPrecond", "ve": "VEPrecond", "adm": "iDDPMPrecond"}


def _entry(family: str, dataset: str, cond: bool, kind: str, *, name_source: str, **extra) -> Checkpoint:
    res = _RESOLUTION[dataset]
    name = f"{family}-{dataset}-{res}x{res}-{'cond' if cond else 'uncond'}-{kind}"
    root = EDM_ROOT if family == "edm" else BASELINE_ROOT
    label_dim = (1000 if dataset == "imagenet" else 10) if cond else 0
    fid_ref = _FID_REFS[dataset]
    if family == "baseline" and dataset == "imagenet":
        fid_ref = _IMAGENET_BASELINE_FID_REF
    return Checkpoint(
        name=name,
        url=f"{root}/{name}.pkl",
        dataset=dataset,
        resolution=res,
        channels=3,
        label_dim=label_dim,
        preconditioner="EDMPrecond" if family == "edm" else _BASELINE_PRECOND[kind],
        architecture=_ARCH[kind],
        num_steps=_STEPS[dataset],
        family=family,
        fid_ref_url=fid_ref,
        name_source=name_source,
        **extra,
    )


_README_URL = "EDM README/example.py (full URL)"
_README_NAME = "EDM README (file name)"
_README_TABLE = "EDM README training table (model name; edm- prefix as for the other config-F files)"
_THIRD_PARTY = "not in EDM repository; file name as used by third-party code, same pattern as listed baselines"

_ENTRIES = [
    # Config F (EDM) models.
    _entry("edm", "cifar10", True, "vp", name_source=_README_URL, fid_reported=1.79),
    _entry("edm", "cifar10", True, "ve", name_source=_README_TABLE),
    _entry("edm", "cifar10", False, "vp", name_source=_README_TABLE),
    _entry("edm", "cifar10", False, "ve", name_source=_README_TABLE),
    _entry("edm", "ffhq", False, "vp", name_source=_README_URL, fid_reported=2.39),
    _entry("edm", "ffhq", False, "ve", name_source=_README_TABLE),
    _entry("edm", "afhqv2", False, "vp", name_source=_README_URL, fid_reported=1.96),
    _entry("edm", "afhqv2", False, "ve", name_source=_README_TABLE),
    _entry("edm", "imagenet", True, "adm", name_source=_README_URL, fid_reported=1.36, **_IMAGENET_EDM_CHURN),
    # Config A (baseline) models. Deterministic EDM sampler at the dataset's recommended step count; EDM's
    # README gives no per-checkpoint settings for these (see CHECKPOINTS.md).
    _entry("baseline", "cifar10", False, "vp", name_source=_README_URL,
           derived_from="Song et al., score_sde (github.com/yang-song/score_sde_pytorch), Apache-2.0"),
    _entry("baseline", "cifar10", False, "ve", name_source=_README_NAME,
           derived_from="Song et al., score_sde (github.com/yang-song/score_sde_pytorch), Apache-2.0"),
    _entry("baseline", "cifar10", True, "vp", name_source=_THIRD_PARTY),
    _entry("baseline", "cifar10", True, "ve", name_source=_THIRD_PARTY),
    _entry("baseline", "ffhq", False, "vp", name_source=_THIRD_PARTY),
    _entry("baseline", "ffhq", False, "ve", name_source=_THIRD_PARTY),
    _entry("baseline", "afhqv2", False, "vp", name_source=_THIRD_PARTY),
    _entry("baseline", "afhqv2", False, "ve", name_source=_THIRD_PARTY),
    _entry("baseline", "imagenet", True, "adm", name_source=_README_NAME,
           derived_from="Dhariwal & Nichol, guided-diffusion (github.com/openai/guided-diffusion), MIT"),
]

CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in _ENTRIES}
"""Every published EDM / baseline snapshot, keyed by name (the file name without ``.pkl``)."""


def checkpoint_names() -> list[str]:
    """Sorted list of all registry names."""
    return sorted(CHECKPOINTS)


def get_checkpoint(name: str) -> Checkpoint:
    """Look up a checkpoint by name (a trailing ``.pkl`` is accepted).

    Raises:
        ValueError: for an unknown name; the message lists every valid name.
    """
    key = str(name).strip()
    if key.endswith(".pkl"):
        key = key[: -len(".pkl")]
    try:
        return CHECKPOINTS[key]
    except KeyError:
        valid = "\n  ".join(checkpoint_names())
        raise ValueError(f"unknown EDM checkpoint {name!r}; valid names are:\n  {valid}") from None


def find_by_url(url: str) -> Checkpoint | None:
    """The registry entry whose URL is ``url`` (so a URL given by a user still gets size/hash checks)."""
    for ckpt in CHECKPOINTS.values():
        if ckpt.url == url:
            return ckpt
    return None


# --------------------------------------------------------------------------------------------------
# A checkpoint reference (name, URL or file) -> a local file.


def checkpoint_path(name: str) -> Path:
    """Where the registry checkpoint ``name`` is (or will be) cached: ``cache_dir()/"edm"/<file>.pkl``."""
    return cache_dir() / "edm" / get_checkpoint(name).filename


#: File name endings that make a config value a path (not a registry name) when no such file exists.
_PATH_SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt", ".safetensors", ".bin")


def _is_url(text: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def _looks_like_path(text: str) -> bool:
    return ("/" in text or os.sep in text or text.startswith(("~", "."))
            or text.lower().endswith(_PATH_SUFFIXES))


def resolve_checkpoint(name_or_path, config_key: str = "model.path", progress: bool = True,
                       timeout: float | None = None) -> Path:
    """Turn a checkpoint reference into an existing local file.

    ``name_or_path`` may be

    * an existing local file → returned as is (``~`` expanded);
    * a registry name such as ``"edm-cifar10-32x32-cond-vp"`` (``.pkl`` optional) → the cached copy in
      :func:`checkpoint_path`, downloaded first if needed;
    * an ``http(s)://`` URL → the registry entry if it is one of NVIDIA's URLs, else cached under
      ``cache_dir()/"url"/<hash>/``; ``file://`` URLs are read in place;
    * anything else that looks like a path → :class:`AssetUnavailableError` ("no such file").

    ``config_key`` is the key the value came from; error messages tell the user to set it to a local file.

    Raises:
        AssetUnavailableError: missing local file, or a checkpoint that is not cached and cannot be
            downloaded (offline, unreachable, failed verification).
        ValueError: neither a file, nor a URL, nor a registry name (the message lists the valid names).
    """
    text = str(name_or_path).strip()
    if not text:
        raise ValueError(f"{config_key} is empty: give a checkpoint name, URL or local file")
    path = Path(text).expanduser()
    if path.is_file():
        return path

    if _is_url(text):
        parsed = urllib.parse.urlparse(text)
        if parsed.scheme.lower() == "file":
            local = Path(urllib.parse.unquote(parsed.path))
            if local.is_file():
                return local
            reason = f"it is {kind_of(local.stat().st_mode)}, not a regular file" if local.exists() else "no such file"
            raise AssetUnavailableError(None, local, config_key, reason=reason, what=f"{config_key}={text}")
        ckpt = find_by_url(text)
        if ckpt is not None:
            return _fetch_registered(ckpt, config_key, progress, timeout)
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        dest = cache_dir() / "url" / digest / url_basename(text)
        return fetch_file(text, dest, progress=progress, timeout=timeout, config_key=config_key,
                          what=f"checkpoint {url_basename(text)!r}")

    key = text[:-4] if text.endswith(".pkl") else text
    if key in CHECKPOINTS and "/" not in text and os.sep not in text:
        return _fetch_registered(CHECKPOINTS[key], config_key, progress, timeout)

    if path.exists():
        raise AssetUnavailableError(None, path, config_key, reason=f"it is {kind_of(path.stat().st_mode)}, not a regular file",
                                    what=f"{config_key}={text}")
    if _looks_like_path(text):
        raise AssetUnavailableError(None, path, config_key, reason="no such file", what=f"{config_key}={text}")
    try:
        get_checkpoint(text)
    except ValueError as e:
        raise ValueError(f"{config_key}={text!r} is neither an existing file, a URL nor a known checkpoint "
                         f"name.\n{e}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _fetch_registered(ckpt, config_key, progress, timeout) -> Path:
    return fetch_file(ckpt.url, cache_dir() / "edm" / ckpt.filename, expected_size=ckpt.size_bytes,
                      sha256=ckpt.sha256, progress=progress, timeout=timeout, config_key=config_key,
                      what=f"EDM checkpoint {ckpt.name!r}")
