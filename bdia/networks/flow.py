"""Flow-matching text-to-image models through diffusers (Stable Diffusion 3 / 3.5, FLUX.1), as components our
solvers drive.

:class:`FlowModel` holds a loaded diffusers pipeline (its transformer, VAE, text encoders, tokenizers) and the
checkpoint's scheduler settings; it holds no solver state. The solver loop is ours (:func:`bdia.sample` /
:func:`bdia.invert`), in the flow's own coordinates (:mod:`bdia.flow`):

    fm = load_flow("flux-dev")                              # or load_flow(path="/models/my-flux-folder")
    sigmas = fm.sigmas(28, height=1024, width=1024)         # EDM convention, sigmas[0] = inf (t = 1)
    cond = fm.encode_prompts(["a photo of a cat"])          # dict for cond=
    noise = torch.randn(1, *fm.latent_shape(1024, 1024), dtype=torch.float64)  # the latents at t = 1
    latents = bdia.sample(fm.denoiser(), noise, sigmas, solver="bdia_ddim", gamma=0.5, cond=cond)
    images = fm.decode_latents(latents)                     # [-1, 1]

    clean = fm.encode_images(images)                        # exact inversion of a photo
    pair = bdia.invert(fm.denoiser(), clean, sigmas, solver="bdia_ddim", gamma=0.96, cond=cond)

States are the model's latents ``x_t`` (unpacked ``[B, C, h, w]`` also for FLUX, whose transformer sees them
packed 2x2 into tokens: :class:`FluxVelocity` packs and unpacks, a permutation). The model sees what the pipelines
show it: SD3's label ``t * 1000`` (float32) with classifier-free guidance on the velocity, FLUX's label
``t * 1000 / 1000`` in the latents' dtype with its guidance embedding.

Loading is offline first, as :func:`bdia.networks.load_sd`: a Hub id is read from the Hugging Face cache; offline
and not cached, :class:`bdia.download.AssetUnavailableError` names the Hub URL, the cache path and ``model.path``.
SD3 and FLUX.1-dev are gated on the Hub (accept the licence and log in before the first download).
:func:`bdia.testing.build_tiny_sd3` / :func:`bdia.testing.build_tiny_flux` write tiny random ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..denoisers import ClassifierFreeGuidance
from ..flow import FLOW_SCHEDULE_KEYS, FlowDenoiser, flow_shift_mu, flow_sigmas
from .sd import load_checkpoint, resolve_dtype

__all__ = ["FLOW_MODELS", "FlowModel", "FluxVelocity", "SD3Velocity", "load_flow", "is_flow_model"]

#: The checkpoints the configs name (``configs/sd/model/<name>.yaml``): Hub id, family, the pipelines' default
#: guidance and steps, and the scheduler settings their ``scheduler_config.json`` is published with. The loader reads
#: the checkpoint's own scheduler config; these copies document it (not verified here: the Hub is unreachable).
FLOW_MODELS = {
    "sd3-medium": dict(repo_id="stabilityai/stable-diffusion-3-medium-diffusers", family="sd3", guidance="cfg",
                       guidance_scale=7.0, num_steps=28, scheduler=dict(shift=3.0)),
    "sd3.5-medium": dict(repo_id="stabilityai/stable-diffusion-3.5-medium", family="sd3", guidance="cfg",
                         guidance_scale=4.5, num_steps=40, scheduler=dict(shift=3.0)),
    "sd3.5-large": dict(repo_id="stabilityai/stable-diffusion-3.5-large", family="sd3", guidance="cfg",
                        guidance_scale=3.5, num_steps=28, scheduler=dict(shift=3.0)),
    "flux-dev": dict(repo_id="black-forest-labs/FLUX.1-dev", family="flux", guidance="embedded", guidance_scale=3.5,
                     num_steps=28, scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
    "flux-schnell": dict(repo_id="black-forest-labs/FLUX.1-schnell", family="flux", guidance="none",
                         guidance_scale=0.0, num_steps=4, scheduler=dict(shift=1.0, use_dynamic_shifting=False)),
}

_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


# --------------------------------------------------------------------------------------------------
# The networks as velocity models ``model(x_t, timestep, **cond)`` for bdia.flow.FlowDenoiser.


class SD3Velocity(nn.Module):
    """``SD3Transformer2DModel`` as ``model(x_t, timestep, encoder_hidden_states, pooled_projections)``: the label
    (``t * 1000``, float32) as ``StableDiffusion3Pipeline`` passes it, the velocity out."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


class FluxVelocity(nn.Module):
    """``FluxTransformer2DModel`` as ``model(x_t, timestep, encoder_hidden_states, pooled_projections)`` on unpacked
    latents ``[B, C, h, w]``: packed into ``[B, (h/2)(w/2), 4C]`` tokens with their position ids and the text ids
    (zeros) as ``FluxPipeline`` builds them, the label passed as the pipeline does (``t * 1000`` in float32, then in
    the latents' dtype divided by 1000), the guidance embedding ``guidance_scale`` (``None``: a model without one,
    FLUX.1-schnell), the velocity unpacked."""

    def __init__(self, transformer, guidance_scale: float | None = None):
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = guidance_scale

    @staticmethod
    def pack(x):
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens, h, w):
        b, _, channels = tokens.shape
        x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def forward(self, x, timestep, encoder_hidden_states, pooled_projections):
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need an even height and width, got {h}x{w}")
        image_ids = torch.zeros(h // 2, w // 2, 3)
        image_ids[..., 1] = image_ids[..., 1] + torch.arange(h // 2)[:, None]
        image_ids[..., 2] = image_ids[..., 2] + torch.arange(w // 2)[None, :]
        image_ids = image_ids.reshape(-1, 3).to(device=x.device, dtype=x.dtype)
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=encoder_hidden_states.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            scale = 3.5 if self.guidance_scale is None else self.guidance_scale
            guidance = torch.full([1], scale, device=x.device, dtype=torch.float32).expand(b)
        out = self.transformer(hidden_states=self.pack(x), timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=text_ids, img_ids=image_ids, joint_attention_kwargs={}, return_dict=False)[0]
        return self.unpack(out, h, w)


# --------------------------------------------------------------------------------------------------
# The container.


class FlowModel:
    """A loaded SD3 / FLUX pipeline and what the solvers need from it (see the module notes).

    Attributes:
        pipe: the diffusers pipeline (``StableDiffusion3Pipeline`` or ``FluxPipeline``): components, prompt encoding,
            and a pipeline for :func:`bdia.pipelines.invert_with_pipeline`.
        family: ``"sd3"`` or ``"flux"``; ``guidance``: ``"cfg"`` (SD3), ``"embedded"`` (FLUX.1-dev) or ``"none"``
            (FLUX.1-schnell); ``default_guidance_scale``, ``default_num_steps``: the pipeline's / model card's.
        scheduler_config: the checkpoint's ``FlowMatchEulerDiscreteScheduler`` settings (the grid's).
        latent_scaling, latent_shift: the VAE's ``scaling_factor`` / ``shift_factor``.
        dtype, device, source.
    """

    def __init__(self, pipe, dtype=torch.float32, device="cpu", source: str | None = None, entry: dict | None = None):
        self.pipe = pipe
        self.family = _PIPELINES[type(pipe).__name__]
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.source = source
        entry = entry or {}
        self.scheduler_config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        if self.family == "sd3":
            self.guidance = "cfg"
        else:
            self.guidance = "embedded" if pipe.transformer.config.guidance_embeds else "none"
        self.default_guidance_scale = float(entry.get("guidance_scale", {"cfg": 7.0, "embedded": 3.5, "none": 0.0}[
            self.guidance]))
        self.default_num_steps = int(entry.get("num_steps", 28))
        self.latent_scaling = float(pipe.vae.config.scaling_factor)
        self.latent_shift = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        if any(m.dtype != self.dtype for m in (pipe.transformer, pipe.vae)):
            pipe.to(dtype=self.dtype)  # from_pretrained leaves SD3's transformer in float32 whatever dtype asks
        pipe.to(self.device)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    # --- shapes --------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def image_size(self) -> int:
        """Default image side in pixels (the pipeline's ``default_sample_size * vae_scale_factor``)."""
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(C, H / f, W / f)`` of one (unpacked) latent; FLUX needs sides divisible by ``2 f`` (packing)."""
        height, width = int(height or self.image_size), int(width or self.image_size)
        f = self.vae_scale_factor
        multiple = f * (2 if self.family == "flux" else int(self.transformer.config.patch_size))
        if height < 1 or width < 1 or height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple} for {self.family}")
        return (self.latent_channels, height // f, width // f)

    def image_seq_len(self, height: int | None = None, width: int | None = None) -> int:
        """The transformer's number of image tokens (the ``mu`` of dynamic shifting depends on it)."""
        _, h, w = self.latent_shape(height, width)
        patch = 2 if self.family == "flux" else int(self.transformer.config.patch_size)
        return (h // patch) * (w // patch)

    # --- text ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> dict:
        """The conditioning for ``cond=``: ``{"encoder_hidden_states", "pooled_projections"}``, computed by the
        pipeline's own ``encode_prompt`` (SD3: two CLIPs and T5 or its zeros, max 256 T5 tokens; FLUX: CLIP pooled +
        T5, max 512), in ``self.dtype``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("encode_prompts: no prompts given")
        if self.family == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length or 256)
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=max_sequence_length or 512)
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    # --- images --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> clean latents ``(posterior mean - shift) * scaling``, float64
        ``[B, C, H/f, W/f]`` (deterministic: the posterior mean)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects [B, 3, H, W] images in [-1, 1], got shape {tuple(images.shape)}")
        self.latent_shape(images.shape[-2], images.shape[-1])  # divisibility
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return (posterior.mean.to(torch.float64) - self.latent_shift) * self.latent_scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``[B, C, h, w]`` -> images ``[B, 3, h f, w f]`` in ``[-1, 1]`` (clamped), float32."""
        z = latents.to(torch.float64) / self.latent_scaling + self.latent_shift
        return self.vae.decode(z.to(self.device, self.dtype)).sample.to(torch.float32).clamp(-1, 1)

    # --- the denoiser and the grid ------------------------------------------------------------------

    def velocity_model(self, guidance_scale: float | None = None) -> nn.Module:
        """The bare network as ``model(x_t, timestep, **cond)`` (FLUX: with its guidance embedding)."""
        if self.family == "sd3":
            return SD3Velocity(self.transformer)
        return FluxVelocity(self.transformer, self._guidance(guidance_scale) if self.guidance == "embedded" else None)

    def _guidance(self, guidance_scale):
        value = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(value):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        return value

    def denoiser(self, guidance_scale: float | None = None, uncond: dict | None = None):
        """The flow model for the solvers (:class:`bdia.flow.FlowDenoiser`, coordinates ``"flow"``, called with
        ``cond=`` from :meth:`encode_prompts`). SD3: classifier-free guidance on the velocity,
        ``v_u + s (v_c - v_u)`` as the pipeline applies it, the unconditional half on ``uncond`` (default: the empty
        prompt, as the pipeline without a negative prompt), ``guidance_scale <= 1`` none; default the model's
        (:attr:`default_guidance_scale`). FLUX.1-dev: ``guidance_scale`` is its guidance embedding (one network
        call, no unconditional half); with ``uncond`` (a negative prompt's :meth:`encode_prompts`) it adds true
        classifier-free guidance at the same scale."""
        scale = self._guidance(guidance_scale)
        flow = FlowDenoiser(self.velocity_model(guidance_scale), model_dtype=self.dtype)
        if self.family == "sd3" and scale > 1:
            return ClassifierFreeGuidance(flow, scale, uncond if uncond is not None else self.encode_prompts([""]))
        if self.family == "flux" and uncond is not None:
            return ClassifierFreeGuidance(flow, scale, uncond)
        return flow

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None, sigmas=None,
               mu: float | None = None) -> torch.Tensor:
        """The grid the pipeline would run (EDM convention, float64, ``sigmas[0] = inf``; :func:`bdia.flow.flow_sigmas`
        with the checkpoint's scheduler config): SD3 ``set_timesteps(num_steps, mu=...)`` (``mu`` from the image
        size when the config shifts dynamically), FLUX its custom ``linspace(1, 1/N, N)`` and ``mu`` from the image
        size (:func:`bdia.flow.flow_shift_mu`, the pipeline's ``calculate_shift``)."""
        config = {k: v for k, v in self.scheduler_config.items() if k in FLOW_SCHEDULE_KEYS}
        if self.family == "flux" and sigmas is None and not self.scheduler_config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if mu is None and (self.family == "flux" or config.get("use_dynamic_shifting")):
            mu = flow_shift_mu(self.image_seq_len(height, width), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15 if self.family == "flux" else 1.16))
        return flow_sigmas(None if sigmas is not None else int(num_steps), sigmas=sigmas, mu=mu, **config)

    def describe(self) -> dict:
        """What identifies the model in run records."""
        return {"source": self.source, "family": self.family, "dtype": str(self.dtype).replace("torch.", ""),
                "guidance": self.guidance, "latent_scaling": self.latent_scaling, "latent_shift": self.latent_shift,
                "scheduler": self.scheduler_config}


def is_flow_model(model) -> bool:
    """Whether ``model`` is a loaded flow-matching model (:class:`FlowModel`: SD3, FLUX), which the apps step in its
    own latents, rather than a Stable Diffusion (:class:`bdia.networks.sd.StableDiffusion`)."""
    return isinstance(model, FlowModel)


# --------------------------------------------------------------------------------------------------
# Loading.


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _load_pipeline(source, dtype, local_files_only: bool, t5: bool):
    index = _read_model_index(source, local_files_only)
    class_name = index.get("_class_name")
    if class_name not in _PIPELINES:
        raise ValueError(f"model_index.json names {class_name!r}; flow models are {sorted(_PIPELINES)}")
    absent = {key: None for key, value in index.items()
              if isinstance(value, list) and value and value[0] is None}
    if class_name == "StableDiffusion3Pipeline" and not t5:
        absent.update(text_encoder_3=None, tokenizer_3=None)
    return _pipeline_class(class_name).from_pretrained(source, dtype=dtype, local_files_only=local_files_only,
                                                       **absent)


def _read_model_index(source, local_files_only: bool) -> dict:
    local = Path(str(source))
    if local.is_dir():
        path = local / "model_index.json"
        if not path.is_file():
            raise OSError(f"no model_index.json in {local}")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(str(source), "model_index.json",
                                           local_files_only=local_files_only)).read_text())


def load_flow(name: str | None = "flux-dev", path: str | None = None, dtype=torch.float32, device="cpu",
              t5: bool = True) -> FlowModel:
    """Load a Stable Diffusion 3 / 3.5 or FLUX.1 checkpoint (a diffusers folder or Hub id) as a :class:`FlowModel`.

    Args:
        name: a key of :data:`FLOW_MODELS` (``sd3-medium``, ``sd3.5-medium``, ``sd3.5-large``, ``flux-dev``,
            ``flux-schnell``) or a Hub id ``owner/name`` of a diffusers SD3 / FLUX checkpoint.
        path: a local diffusers folder (``model_index.json`` naming ``StableDiffusion3Pipeline`` or ``FluxPipeline``);
            wins over ``name``. Config key ``model.path``.
        dtype: the networks' dtype (``float16`` / ``bfloat16`` / ``float32`` / ``float64`` or a torch dtype); solver
            states stay float64.
        t5: SD3 only: load the T5 text encoder when the checkpoint has one (``False``: without it, as SD3 allows).

    Raises:
        AssetUnavailableError: the folder does not exist or is incomplete, or the Hub checkpoint is not in the Hugging
            Face cache and cannot be downloaded (offline: at once); the message names the Hub URL, the cache path and
            ``model.path``.
        ValueError: an unknown name.
    """
    dtype = resolve_dtype(dtype)
    local = path is not None and str(path).strip()
    entry = {} if local or name is None else FLOW_MODELS.get(str(name).strip(), {})
    pipe, source = load_checkpoint(
        name, path, {key: value["repo_id"] for key, value in FLOW_MODELS.items()},
        lambda source, local_only: _load_pipeline(source, dtype, local_files_only=local_only, t5=t5), "SD3 / FLUX",
        download_hint="; SD3 and FLUX.1-dev are gated: accept the licence on the Hub and log in")
    return FlowModel(pipe, dtype=dtype, device=device, source=source, entry=entry)
