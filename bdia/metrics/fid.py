"""FID (Inception, through torch-fidelity or clean-fid), FD/KID in digits-classifier features, and reference
statistics.

Metric objects are what the ``metrics/*.yaml`` configs instantiate (keys = constructor arguments); calling one
on images (a run folder, an ``.npz``, an image folder or a uint8 array — see :func:`open_images`) returns a
flat-ish dict of numbers and provenance that ``scripts/evaluate.py`` merges into the run's ``metrics.json``:

* :class:`FID` — Fréchet Inception Distance. ``backend="torch_fidelity"`` (default; torch-fidelity's
  ``inception-v3-compat``) or ``"clean_fid"`` (NVIDIA's TorchScript Inception through clean-fid,
  ``mode="legacy_tensorflow"`` by default so numbers stay comparable with EDM's). Reference: EDM's published
  ``fid-refs`` (``ref=cifar10-32x32`` …), a URL, a statistics ``.npz`` (``mu``, ``sigma``; e.g. written by
  ``scripts/fid_ref.py``) or a folder / image ``.npz`` whose statistics are computed on the fly.
  ``protocol="edm"``: EDM's protocol — exactly ``num_images`` (50k) images per seed block (0–49999,
  50000–99999, 100000–149999), FID of each block and their minimum (``fid``).
* :class:`DigitsFD` — "FD in digits-classifier features" and KID on the embedded digits data set, against
  the held-out real digits by default, with the real-data floor beside it. Not FID.

Statistics are float64 sums all-reduced over torchrun ranks (:func:`feature_statistics`).
"""

from __future__ import annotations

import math
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..distributed import is_main_process, resolve_device
from ..download import AssetUnavailableError, cache_dir, fetch_file, sha256_of
from ..imageio import parse_seeds
from ..networks.registry import FID_REF_ROOT
from ..runfolder import RunFolder, check_output_file, npz_members, open_output_file
from .digits_classifier import DigitsFeatures, digits_uint8
from .features import BACKENDS, CLEAN_FID_MODES, feature_statistics, inception_extractor
from .frechet import check_covariance, frechet_distance, kernel_distance
from .images import ImageSource, open_images

__all__ = ["EDM_FID_REFS", "FID", "DigitsFD", "ReferenceStats", "load_reference", "EDM_SEED_BLOCKS",
           "write_reference_stats", "check_reference_out", "is_own_reference", "reference_card"]

#: EDM's published reference statistics (``mu``, ``sigma`` of Inception pool features; NVIDIA's Inception).
EDM_FID_REFS = {
    name: f"{FID_REF_ROOT}/{name}.npz"
    for name in ("cifar10-32x32", "ffhq-64x64", "afhqv2-64x64", "imagenet-64x64", "imagenet-64x64-baseline")
}
_EDM_ALIASES = {"cifar10": "cifar10-32x32", "ffhq": "ffhq-64x64", "afhqv2": "afhqv2-64x64", "imagenet": "imagenet-64x64"}
EDM_SEED_BLOCKS = ("0-49999", "50000-99999", "100000-149999")
DIGITS_REFS = ("digits-test", "digits-train", "digits-all", "digits-even", "digits-odd")


# --------------------------------------------------------------------------------------------------
# Reference statistics.


@dataclass
class ReferenceStats:
    """``mu``/``sigma`` (float64) of a reference set, with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str
    num_images: int | None = None
    path: str | None = None
    sha256: str | None = None
    features: torch.Tensor | None = field(default=None, repr=False)
    extractor: str | None = None

    def describe(self) -> dict:
        out = {"source": self.source, "path": self.path, "sha256": self.sha256, "num_images": self.num_images}
        if self.extractor:
            out["feature_extractor"] = self.extractor
        return out


def _from_images(images, extractor, batch_size, source, need_features, path=None, sha=None) -> ReferenceStats:
    stats, features = feature_statistics(images, extractor, batch_size=batch_size, return_features=need_features)
    return ReferenceStats(stats.mu, stats.sigma, source, stats.n, path, sha, features, extractor.name)


#: Bound on what a reference statistics file may declare (2048-d Inception: sigma 32 MiB; 50k saved features 800 MiB).
MAX_REFERENCE_BYTES = 4 * 2**30


def _load_npz(path: Path, source: str, extractor, batch_size, need_features, config_key) -> ReferenceStats:
    what = f"{config_key}={source}: {path}"
    if not path.is_file():
        raise ValueError(f"{what}: not a regular file")
    members = npz_members(path, 2**40, what)  # zip and .npy headers only: nothing decompressed yet
    files = set(members)
    if {"mu", "sigma"} <= files:
        (mu_shape, _), (sigma_shape, _) = members["mu"], members["sigma"]
        if len(mu_shape) != 1 or tuple(sigma_shape) != (mu_shape[0], mu_shape[0]):
            raise ValueError(f"{what}: mu must be [D] and sigma [D, D], got {list(mu_shape)} and {list(sigma_shape)}")
        keys = ["mu", "sigma", *(["features"] if "features" in files else [])]
        declared = sum(math.prod(members[k][0]) * max(members[k][1].itemsize, 8) for k in keys)
        if declared > MAX_REFERENCE_BYTES:
            raise ValueError(f"{what}: declares {declared / 2**30:.1f} GiB of statistics, more than the "
                             f"{MAX_REFERENCE_BYTES / 2**30:.0f} GiB this reader accepts")
        if "features" in files and (len(members["features"][0]) != 2 or members["features"][0][1] != mu_shape[0]):
            raise ValueError(f"{what}: features must be [N, {mu_shape[0]}], got {list(members['features'][0])}")
        sha = sha256_of(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                n = int(data["num_images"]) if "num_images" in files and members["num_images"][0] == () else None
                features = torch.from_numpy(data["features"].astype(np.float64)) if "features" in files else None
                name = str(data["feature_extractor"]) if "feature_extractor" in files else None
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{what}: cannot read it as .npz ({type(e).__name__}: {e})") from None
        if not np.isfinite(mu).all():
            raise ValueError(f"{what}: mu contains NaN or Inf")
        check_covariance(sigma, what)
        return ReferenceStats(mu, sigma, source, n, str(path), sha, features, name)
    if {"images"} & files or {"arr_0"} & files:
        if extractor is None:
            raise ValueError(f"{config_key}={source}: an image .npz needs a feature extractor")
        return _from_images(path, extractor, batch_size, source, need_features, str(path), sha256_of(path))
    raise ValueError(f"{config_key}={source}: {path} has neither 'mu'/'sigma' nor images (it has {sorted(files)})")


def load_reference(ref, extractor=None, batch_size: int = 250, need_features: bool = False,
                   config_key: str = "metrics.fid.ref", progress: bool = True) -> ReferenceStats:
    """Reference statistics from

    * an EDM ``fid-refs`` name (``cifar10-32x32``, ``ffhq-64x64``, ``afhqv2-64x64``, ``imagenet-64x64``,
      ``imagenet-64x64-baseline``; ``cifar10`` … as aliases) → downloaded once to
      ``$BDIA_CACHE/fid-refs/`` (offline and not cached: :class:`AssetUnavailableError` naming the URL, the
      cache path and ``config_key``);
    * an ``http(s)://`` URL → the same, cached by file name;
    * ``digits-test`` / ``digits-train`` / ``digits-all`` / ``digits-even`` / ``digits-odd`` → the embedded
      digits (:func:`bdia.metrics.digits_classifier.digits_split`), computed with ``extractor``;
    * a local ``.npz`` with ``mu``/``sigma`` (optionally ``features``, ``num_images``), or with images;
    * a run folder or image folder → statistics computed with ``extractor``.

    The sha256 of a reference file is returned (and goes into ``metrics.json``).
    """
    if ref is None or not str(ref).strip():
        raise ValueError(f"{config_key} is empty: give an EDM fid-refs name, a URL, an .npz or a folder")
    text = str(ref).strip()
    name = _EDM_ALIASES.get(text, text[:-4] if text.endswith(".npz") and "/" not in text else text)
    name = next((n for n, url in EDM_FID_REFS.items() if url == text), name)
    if name in EDM_FID_REFS:
        url = EDM_FID_REFS[name]
        path = fetch_file(url, cache_dir() / "fid-refs" / f"{name}.npz", progress=progress, config_key=config_key,
                          what=f"EDM reference statistics {name!r}")
        out = _load_npz(path, name, extractor, batch_size, need_features, config_key)
        out.extractor = out.extractor or "NVIDIA inception-2015-12-05 (EDM fid-refs)"
        return out
    if text.startswith(("http://", "https://")):
        base = Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)).name or "reference.npz"
        path = fetch_file(text, cache_dir() / "fid-refs" / base, progress=progress, config_key=config_key,
                          what="reference statistics")
        return _load_npz(path, text, extractor, batch_size, need_features, config_key)
    if text in DIGITS_REFS:
        if extractor is None or not str(getattr(extractor, "name", "")).startswith("digits"):
            raise ValueError(f"{config_key}={text}: the digits references need the digits-classifier features")
        images, _ = digits_uint8(text.split("-", 1)[1])
        return _from_images(images, extractor, batch_size, text, need_features)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path, text, extractor, batch_size, need_features, config_key)
    if path.is_dir():
        if extractor is None:
            raise ValueError(f"{config_key}={text}: a folder reference needs a feature extractor")
        return _from_images(path, extractor, batch_size, text, need_features, str(path))
    if path.exists():
        raise ValueError(f"{config_key}={text}: not an .npz file or a folder")
    if "/" in text or text.endswith(".npz"):
        raise AssetUnavailableError(None, path, config_key, reason="no such file", what=f"{config_key}={text}")
    raise ValueError(f"{config_key}={text!r}: unknown reference; give one of {', '.join(EDM_FID_REFS)}, "
                     f"{', '.join(DIGITS_REFS)}, a URL, an .npz or a folder")


# --------------------------------------------------------------------------------------------------
# Metrics.


def _parse_blocks(blocks: Sequence) -> list[list[int]]:
    return [parse_seeds(b) for b in blocks]


class _FeatureDistance:
    """Shared machinery: an extractor, a reference, Fréchet distance (+ optional KID) on images."""

    key = "fd"
    extractor = None

    def __init__(self, ref, batch_size: int, kid: bool, kid_subsets: int, kid_subset_size: int, kid_seed: int,
                 fd_method: str, progress: bool, config_key: str):
        self.ref_spec = ref
        self.batch_size = int(batch_size)
        self.kid = bool(kid)
        self.kid_subsets, self.kid_subset_size, self.kid_seed = int(kid_subsets), int(kid_subset_size), int(kid_seed)
        self.fd_method = fd_method
        self.progress = progress
        self.config_key = config_key
        self._references: dict[str, ReferenceStats] = {}
        if fd_method not in ("eigh", "sqrtm"):
            raise ValueError(f"fd_method must be 'eigh' or 'sqrtm', got {fd_method!r}")

    def reference_for(self, spec) -> ReferenceStats:
        """The (cached) :class:`ReferenceStats` for the reference ``spec``."""
        key = str(spec)
        if key not in self._references:
            ref = load_reference(spec, self.extractor, self.batch_size, need_features=self.kid,
                                 config_key=self.config_key, progress=self.progress)
            if self.kid and ref.features is None:
                raise ValueError(f"{self.config_key}={spec}: KID needs reference features; this reference has only "
                                 f"mu/sigma (use a folder, or an .npz written by scripts/fid_ref.py save_features=true)")
            self._references[key] = ref
        return self._references[key]

    @property
    def reference(self) -> ReferenceStats:
        return self.reference_for(self.ref_spec)

    def _distances(self, images, prefix: str = "", ref: ReferenceStats | None = None) -> dict:
        stats, features = feature_statistics(images, self.extractor, self.batch_size, return_features=self.kid,
                                             progress=self.progress)
        ref = ref if ref is not None else self.reference
        out = {prefix + self.key: frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma, self.fd_method),
               prefix + "num_images": stats.n}
        if self.kid:
            k = kernel_distance(features, ref.features, self.kid_subsets, self.kid_subset_size, seed=self.kid_seed)
            out.update({prefix + "kid": k.mean, prefix + "kid_std": k.std})
            out.update({prefix + "kid_subsets": k.subsets, prefix + "kid_subset_size": k.subset_size})
        return out

    def _provenance(self) -> dict:
        info = {"name": self.extractor.name}
        path = getattr(self.extractor, "weights_path", None)
        if path:
            info.update(weights=str(path), weights_sha256=sha256_of(path))
        return info


class FID(_FeatureDistance):
    """Fréchet Inception Distance; see the module docstring.

    Args:
        backend: ``"torch_fidelity"`` or ``"clean_fid"``.
        ref: reference statistics (:func:`load_reference`), e.g. ``cifar10-32x32`` or ``/data/ref.npz``.
        weights: local Inception weights file (config key ``metrics.fid.weights``); default: cache/download.
        mode: clean-fid's mode, ``legacy_tensorflow`` (default) or ``clean``.
        protocol: ``"all"`` (FID of all images) or ``"edm"`` (``num_images`` per seed block, min over blocks).
        num_images, seed_blocks: the EDM protocol's block size and seed ranges.
        kid: also KID (needs reference features); kid_subsets, kid_subset_size, kid_seed: as torch-fidelity.
        fd_method: ``"eigh"`` or ``"sqrtm"`` (:func:`frechet_distance`).
        batch_size, device (``auto``: this rank's GPU if any), progress.
    """

    key = "fid"

    def __init__(self, backend: str = "torch_fidelity", ref="cifar10-32x32", weights=None,
                 mode: str = "legacy_tensorflow", protocol: str = "all", num_images: int = 50_000,
                 seed_blocks: Sequence = EDM_SEED_BLOCKS, kid: bool = False, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, kid_seed: int = 2020, fd_method: str = "eigh", batch_size: int = 250,
                 device="auto", progress: bool = True):
        super().__init__(ref, batch_size, kid, kid_subsets, kid_subset_size, kid_seed, fd_method, progress,
                         "metrics.fid.ref")
        if backend not in BACKENDS:
            raise ValueError(f"metrics.fid.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "clean_fid" and mode not in CLEAN_FID_MODES:
            raise ValueError(f"metrics.fid.mode must be one of {', '.join(CLEAN_FID_MODES)}, got {mode!r}")
        if protocol not in ("all", "edm"):
            raise ValueError(f"metrics.fid.protocol must be 'all' or 'edm', got {protocol!r}")
        self.backend, self.weights, self.mode, self.protocol = backend, weights, mode, protocol
        self.num_images = int(num_images)
        self.seed_blocks = [str(b) for b in seed_blocks]
        self.blocks = _parse_blocks(self.seed_blocks) if protocol == "edm" else None
        for spec, block in zip(self.seed_blocks, self.blocks or []):
            if len(block) != self.num_images:
                raise ValueError(f"metrics.fid.seed_blocks: block {spec} has {len(block)} seeds, the protocol needs "
                                 f"exactly num_images={self.num_images}")
        self.device = resolve_device(device)
        self._extractor = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = inception_extractor(self.backend, self.weights, self.mode, self.device, self.progress)
        return self._extractor

    def __call__(self, images, run_dir=None) -> dict:
        source = open_images(images)
        if self.protocol == "edm" and source.seeds is None:
            raise ValueError(f"{source.description}: the EDM protocol needs per-image seeds (images.npz 'seeds' or "
                             f"<seed>.png file names)")
        ref = self.reference_for(self._ref_spec(images, run_dir))
        if self.protocol == "edm":
            values = self._edm_blocks(source, ref)
        else:
            values = self._distances(source, ref=ref)
        return {
            **values,
            "label": self.extractor.label,
            "backend": self.backend,
            **({"mode": self.mode} if self.backend == "clean_fid" else {}),
            "protocol": self.protocol,
            "reference": ref.describe(),
            "feature_extractor": self._provenance(),
        }

    def _ref_spec(self, images, run_dir):
        """``ref=auto``: the run's ``config.yaml`` ``dataset.fid_ref_url`` (set by configs/sample/dataset/*.yaml)."""
        if str(self.ref_spec) != "auto":
            return self.ref_spec
        folder = run_dir if run_dir is not None else (images if isinstance(images, (str, Path)) else None)
        config = Path(folder) / "config.yaml" if folder is not None else None
        if config is None or not config.is_file():
            raise ValueError("metrics.fid.ref=auto reads dataset.fid_ref_url from the run folder's config.yaml, "
                             "and there is none; set metrics.fid.ref=<EDM fid-refs name, URL, .npz or folder>")
        from omegaconf import OmegaConf

        url = OmegaConf.select(OmegaConf.load(config), "dataset.fid_ref_url", default=None)
        if not url:
            raise ValueError(f"metrics.fid.ref=auto: {config} has no dataset.fid_ref_url (dataset without FID "
                             f"reference statistics); set metrics.fid.ref")
        return url

    def _edm_blocks(self, source: ImageSource, ref: ReferenceStats) -> dict:
        position = {int(s): i for i, s in enumerate(source.seeds)}
        per_block = {}
        for spec, block in zip(self.seed_blocks, self.blocks):
            idx = [position[s] for s in block if s in position]
            if len(idx) != self.num_images:
                raise ValueError(f"{source.description}: the EDM protocol needs all {self.num_images} images with seeds "
                                 f"{spec}; found {len(idx)}")
            per_block[spec] = self._distances(source.subset(idx, f"{source.description} seeds {spec}"), ref=ref)
        fids = {spec: v["fid"] for spec, v in per_block.items()}
        out = {"fid": min(fids.values()), "fid_blocks": fids, "num_images": self.num_images,
               "num_blocks": len(fids)}
        if self.kid:
            out["kid_blocks"] = {spec: v["kid"] for spec, v in per_block.items()}
        return out


class DigitsFD(_FeatureDistance):
    """"FD in digits-classifier features" and KID for 16x16 digits images; not FID.

    Args:
        ref: reference (default ``digits-test``: the 449 held-out real digits the classifier never saw).
        weights: classifier safetensors (default: the shipped ``bdia/assets/digits_classifier.safetensors``).
        kid, kid_subsets, kid_subset_size, kid_seed: KID as torch-fidelity computes it.
        real_floor: also report the same numbers for real digits against the same reference —
            ``floor_matched_*``: as many ``digits-train`` images as the run has (first N), and
            ``floor_halves_*``: the two disjoint halves ``digits-even`` vs ``digits-odd`` of all real digits.
    """

    key = "fd"

    def __init__(self, ref="digits-test", weights=None, kid: bool = True, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, kid_seed: int = 2020, real_floor: bool = True, fd_method: str = "eigh",
                 batch_size: int = 500, device="cpu", progress: bool = False):
        super().__init__(ref, batch_size, kid, kid_subsets, kid_subset_size, kid_seed, fd_method, progress,
                         "metrics.digits.ref")
        self.real_floor = bool(real_floor)
        self.extractor = DigitsFeatures(weights, resolve_device(device))
        self._floors: dict = {}  # real-data floors do not depend on the run: computed once per size

    def __call__(self, images, run_dir=None) -> dict:
        source = open_images(images)
        out = self._distances(source)
        if self.real_floor:
            train, _ = digits_uint8("train")
            n = min(len(source), len(train))
            if ("matched", n) not in self._floors:
                self._floors[("matched", n)] = self._distances(train[:n], "floor_matched_")
            if "halves" not in self._floors:
                self._floors["halves"] = self._halves_floor()
            out.update(self._floors[("matched", n)])
            out.update(self._floors["halves"])
        return {
            **out,
            "label": self.extractor.label,
            "reference": self.reference.describe(),
            "feature_extractor": self._provenance(),
        }

    def _halves_floor(self) -> dict:

        even, _ = digits_uint8("even")
        odd, _ = digits_uint8("odd")
        s_even, f_even = feature_statistics(even, self.extractor, self.batch_size, return_features=self.kid)
        s_odd, f_odd = feature_statistics(odd, self.extractor, self.batch_size, return_features=self.kid)
        out = {"floor_halves_fd": frechet_distance(s_even.mu, s_even.sigma, s_odd.mu, s_odd.sigma, self.fd_method),
               "floor_halves_num_images": [s_even.n, s_odd.n]}
        if self.kid:
            k = kernel_distance(f_even, f_odd, self.kid_subsets, self.kid_subset_size, seed=self.kid_seed)
            out.update(floor_halves_kid=k.mean, floor_halves_kid_std=k.std)
        return out


#: The keys a statistics card written by :func:`write_reference_stats` always holds.
CARD_KEYS = ("file", "sha256", "num_images", "feature_extractor")


def reference_card(folder: RunFolder, name: str) -> dict | None:
    """The card ``<name>.json`` beside the statistics file ``name`` when it is one :func:`write_reference_stats`
    wrote for that file (a JSON object naming it, with :data:`CARD_KEYS`), else ``None``."""
    card = folder.read_json(f"{name}.json")
    if not isinstance(card, dict) or card.get("file") != name or not set(CARD_KEYS) <= set(card):
        return None
    return card


def is_own_reference(folder: RunFolder, name: str, out_name: str) -> bool:
    """Whether ``name`` (the statistics file ``out_name`` or its card) is what ``scripts/fid_ref.py`` wrote: its
    card says so and, for the statistics file, holds the file's sha256 (a file changed since is someone's)."""
    card = reference_card(folder, out_name)
    if card is None:
        return False
    return name != out_name or folder.sha256(out_name) == card.get("sha256")


def check_reference_out(out) -> None:
    """Refuse (one line) an ``out`` that :func:`write_reference_stats` may not write: an existing file (or card)
    it did not write, a link, a folder. Read-only: run before the statistics are computed."""
    out = Path(out).expanduser()
    check_output_file(out, "fid_ref", lambda folder, name: is_own_reference(folder, name, out.name),
                      companions=[f"{out.name}.json"])


def write_reference_stats(images, extractor, out, batch_size: int = 250, save_features: bool = False,
                          provenance: dict | None = None, progress: bool = True) -> dict:
    """Compute the statistics of ``images`` with ``extractor`` and write ``out`` (``.npz``: ``mu``, ``sigma``
    float64, ``num_images``, ``feature_extractor``, and ``features`` if ``save_features``) plus ``<out>.json``
    (provenance and the file's sha256). An existing ``out`` or card is replaced only when this function wrote
    it (:func:`is_own_reference`), with a lock held (:func:`bdia.runfolder.open_output_file`); anything else is
    refused in one line. Under torchrun every rank computes its shard, rank 0 writes. Returns the JSON card."""
    out = Path(out).expanduser()
    check_reference_out(out)  # before the (long) computation
    stats, features = feature_statistics(images, extractor, batch_size, return_features=save_features,
                                         progress=progress)
    card = {"num_images": stats.n, "feature_extractor": extractor.name, "feature_dim": extractor.feature_dim,
            **(provenance or {})}
    weights = getattr(extractor, "weights_path", None)
    if weights:
        card["feature_extractor_weights"] = str(weights)
        card["feature_extractor_weights_sha256"] = sha256_of(weights)
    if not is_main_process():
        return card
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.int64(stats.n),
              "feature_extractor": np.str_(extractor.name)}
    if save_features:
        arrays["features"] = features.numpy()
    with open_output_file(out, "fid_ref", lambda folder, name: is_own_reference(folder, name, out.name),
                          companions=[f"{out.name}.json"]) as folder:
        with folder.open_atomic(out.name) as f:
            np.savez(f, **arrays)
        card.update(file=out.name, sha256=folder.sha256(out.name), saved_features=bool(save_features))
        folder.write_json(f"{out.name}.json", card)
    return card
