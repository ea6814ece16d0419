"""Analytic demo models: Gaussian mixtures whose exact denoiser stands in for a trained network.

* :func:`digits_gmm`: one isotropic Gaussian per handwritten digit of scikit-learn's ``load_digits()`` (1797
  8x8 images that ship inside the scikit-learn package, so this works offline). Its probability-flow ODE
  carries noise onto (a slightly noisy copy of) one training digit, so samples look like digits; it is what
  ``scripts/sample.py`` samples by default, before trained networks exist.
* :func:`gmm_toy`: a small random mixture in any shape, for tests and solver experiments.

Both return a :class:`bdia.GaussianMixtureDenoiser`, whose output for one image does not depend on the
other images in its batch.

* :class:`FlowGaussianMixture`: the same mixture under the rectified-flow path ``x_t = (1 - t) x0 + t eps``, as a
  flow model (coordinates ``"flow"``, :mod:`bdia.flow`) with its closed-form velocity, finite at ``t = 1``.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from .data import digits_images
from .denoisers import GaussianMixtureDenoiser, _per_row
from .schedules import flow_time

__all__ = ["digits_gmm", "gmm_toy", "mixture_metrics", "FlowGaussianMixture"]


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


class FlowGaussianMixture(nn.Module):
    """The exact velocity of a Gaussian mixture ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` under the rectified-flow path
    ``x_t = (1 - t) x0 + t eps``: a flow model (coordinates ``"flow"``) for exact tests and accuracy studies.

    With ``a = 1 - t``, ``x_t | k ~ N(a mu_k, (a^2 s_k^2 + t^2) I)``, and per component
    ``E[eps - x0 | x_t, k] = c_k (x_t - a mu_k) - mu_k`` with ``c_k = (t - a s_k^2) / (a^2 s_k^2 + t^2)``, so

        v(x_t, t) = x_t sum_k r_k c_k - sum_k r_k (a c_k + 1) mu_k,

    ``r_k`` the posterior component probabilities given ``x_t``. Everything is computed in ``x_t``, so ``t = 1``
    (``v = x_t - E[x0]``) and ``t = 0`` are ordinary points. Called as ``model(x_t, sigma)`` with EDM's ``sigma``
    (``t = sigma / (1 + sigma)``), like :class:`bdia.flow.FlowDenoiser`; float64, one small product per row.
    :meth:`from_mixture` takes the components of a :class:`bdia.GaussianMixtureDenoiser`, whose
    ``(x_t - t v) `` at ``x = x_t / (1 - t)`` it equals (an independent check of both).
    """

    coordinates = "flow"

    def __init__(self, means, stds, weights=None):
        super().__init__()
        mixture = GaussianMixtureDenoiser(means, stds, weights)  # the same checks
        self.register_buffer("means", mixture.means)
        self.register_buffer("stds", mixture.stds)
        self.register_buffer("weights", mixture.weights)
        self.sigma_min = 0.0
        self.sigma_max = math.inf

    @classmethod
    def from_mixture(cls, mixture: GaussianMixtureDenoiser) -> "FlowGaussianMixture":
        return cls(mixture.means, mixture.stds, mixture.weights)

    def round_sigma(self, sigma):
        return sigma

    @property
    def event_shape(self):
        return tuple(self.means.shape[1:])

    def forward(self, x, sigma, class_labels=None, **cond):
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        t = flow_time(_per_row(sigma, flat))  # [B, 1]
        a = 1 - t
        means = self.means.reshape(self.means.shape[0], -1)  # [K, d]
        var = a**2 * self.stds**2 + t**2  # [B, K]
        # ||x_t - a mu_k||^2 per row, in difference form (no cancellation for far-away rows)
        sq = torch.stack([torch.cdist(row[None], a_row * means, compute_mode="donot_use_mm_for_euclid_dist")[0]
                          for row, a_row in zip(flat, a[:, 0])]).square()
        dim = means.shape[1]
        resp = (self.weights.log() - 0.5 * sq / var - 0.5 * dim * var.log()).softmax(dim=-1)  # [B, K]
        c = (t - a * self.stds**2) / var  # [B, K]
        keep = (resp * c).sum(-1, keepdim=True)  # [B, 1]
        pulled = torch.bmm((resp * (a * c + 1)).unsqueeze(1), means.expand(flat.shape[0], *means.shape)).squeeze(1)
        return (keep * flat - pulled).reshape(x.shape).to(x.dtype)

    def sample_data(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num`` samples of x0 (float64)."""
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn((num, *self.event_shape), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k].reshape(-1, *([1] * len(self.event_shape))) * noise
