"""Analytic demo models: Gaussian mixtures whose exact denoiser stands in for a trained network.

* :func:`digits_gmm`: one isotropic Gaussian per handwritten digit of scikit-learn's ``load_digits()`` (1797
  8x8 images that ship inside the scikit-learn package, so this works offline). Its probability-flow ODE
  carries noise onto (a slightly noisy copy of) one training digit, so samples look like digits; it is what
  ``scripts/sample.py`` samples by default, before trained networks exist.
* :func:`gmm_toy`: a small random mixture in any shape, for tests and solver experiments.

Both return a :class:`bdia.GaussianMixtureDenoiser`, whose output for one image does not depend on the
other images in its batch.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from .data import digits_images
from .denoisers import GaussianMixtureDenoiser

__all__ = ["digits_gmm", "gmm_toy", "mixture_metrics"]


#: The largest image side of the digits mixture (every component holds a full float64 image).
MAX_IMAGE_SIZE = 256


def digits_gmm(
    image_size: int = 16,
    std: float = 0.05,
    num_components: int | None = None,
    classes: Sequence[int] | None = None,
    interpolation: str = "bilinear",
) -> GaussianMixtureDenoiser:
    """A Gaussian mixture on ``[1, image_size, image_size]`` images: one component per scikit-learn digit.

    Each of the (first ``num_components``, optionally only ``classes``) 8x8 images of
    ``sklearn.datasets.load_digits()`` (values 0..16, white strokes on black) is scaled to EDM's pixel range
    ``[-1, 1]``, resized to ``image_size`` (``interpolation``: ``"bilinear"`` or ``"nearest"``; bilinear stays
    inside ``[-1, 1]``), and becomes the mean of a component with isotropic standard deviation ``std`` and
    equal weight. Sampling the exact denoiser then yields a training digit plus a little Gaussian grain of
    size ``std``. The data set is in dataset order, which cycles through the classes, so any prefix is
    roughly balanced.
    """
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    # 1797 components of image_size**2 float64 pixels each: 256 px is ~0.9 GB already.
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {image_size!r}")
    images, labels = digits_images(image_size, "all", interpolation, dtype=torch.float64)
    if classes is not None:
        wanted = sorted({int(c) for c in classes})
        if not wanted or any(c not in range(10) for c in wanted):
            raise ValueError(f"classes must be digits 0..9, got {list(classes)!r}")
        keep = torch.isin(labels, torch.tensor(wanted))
        images, labels = images[keep], labels[keep]
    if num_components is not None:
        if not 1 <= num_components <= len(images):
            raise ValueError(f"num_components must be in [1, {len(images)}], got {num_components}")
        images, labels = images[:num_components], labels[:num_components]
    means = images
    return GaussianMixtureDenoiser(means, std, component_labels=labels)


def gmm_toy(
    dim: int | Sequence[int] = 2,
    num_components: int = 8,
    seed: int = 0,
    std: float = 0.1,
    spread: float = 1.0,
) -> GaussianMixtureDenoiser:
    """A random mixture of ``num_components`` equal-weight isotropic Gaussians (standard deviation ``std``) with
    means drawn uniformly from ``[-spread, spread]`` by a generator seeded with ``seed``. ``dim`` is the event
    size or a full event shape (e.g. ``(1, 4, 4)`` for tiny images)."""
    shape = (int(dim),) if isinstance(dim, (int, float)) else tuple(int(d) for d in dim)
    if not shape or min(shape) < 1:
        raise ValueError(f"dim must be a positive size or shape, got {dim!r}")
    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    generator = torch.Generator().manual_seed(int(seed))
    means = (torch.rand((num_components, *shape), dtype=torch.float64, generator=generator) * 2 - 1) * spread
    return GaussianMixtureDenoiser(means, std)


@torch.no_grad()
def mixture_metrics(
    denoiser: GaussianMixtureDenoiser, samples: torch.Tensor, reference_seed: int = 0, chunk_size: int = 4096
) -> dict:
    """How well ``samples`` (float, ``[B, *event_shape]``) follow the mixture ``denoiser`` describes.

    * ``nearest_mean_rms``: per-pixel RMS distance from each sample to its nearest component mean, averaged;
      exact samples give about ``std`` (slightly less);
    * ``log_prob_per_dim``: mean log-density of the samples under the data distribution (nats per dimension),
      beside ``log_prob_per_dim_reference``, the same for as many exact draws from the mixture;
    * ``class_counts``: how many samples lie nearest to a component of each class (when the mixture has
      ``component_labels``), e.g. whether all ten digits appear.
    """
    samples = samples.to(torch.float64).cpu()
    den = denoiser if denoiser.means.device.type == "cpu" else copy.deepcopy(denoiser).cpu()
    dim = samples[0].numel()
    zero = torch.zeros((), dtype=torch.float64)

    def log_prob(x):
        return den.log_prob_components(x, zero).logsumexp(-1)

    def nearest(x):
        return den.squared_distances(x).min(-1)

    def chunked(fn, x):  # bounded memory for many samples: [chunk, K] at a time
        parts = [fn(x[i : i + chunk_size]) for i in range(0, len(x), chunk_size)]
        return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)

    nearest_sq, nearest_index = chunked(nearest, samples)
    generator = torch.Generator().manual_seed(int(reference_seed))
    reference = den.sample_data(len(samples), generator=generator)
    out = {
        "nearest_mean_rms": float((nearest_sq / dim).sqrt().mean()),
        "component_std": float(den.stds.mean()),
        "log_prob_per_dim": float(chunked(log_prob, samples).mean() / dim),
        "log_prob_per_dim_reference": float(chunked(log_prob, reference).mean() / dim),
    }
    labels = getattr(den, "component_labels", None)
    if labels is not None:
        counts = torch.bincount(labels[nearest_index], minlength=int(labels.max()) + 1)
        out["class_counts"] = {str(c): int(n) for c, n in enumerate(counts.tolist())}
    return out
