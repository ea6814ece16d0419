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

:func:`pixel_metrics` (``[-1, 1]`` images, ``data_range=2``) and :func:`latent_metrics` (no PSNR) are the two
spaces of the inversion comparison. LPIPS is **not** provided: the ``lpips`` package downloads its VGG/AlexNet
backbone from torchvision at run time, which is not offline-safe, and torch-fidelity's LPIPS does the same.

:class:`Reconstruction` is the metric-config wrapper (``configs/metrics/reconstruction.yaml``): it compares a
run's uint8 images with a reference run's images, matched by seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .images import open_images

__all__ = ["reconstruction_metrics", "pixel_metrics", "latent_metrics", "Reconstruction"]


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
    """Pixel space: images in ``[-1, 1]`` (EDM convention), PSNR with ``data_range=2``."""
    return reconstruction_metrics(reference, reconstruction, data_range=data_range, per_image=per_image)


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
