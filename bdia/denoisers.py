"""Denoisers: one protocol, EDM's, and adapters onto it.

A denoiser is a callable ``D(x, sigma, class_labels=None, **cond) -> denoised`` with ``x = x0 + sigma * n``
(EDM's convention), returning an estimate of ``E[x0 | x]`` of the same shape as ``x``. It also carries
``sigma_min``, ``sigma_max`` and ``round_sigma`` (EDM's network attributes). EDM's preconditioned networks
satisfy this protocol as they are.

``sigma`` is a 0-dim tensor or one value per batch row. Solvers keep their state in float64; the cast to the
network's dtype happens inside the denoiser (EDM's preconditioners cast to float32 or fp16 themselves).
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .schedules import sigma_to_timestep, sigmas_from_alphas_cumprod

__all__ = [
    "Denoiser",
    "VPEpsDenoiser",
    "DenoiserWrapper",
    "ClassifierFreeGuidance",
    "CountingDenoiser",
    "RowCountingDenoiser",
    "FixedBatchDenoiser",
    "MAX_NETWORK_BATCH",
    "check_network_batch",
    "GaussianMixtureDenoiser",
    "EmpiricalDenoiser",
]


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **cond) -> torch.Tensor: ...

    def round_sigma(self, sigma): ...


def _per_row(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma as shape [B, 1, ..., 1] (broadcastable against x), float64, on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class VPEpsDenoiser(nn.Module):
    """A discrete-time VP model (DDPM, Stable Diffusion) seen as an EDM denoiser.

    ``model(z, timestep, **cond)`` predicts noise (``prediction_type="epsilon"``) or
    ``v = alpha * eps - sigma_z * x0`` (``"v_prediction"``) for the VP latent ``z = alpha * x0 + sigma_z * eps``.
    With ``alpha = 1 / sqrt(1 + sigma**2)``:

    * the model sees ``z = alpha * x`` (the input scaling) and the timestep whose training level equals
      ``sigma`` (:func:`bdia.schedules.sigma_to_timestep`: exact integers on the training grid, log-sigma
      interpolated fractional labels between grid points, an error outside the trained range);
    * ``denoised = x - sigma * eps`` (epsilon), or ``alpha * z - sigma_z * v`` (v-prediction).

    ``model`` may return a tensor or an object with a ``.sample`` attribute (diffusers' UNet outputs).
    The model runs in ``model_dtype``; by default the dtype of its floating-point parameters (the state's
    dtype for a parameter-free callable). ``integer_timesteps=True`` rounds labels to the nearest integer instead of interpolating (for models that
    only accept integer labels); grid points are unaffected.
    """

    def __init__(
        self,
        model,
        alphas_cumprod,
        prediction_type: str = "epsilon",
        model_dtype: torch.dtype | None = None,
        integer_timesteps: bool = False,
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        self.model_dtype = model_dtype
        self.integer_timesteps = integer_timesteps
        self.register_buffer("train_sigmas", sigmas_from_alphas_cumprod(alphas_cumprod), persistent=False)
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])

    def round_sigma(self, sigma):
        return sigma

    def _parameter_dtype(self):
        parameters = self.model.parameters() if isinstance(self.model, nn.Module) else ()
        return next((p.dtype for p in parameters if p.is_floating_point()), None)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma, self.train_sigmas)
        return t.round() if self.integer_timesteps else t

    def forward(self, x, sigma, class_labels=None, **cond):
        if class_labels is not None:
            cond = {"class_labels": class_labels, **cond}
        sigma = _per_row(sigma, x)
        alpha = (1 + sigma**2).rsqrt()
        dtype = self.model_dtype or self._parameter_dtype() or x.dtype
        z = (x.to(torch.float64) * alpha).to(dtype)
        timestep = self.timestep(sigma.flatten())
        if self.integer_timesteps:
            timestep = timestep.long()
        out = self.model(z, timestep, **cond)
        out = getattr(out, "sample", out).to(torch.float64)
        if self.prediction_type == "epsilon":
            denoised = x.to(torch.float64) - sigma * out
        else:
            sigma_z = sigma * alpha
            denoised = alpha * z.to(torch.float64) - sigma_z * out
        return denoised.to(x.dtype)


class DenoiserWrapper(nn.Module):
    """Base for wrappers around a denoiser: forwards ``sigma_min``, ``sigma_max``, ``round_sigma`` and
    ``coordinates`` (``"flow"`` for a flow-matching model, whose states are its latents ``x_t`` and whose output is
    a velocity; see :mod:`bdia.flow`)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    @property
    def coordinates(self):
        return getattr(self.denoiser, "coordinates", "edm")

    @property
    def sigma_min(self):
        return self.denoiser.sigma_min

    @property
    def sigma_max(self):
        return self.denoiser.sigma_max

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)


class ClassifierFreeGuidance(DenoiserWrapper):
    """``D_cfg = D(x | uncond) + scale * (D(x | cond) - D(x | uncond))``, both halves in one batched call.

    ``uncond`` maps each conditioning keyword to its unconditional value (e.g. the empty-prompt embedding,
    or class labels of zeros); tensors of batch size 1 are broadcast to the batch. ``guidance_scale = 1``
    is plain conditional sampling. Guidance on ``denoised`` equals guidance on eps for any fixed (x, sigma),
    since ``eps = (x - denoised) / sigma`` is affine in ``denoised``.
    """

    def __init__(self, denoiser, guidance_scale: float, uncond: Mapping[str, torch.Tensor]):
        super().__init__(denoiser)
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond)

    def forward(self, x, sigma, class_labels=None, **cond):
        if class_labels is not None:
            cond = {"class_labels": class_labels, **cond}
        batch = x.shape[0]
        missing = set(self.uncond) - set(cond)
        if missing:
            raise ValueError(f"classifier-free guidance: no conditional value given for {sorted(missing)}")

        def expand(v):
            return v.expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v

        both = {}
        for key, value in cond.items():
            if key in self.uncond:
                both[key] = torch.cat([expand(self.uncond[key]).to(value), expand(value)])
            else:
                both[key] = torch.cat([expand(value)] * 2) if isinstance(value, torch.Tensor) else value
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma2 = sigma.repeat(2) if sigma.ndim == 1 and sigma.numel() == batch else sigma
        labels = both.pop("class_labels", None)
        denoised = self.denoiser(torch.cat([x, x]), sigma2, labels, **both)
        uncond_out, cond_out = denoised.chunk(2)
        return uncond_out + self.guidance_scale * (cond_out - uncond_out)


class CountingDenoiser(DenoiserWrapper):
    """Counts network evaluations (NFE), so solvers' costs are measured rather than assumed.

    One call counts as one evaluation whatever the batch size (a classifier-free-guidance call, which runs
    the network once on a doubled batch, counts once).
    """

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.nfe = 0

    def reset(self) -> None:
        self.nfe = 0

    def forward(self, x, sigma, class_labels=None, **cond):
        self.nfe += 1
        return self.denoiser(x, sigma, class_labels, **cond)


class RowCountingDenoiser(CountingDenoiser):
    """:class:`CountingDenoiser` that also counts the batch rows the network evaluates (``network_rows``): a
    guided call on B images runs 2B rows, an unguided one B."""

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.network_rows = 0

    def reset(self) -> None:
        super().reset()
        self.network_rows = 0

    def forward(self, x, sigma, class_labels=None, **cond):
        self.network_rows += int(x.shape[0])
        return super().forward(x, sigma, class_labels, **cond)


#: Bound on the rows per network call (it sizes allocations): far above any real run.
MAX_NETWORK_BATCH = 65536


def check_network_batch(rows, allow_none: bool = True) -> None:
    if rows is None and allow_none:
        return
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_NETWORK_BATCH:
        raise ValueError(f"network_batch must be auto, an integer in 1..{MAX_NETWORK_BATCH} or null, got {rows!r}")


class FixedBatchDenoiser(DenoiserWrapper):
    """Calls ``denoiser`` on chunks of exactly ``rows`` rows, padding the last chunk with copies of its final
    row and dropping their outputs.

    Float32 convolutions and matrix products pick their kernels, and so their rounding, by the input's shape
    (measured on the CPU: EDM's networks give other low bits for the same image in a batch of 1 and of 5).
    With the shape fixed, row k's output depends on row k alone, so an image is bit-identical whatever the
    batch size or number of processes. Per-row tensors among ``sigma``, ``class_labels`` and ``cond`` (first
    dimension = batch) are chunked alongside ``x``.
    """

    def __init__(self, denoiser, rows: int):
        super().__init__(denoiser)
        check_network_batch(rows, allow_none=False)
        self.rows = rows

    def forward(self, x, sigma, class_labels=None, **cond):
        batch = x.shape[0]

        def take(value, start, stop):
            if not (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch):
                return value
            part = value[start:stop]
            missing = self.rows - part.shape[0]
            if missing:
                part = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
            return part

        outputs = []
        for start in range(0, batch, self.rows):
            stop = min(start + self.rows, batch)
            chunk = {k: take(v, start, stop) for k, v in cond.items()}
            out = self.denoiser(take(x, start, stop), take(sigma, start, stop), take(class_labels, start, stop), **chunk)
            outputs.append(out[: stop - start])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class GaussianMixtureDenoiser(nn.Module):
    """Exact posterior mean for data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` (isotropic components).

    With ``x = x0 + sigma * n``: ``p(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I)`` and

        E[x0 | x] = sum_k r_k(x) (mu_k + c_k (x - mu_k)) = x sum_k r_k c_k + sum_k r_k (1 - c_k) mu_k,

    with ``c_k = s_k^2 / (s_k^2 + sigma^2)`` and responsibilities ``r_k`` the posterior component
    probabilities. Non-linear in ``x`` when K > 1; computed in float64 with ``[B, K]`` temporaries only (fast
    for thousands of components), one small product per image so a row's result does not depend on the
    batch it is in. ``means`` has shape ``[K, *event_shape]``; inputs ``[B, *event_shape]``.
    ``component_labels`` (optional, ``[K]`` ints) names each component's class.
    """

    def __init__(self, means, stds, weights=None, sigma_min: float = 0.0, sigma_max: float = float("inf"), component_labels=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (stds <= 0).any():
            raise ValueError("component standard deviations must be positive")
        if weights.shape != (K,) or (weights <= 0).any():
            raise ValueError(f"weights must be {K} positive numbers")
        labels = None if component_labels is None else torch.as_tensor(component_labels, dtype=torch.long)
        if labels is not None and labels.shape != (K,):
            raise ValueError(f"component_labels must have one label per component ({K}), got shape {tuple(labels.shape)}")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("component_labels", labels)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def round_sigma(self, sigma):
        return sigma

    @property
    def event_shape(self):
        return tuple(self.means.shape[1:])

    def squared_distances(self, x):
        """``[B, K]`` squared distances from each row of ``x`` to each mean (difference form, float64)."""
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        means = self.means.reshape(self.means.shape[0], -1)
        return torch.cdist(flat, means, compute_mode="donot_use_mm_for_euclid_dist").square()

    def log_prob_components(self, x, sigma):
        """[B, K] log of ``w_k N(x; mu_k, (s_k^2 + sigma^2) I)``."""
        dim = self.means[0].numel()
        sq = self.squared_distances(x)
        var = self.stds**2 + _per_row(sigma, sq) ** 2  # [B, K]
        return self.weights.log() - 0.5 * sq / var - 0.5 * dim * (var.log() + math.log(2 * math.pi))

    def forward(self, x, sigma, class_labels=None, **cond):
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        resp = self.log_prob_components(x, sigma).softmax(dim=-1)  # [B, K]
        shrink = self.stds**2 / (self.stds**2 + _per_row(sigma, flat) ** 2)  # c_k, [B, K]
        keep = (resp * shrink).sum(-1, keepdim=True)  # [B, 1]
        means = self.means.reshape(self.means.shape[0], -1)
        pulled = torch.bmm((resp * (1 - shrink)).unsqueeze(1), means.expand(flat.shape[0], *means.shape)).squeeze(1)
        return (keep * flat + pulled).reshape(x.shape).to(x.dtype)

    def sample_data(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num`` samples of x0 (float64)."""
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn((num, *self.event_shape), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k].reshape(-1, *([1] * len(self.event_shape))) * noise


class EmpiricalDenoiser(nn.Module):
    """The optimal denoiser of a finite data set ``{y_j}`` (the posterior mean under the empirical distribution):

        D(x, sigma) = sum_j softmax_j(-||x - y_j||^2 / (2 sigma^2)) y_j.

    Its probability-flow ODE ends on the training points (it memorises), which makes it a hard, highly
    non-linear test problem. ``data`` has shape ``[M, *event_shape]``; computed in float64.
    """

    def __init__(self, data, sigma_min: float = 1e-3, sigma_max: float = float("inf")):
        super().__init__()
        self.register_buffer("data", torch.as_tensor(data, dtype=torch.float64))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def round_sigma(self, sigma):
        return sigma

    def forward(self, x, sigma, class_labels=None, **cond):
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        data = self.data.reshape(self.data.shape[0], -1)
        sigma_row = _per_row(sigma, flat)  # [B, 1]
        sq = torch.cdist(flat, data, compute_mode="donot_use_mm_for_euclid_dist").square()  # [B, M]
        resp = (-sq / (2 * sigma_row**2)).softmax(dim=-1)
        return (resp @ data).reshape(x.shape).to(x.dtype)
