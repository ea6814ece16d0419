"""Reconstruction metrics for inversion round trips (invert a real image, regenerate, compare).

:func:`reconstruction_metrics` compares a reference batch with its reconstruction, per image and on average,
in float64:

* ``mse``: mean squared error per image (over all pixels / latent entries), and its mean over images;
* ``psnr``: ``10 log10(data_range^2 / mse)`` per image, and the **mean of the per-image PSNRs** (the usual
  convention in inversion papers; ``inf`` for a perfect reconstruction). Only with a stated ``data_range``:
  ``2`` for EDM-style pixels in ``[-1, 1]``, ``255`` for uint8 images, ``1`` for ``[0, 1]``. For latents
  there is no natural range, so PSNR is off unless you give one;
* ``max_abs_error``: the largest absolute difference, per image and overall;
* ``relative_error``: ``||x - y|| / ||x||`` per image (useful in latent space, where scales differ by model).

:func:`pixel_metrics` (``[-1, 1]`` images, ``data_range=2``; PSNR and :func:`ssim`) and :func:`latent_metrics`
(no PSNR) are the two spaces of the inversion comparison. LPIPS is **not** provided yet: the ``lpips`` package
downloads its AlexNet/VGG backbone from torchvision at run time; an offline-safe loader (local weights file,
one-line failure naming URL and cache path) is still to be written.

:class:`Reconstruction` is the metric-config wrapper (``configs/image_metrics/metrics/reconstruction.yaml``): it
compares a run's uint8 images with a reference run's images, matched by seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .images import open_images

__all__ = ["reconstruction_metrics", "pixel_metrics", "latent_metrics", "ssim", "Reconstruction"]


def reconstruction_metrics(reference, reconstruction, data_range: float | None = None, per_image: bool = True) -> dict:
    """Compare ``reconstruction`` with ``reference`` (tensors or arrays of equal shape ``[N, ...]``)."""
    x = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference)
    y = torch.as_tensor(np.asarray(reconstruction) if not isinstance(reconstruction, torch.Tensor) else reconstruction)
    if x.shape != y.shape:
        raise ValueError(f"reference and reconstruction shapes differ: {list(x.shape)} vs {list(y.shape)}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"expected a batch [N, ...] with N >= 1, got shape {list(x.shape)}")
    x = x.detach().cpu().to(torch.float64).flatten(1)
    y = y.detach().cpu().to(torch.float64).flatten(1)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("reference or reconstruction contains NaN or Inf")
    diff = y - x
    mse = diff.pow(2).mean(1)
    max_abs = diff.abs().amax(1)
    norm = x.norm(dim=1)
    relative = diff.norm(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm))
    out = {
        "mse": float(mse.mean()),
        "max_abs_error": float(max_abs.max()),
        "relative_error": float(relative.mean()),
        "num_images": int(x.shape[0]),
    }
    if data_range is not None:
        if not data_range > 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
        psnr = [math.inf if m == 0 else 10 * math.log10(data_range**2 / m) for m in mse.tolist()]
        out["psnr"] = float(np.mean(psnr))
        out["data_range"] = float(data_range)
        if per_image:
            out["psnr_per_image"] = psnr
    if per_image:
        out.update(mse_per_image=mse.tolist(), max_abs_error_per_image=max_abs.tolist(),
                   relative_error_per_image=relative.tolist())
    return out


def pixel_metrics(reference, reconstruction, data_range: float = 2.0, per_image: bool = True) -> dict:
    """Pixel space: images ``[N, C, H, W]`` in ``[-1, 1]`` (EDM convention), PSNR with ``data_range=2``, and
    :func:`ssim`."""
    out = reconstruction_metrics(reference, reconstruction, data_range=data_range, per_image=per_image)
    values = ssim(reference, reconstruction, data_range=data_range)
    out["ssim"] = float(values.mean())
    if per_image:
        out["ssim_per_image"] = values.tolist()
    return out


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(reference, reconstruction, data_range: float, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, float64 ``[N]``: local means, variances and covariance
    under an ``window`` x ``window`` Gaussian (``sigma`` 1.5) over the positions where the window fits, per
    channel, ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``; averaged over positions and channels. Images smaller
    than the window use a window of their size."""
    x = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference)
    y = torch.as_tensor(np.asarray(reconstruction) if not isinstance(reconstruction, torch.Tensor) else reconstruction)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] batches of one shape, got {list(x.shape)} and {list(y.shape)}")
    x, y = x.detach().cpu().to(torch.float64), y.detach().cpu().to(torch.float64)
    n, c, h, w = x.shape
    size = min(window, h, w)
    g = _gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


def latent_metrics(reference, reconstruction, per_image: bool = True) -> dict:
    """Latent space (e.g. SD's VAE latents, or the noise pair of an inversion): MSE, max abs, relative error."""
    return reconstruction_metrics(reference, reconstruction, data_range=None, per_image=per_image)


class Reconstruction:
    """Compare a run's images with a reference run's (or image folder's) images with the same seeds, as uint8
    pixels (``data_range=255``). Args: ``reference`` (run folder, .npz or image folder), ``per_image``."""

    def __init__(self, reference, data_range: float = 255.0, per_image: bool = False):
        self.reference, self.data_range, self.per_image = reference, float(data_range), bool(per_image)

    def __call__(self, images, run_dir=None) -> dict:
        source, ref = open_images(images), open_images(self.reference, description="metrics.reconstruction.reference")
        if source.seeds is not None and ref.seeds is not None:
            position = {int(s): i for i, s in enumerate(ref.seeds)}
            missing = [int(s) for s in source.seeds if int(s) not in position]
            if missing:
                raise ValueError(f"metrics.reconstruction.reference has no images for seeds {missing[:5]}")
            ref_images = ref.batch([position[int(s)] for s in source.seeds])
        elif len(ref) == len(source):
            ref_images = ref.all()
        else:
            raise ValueError(f"cannot match {len(source)} images with {len(ref)} reference images (no seeds)")
        out = reconstruction_metrics(ref_images, source.all(), self.data_range, self.per_image)
        out["reference"] = str(self.reference)
        return out
