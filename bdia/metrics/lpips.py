"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") with the
maintained ``lpips`` package, loaded offline-safe.

The package ships its learned linear layers; the backbone (torchvision's ImageNet AlexNet or VGG16) is a download.
Here the package is built with a random backbone and the backbone's weights are read from a local file:
``weights=`` (config key ``lpips_weights``), else torchvision's own cache file
(``$TORCH_HOME/hub/checkpoints/<name>.pth``), else downloaded once into that cache with
:func:`bdia.download.fetch_file`. Offline and not cached, the error names the URL, the cache path and the key,
at once. Files are read with ``torch.load(weights_only=True)``: no code runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..download import AssetUnavailableError, fetch_file, open_regular_file

__all__ = ["BACKBONES", "LPIPS", "backbone_weights"]

#: torchvision's ImageNet weights of the two backbones LPIPS v0.1 was calibrated on.
BACKBONES = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
WEIGHTS_KEY = "lpips_weights"


def backbone_weights(net: str = "alex", weights=None, config_key: str = WEIGHTS_KEY, progress: bool = True) -> Path:
    """The local file of the ``net`` backbone's weights (see the module notes)."""
    if net not in BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONES)}, got {net!r}")
    if weights is not None and str(weights).strip():
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise AssetUnavailableError(None, path, config_key, reason="no such file", what=f"LPIPS {net} backbone")
        return path
    url = BACKBONES[net]
    cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    return fetch_file(url, cache, progress=progress, config_key=config_key,
                      what=f"LPIPS {net} backbone (torchvision ImageNet weights)")


class LPIPS:
    """``LPIPS(net, weights, device)(x, y)``: the perceptual distance per image pair (float64 ``[N]``) between
    images ``[N, 3, H, W]`` in ``[-1, 1]``; lower is closer, 0 for identical images."""

    name = "lpips"

    def __init__(self, net: str = "alex", weights=None, device="cpu", config_key: str = WEIGHTS_KEY):
        import lpips  # the package (its linear layers ship inside it); imported here so bdia.metrics stays light

        path = backbone_weights(net, weights, config_key)
        with open_regular_file(path, "LPIPS backbone weights") as f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle / zip errors of a file that is not a torch state dict
                raise ValueError(f"{config_key}={path}: not a torchvision {net} state dict ({str(e)[:120]})") from None
        with warnings.catch_warnings():  # lpips 0.1.4 still passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        # The package splits torchvision's ``features`` into slices, keeping each layer's index as its name:
        # ``slice2.3.weight`` is ``features.3.weight``.
        own = model.net.state_dict()
        try:
            mapped = {name: state[f"features.{name.split('.', 1)[1]}"] for name in own}
        except KeyError as e:
            raise ValueError(f"{config_key}={path}: no {e.args[0]} in it (not torchvision's {net})") from None
        model.net.load_state_dict(mapped)
        self.net, self.weights_path = net, path
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [N, 3, H, W] batches of one shape, got {list(x.shape)} and {list(y.shape)}")
        x, y = (t.to(self.device, torch.float32) for t in (x, y))
        return self.model(x, y).flatten().double().cpu()
