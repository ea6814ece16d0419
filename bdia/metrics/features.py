"""Feature extractors (Inception-v3 through torch-fidelity or clean-fid; the digits classifier) and sharded,
float64 feature statistics.

A feature extractor here is a callable ``extractor(images) -> features``: uint8 ``[B, C, H, W]`` in,
``[B, D]`` out, with attributes ``name``, ``feature_dim`` and ``label`` (what to call a Fréchet distance in
its features). :func:`feature_statistics` runs one over an :class:`~bdia.metrics.images.ImageSource`,
sharded over torchrun ranks, and reduces ``n``, the feature sum and the sum of outer products in float64.

Inception weights are never fetched by the libraries themselves (their downloads retry or hang offline):
:func:`resolve_inception_weights` finds a local file or downloads it once through
:func:`bdia.download.fetch_file`, which fails at once offline with the URL, the cache path and the config
key ``metrics.fid.weights``:

* torch-fidelity ``inception-v3-compat``: ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's
  GitHub release, cached where torch-fidelity itself caches it (``$TORCH_HOME/hub/checkpoints/``);
* clean-fid: NVIDIA's TorchScript ``inception-2015-12-05.pt`` (the network of EDM's ``fid.py`` and of the
  published ``fid-refs``), cached under ``$BDIA_CACHE/inception/``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..distributed import gather_rows, is_main_process, shard_indices
from ..download import AssetUnavailableError, cache_dir, fetch_file
from .frechet import FeatureStats
from .images import ImageSource, open_images

__all__ = [
    "BACKENDS",
    "TORCH_FIDELITY_INCEPTION_URL",
    "CLEAN_FID_INCEPTION_URL",
    "CleanFIDInception",
    "TorchFidelityInception",
    "feature_statistics",
    "inception_extractor",
    "inception_weights_cache_path",
    "resolve_inception_weights",
]

BACKENDS = ("torch_fidelity", "clean_fid")
CLEAN_FID_MODES = ("legacy_tensorflow", "clean")

# Pinned copies of the libraries' constants (torch-fidelity 0.4.0, clean-fid 0.1.35); a test checks they
# still equal the installed libraries' values, so importing the libraries is not needed to report a URL.
TORCH_FIDELITY_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
CLEAN_FID_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHTS_KEY = "metrics.fid.weights"


def inception_weights_cache_path(backend: str) -> Path:
    """Where the backend's Inception weights are cached when downloaded."""
    if backend == "torch_fidelity":
        return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_INCEPTION_URL.rsplit("/", 1)[-1]
    if backend == "clean_fid":
        return cache_dir() / "inception" / CLEAN_FID_INCEPTION_URL.rsplit("/", 1)[-1]
    raise ValueError(f"unknown FID backend {backend!r}; valid: {', '.join(BACKENDS)}")


def resolve_inception_weights(backend: str, weights=None, progress: bool = True, config_key: str = WEIGHTS_KEY) -> Path:
    """A local file with the backend's Inception weights: ``weights`` if given (it must exist), else the
    cached copy, downloaded first if needed (one attempt; offline: :class:`AssetUnavailableError` at once,
    naming the URL, the cache path and ``config_key``)."""
    dest = inception_weights_cache_path(backend)
    what = f"Inception-v3 weights for the {backend} FID backend"
    if weights is not None and str(weights).strip():
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise AssetUnavailableError(None, path, config_key, reason="no such file", what=f"{config_key}={weights}")
        return path
    url = TORCH_FIDELITY_INCEPTION_URL if backend == "torch_fidelity" else CLEAN_FID_INCEPTION_URL
    return fetch_file(url, dest, progress=progress, config_key=config_key, what=what)


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise ValueError(f"Inception features take uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got {list(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class TorchFidelityInception(torch.nn.Module):
    """torch-fidelity's ``inception-v3-compat`` (the TF-FID Inception, TF1-style bilinear resize to 299 inside),
    2048-d pool features. Grayscale images are repeated to RGB."""

    name = "inception-v3-compat"
    label = "FID (torch-fidelity inception-v3-compat)"
    feature_dim = 2048

    def __init__(self, weights=None, device="cpu", progress: bool = True, config_key: str = WEIGHTS_KEY):
        super().__init__()
        path = resolve_inception_weights("torch_fidelity", weights, progress, config_key)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:  # refuse anything but a plain state dict before torch-fidelity unpickles it (weights_only=False)
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AssetUnavailableError(None, path, config_key, what="Inception-v3 weights",
                                        reason=f"not a plain PyTorch state dict ({type(e).__name__})") from None
        self.weights_path = str(path)
        self.net = FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=str(path))
        self.net.to(device).eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net(_to_rgb(images).to(device))[0]


class CleanFIDInception(torch.nn.Module):
    """clean-fid's wrapper of NVIDIA's TorchScript Inception (``InceptionV3W``). ``mode="legacy_tensorflow"``
    (default) resizes inside the network as TensorFlow did — the protocol of EDM's ``fid.py`` and its
    ``fid-refs``; ``mode="clean"`` resizes each image to 299 with PIL bicubic first (clean-fid's resizer)."""

    feature_dim = 2048

    def __init__(self, weights=None, mode: str = "legacy_tensorflow", device="cpu", progress: bool = True,
                 config_key: str = WEIGHTS_KEY):
        super().__init__()
        if mode not in CLEAN_FID_MODES:
            raise ValueError(f"clean-fid mode must be one of {', '.join(CLEAN_FID_MODES)}, got {mode!r} "
                             f"(legacy_pytorch needs pytorch-fid's weights and is not supported)")
        path = resolve_inception_weights("clean_fid", weights, progress, config_key)
        from cleanfid.inception_torchscript import InceptionV3W

        self.weights_path = str(path)
        self.mode = mode
        self.name = f"clean-fid-inception-{mode}"
        self.label = f"FID (clean-fid, {mode})"
        expected = CLEAN_FID_INCEPTION_URL.rsplit("/", 1)[-1]
        if path.name == expected:
            folder = str(path.parent)
        else:  # InceptionV3W reads <folder>/inception-2015-12-05.pt: point a private folder at the file
            self._tmp = tempfile.TemporaryDirectory(prefix="bdia-inception-")
            folder = self._tmp.name
            os.symlink(path.resolve(), Path(folder) / expected)
        try:
            self.net = InceptionV3W(folder, download=False, resize_inside=(mode == "legacy_tensorflow"))
        except RuntimeError as e:
            raise AssetUnavailableError(None, path, config_key, what="clean-fid Inception weights",
                                        reason=f"not a TorchScript archive ({str(e).splitlines()[0][:80]})") from None
        self.net.to(device).eval()
        self._resize = None
        if mode == "clean":
            from cleanfid.resize import build_resizer

            self._resize = build_resizer("clean")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_rgb(images)
        if self._resize is not None:
            x = torch.stack([torch.from_numpy(self._resize(img.permute(1, 2, 0).numpy())).permute(2, 0, 1)
                             for img in x])
        device = next(self.net.parameters()).device
        return self.net(x.to(device=device, dtype=torch.float32))


def inception_extractor(backend: str = "torch_fidelity", weights=None, mode: str = "legacy_tensorflow",
                        device="cpu", progress: bool = True, config_key: str = WEIGHTS_KEY):
    """The Inception feature extractor of ``backend`` (``torch_fidelity`` or ``clean_fid``)."""
    if backend == "torch_fidelity":
        return TorchFidelityInception(weights, device, progress, config_key)
    if backend == "clean_fid":
        return CleanFIDInception(weights, mode, device, progress, config_key)
    raise ValueError(f"unknown FID backend {backend!r}; valid: {', '.join(BACKENDS)}")


@torch.no_grad()
def feature_statistics(images, extractor, batch_size: int = 250, return_features: bool = False,
                       progress: bool = False) -> tuple[FeatureStats, torch.Tensor | None]:
    """Run ``extractor`` over ``images`` (anything :func:`open_images` takes) and return the float64
    :class:`FeatureStats` (all-reduced over torchrun ranks: each rank handles images ``rank::world``) and,
    if ``return_features``, all features ``[N, D]`` (float64, in image order, on every rank)."""
    source: ImageSource = open_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mine = list(shard_indices(len(source)))
    stats = FeatureStats(extractor.feature_dim)
    rows = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if progress and is_main_process():
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{extractor.name} features", unit="batch")
    for batch in batches:
        features = extractor(source.batch(batch)).detach().to("cpu", torch.float64)
        stats.update(features)
        if return_features:
            rows.append(features)
    stats.all_reduce()
    features = None
    if return_features:
        mine_rows = torch.cat(rows) if rows else torch.zeros(0, extractor.feature_dim, dtype=torch.float64)
        features = gather_rows(mine_rows, len(source))
    return stats, features

