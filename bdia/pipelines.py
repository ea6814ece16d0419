"""Exact inversion with any loaded diffusers Stable Diffusion pipeline, through the drop-in schedulers of
:mod:`bdia.schedulers`: :func:`invert_with_pipeline` runs a photo back to BDIA's noise-side pair with the
pipeline's own UNet, VAE and text encoder; :func:`regenerate_with_pipeline` runs the pipeline from that pair,
under the same prompt (the reconstruction) or another (the edit).

Flow-matching pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``) take the same two calls, through
:mod:`bdia.flow_schedulers`: the inversion loop repeats the pipeline's own denoising loop op for op (its prompt
encoding, classifier-free guidance for SD3 / guidance embedding and optional true CFG for FLUX, its grid with
``mu`` and, for FLUX, its custom ``sigmas``), so the model sees at each latent what the pipeline would show it.
FLUX's latents are the pipeline's packed tokens ``[B, (h/2)(w/2), 4C]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .flow_schedulers import BDIAFlowMatchEulerScheduler, BDIAFlowMatchInverseScheduler
from .schedulers import BDIADDIMInverseScheduler, BDIADDIMScheduler, BDIAInvertedPair

__all__ = ["invert_with_pipeline", "regenerate_with_pipeline", "pipeline_family"]


def pipeline_family(pipe) -> str:
    """``"sd"`` (a UNet pipeline: Stable Diffusion 1.x/2.x), ``"sd3"`` or ``"flux"`` (flow-matching transformers)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        name = type(transformer).__name__
        if name.startswith("SD3"):
            return "sd3"
        if name.startswith("Flux"):
            return "flux"
        raise ValueError(f"{type(pipe).__name__} with a {name}: only StableDiffusion3Pipeline and FluxPipeline among "
                         "transformer pipelines")
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{type(pipe).__name__} has neither a UNet nor a transformer")
    return "sd"


def _pipeline_latents(pipe, image: torch.Tensor) -> torch.Tensor:
    """``image``: pixels in [-1, 1] ``[B, 3, H, W]`` (encoded with the pipeline's VAE, the posterior mean, scaled
    as the pipeline scales its latents) or latents ``[B, C, h, w]`` already in the UNet's space."""
    if image.ndim != 4:
        raise ValueError(f"image must be [B, C, H, W] pixels in [-1, 1] or latents, got shape {tuple(image.shape)}")
    if image.shape[1] == pipe.unet.config.in_channels and image.shape[1] != 3:
        return image.to(device=pipe.device, dtype=pipe.unet.dtype)
    pixels = image.to(device=pipe.device, dtype=pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def invert_with_pipeline(pipe, image: torch.Tensor, prompt: str, num_inference_steps: int = 50, gamma: float = 0.96,
                         guidance_scale: float | None = None, negative_prompt: str | None = None,
                         **flow_options) -> BDIAInvertedPair:
    """Invert ``image`` exactly with a loaded ``StableDiffusionPipeline`` (its VAE, text encoder, UNet and
    scheduler config): BDIA inversion under ``prompt`` with classifier-free guidance, the model evaluated on the
    pipeline's own dtype. Returns the :class:`BDIAInvertedPair`; :func:`regenerate_with_pipeline` (or any
    pipeline whose scheduler got :meth:`BDIADDIMScheduler.regenerate_from`) regenerates the latent from it up to
    round-off (use a float64 pipeline for a round trip to ~1e-12).

    ``StableDiffusion3Pipeline`` / ``FluxPipeline``: the same with :class:`bdia.flow_schedulers.BDIAFlowMatchInverseScheduler`
    (``num_inference_steps`` network calls); ``guidance_scale`` defaults to the pipeline's (SD 7.5, SD3 7.0, FLUX
    3.5, its guidance embedding); ``flow_options``: ``max_sequence_length``, FLUX's ``true_cfg_scale`` (with
    ``negative_prompt``), ``height`` / ``width`` for FLUX latents given packed."""
    family = pipeline_family(pipe)
    if family != "sd":
        return _invert_flow(pipe, family, BDIAFlowMatchInverseScheduler, image, prompt, num_inference_steps, gamma,
                            guidance_scale, negative_prompt, **flow_options)
    if flow_options:
        raise TypeError(f"unexpected argument(s) for a Stable Diffusion pipeline: {sorted(flow_options)}")
    guidance_scale = 7.5 if guidance_scale is None else guidance_scale
    negative_prompt = "" if negative_prompt is None else negative_prompt
    z = _pipeline_latents(pipe, image)
    guided = float(guidance_scale) > 1.0
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, z.shape[0], guided, negative_prompt)
    embeds = torch.cat([uncond, cond]) if guided else cond
    inverse = BDIADDIMInverseScheduler.from_config(pipe.scheduler.config, gamma=gamma)
    inverse.set_timesteps(num_inference_steps, device=pipe.device)
    for t in inverse.timesteps:
        eps = pipe.unet(torch.cat([z, z]) if guided else z, t, encoder_hidden_states=embeds).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        z = inverse.step(eps, t, z).prev_sample
    return inverse.inverted_pair


def regenerate_with_pipeline(pipe, pair: BDIAInvertedPair, prompt: str, num_inference_steps: int = 50,
                             guidance_scale: float | None = None, output_type: str = "pil", **pipe_kwargs):
    """Run ``pipe`` from an inverted ``pair`` with a :class:`BDIADDIMScheduler` of the pair's gamma that continues
    the pair (:meth:`BDIADDIMScheduler.regenerate_from`): the source ``prompt`` reconstructs the image, another
    prompt edits it. The pipeline's own scheduler is put back afterwards. Returns the pipeline's output.

    SD3 / FLUX pipelines: the same with :class:`bdia.flow_schedulers.BDIAFlowMatchEulerScheduler`; ``guidance_scale``
    defaults to the pipeline's (SD 7.5); a string prompt makes as many images as the pair has latents; FLUX's image
    size is read from its packed latents when they are square (else pass ``height`` / ``width``)."""
    family = pipeline_family(pipe)
    original = pipe.scheduler
    if family == "sd":
        scheduler = BDIADDIMScheduler.from_config(original.config, gamma=pair.gamma)
        pipe_kwargs["guidance_scale"] = 7.5 if guidance_scale is None else guidance_scale
    else:
        scheduler = BDIAFlowMatchEulerScheduler.from_config(original.config, gamma=pair.gamma)
        if guidance_scale is not None:
            pipe_kwargs["guidance_scale"] = guidance_scale
        if isinstance(prompt, str):
            pipe_kwargs.setdefault("num_images_per_prompt", pair.upper.shape[0])
        if family == "flux" and "height" not in pipe_kwargs and "width" not in pipe_kwargs:
            pipe_kwargs["height"] = pipe_kwargs["width"] = _flux_side(pipe, pair.upper)
    scheduler.regenerate_from(pair)
    pipe.scheduler = scheduler
    try:
        return pipe(prompt, latents=pair.upper, num_inference_steps=num_inference_steps, output_type=output_type,
                    **pipe_kwargs)
    finally:
        pipe.scheduler = original


# --------------------------------------------------------------------------------------------------
# Flow-matching pipelines: their denoising loops, run through the inverse scheduler.


def _flux_side(pipe, packed: torch.Tensor) -> int:
    """The image side (pixels) of square FLUX packed latents ``[B, L, C]``: ``2 sqrt(L)`` latent pixels."""
    side = math.isqrt(int(packed.shape[1]))
    if side * side != packed.shape[1]:
        raise ValueError(f"FLUX latents with {packed.shape[1]} tokens are not square: pass height= and width=")
    return 2 * side * pipe.vae_scale_factor


def _flow_latents(pipe, family: str, image: torch.Tensor, height=None, width=None):
    """``(latents, height, width)``: pixels ``[B, 3, H, W]`` in [-1, 1] encoded with the VAE (the posterior mean,
    shifted and scaled as the pipeline undoes it before decoding; FLUX: packed), or the pipeline's own latents."""
    dtype = pipe.transformer.dtype
    if family == "flux" and image.ndim == 3:  # packed latents
        height = height or _flux_side(pipe, image)
        return image.to(device=pipe.device, dtype=dtype), height, width or height
    if image.ndim != 4:
        raise ValueError(f"image must be [B, 3, H, W] pixels in [-1, 1] or the pipeline's latents, got shape "
                         f"{tuple(image.shape)}")
    if family == "sd3" and image.shape[1] == pipe.transformer.config.in_channels and image.shape[1] != 3:
        return image.to(device=pipe.device, dtype=dtype), None, None
    if image.shape[1] != 3:
        raise ValueError(f"image must have 3 channels (pixels in [-1, 1]), got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    multiple = pipe.vae_scale_factor * (2 if family == "flux" else 1)
    if height % multiple or width % multiple:
        raise ValueError(f"{family} images need sides divisible by {multiple}, got {height}x{width}")
    mean = pipe.vae.encode(image.to(device=pipe.device, dtype=pipe.vae.dtype)).latent_dist.mean
    z = ((mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).to(dtype)
    if family == "flux":
        batch, channels, h, w = z.shape
        z = pipe._pack_latents(z, batch, channels, h, w)
    return z, height, width


def _velocity_sd3(pipe, guidance_scale: float, embeds, pooled):
    guided = guidance_scale > 1

    def velocity(z, t):
        model_input = torch.cat([z] * 2) if guided else z
        out = pipe.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                               encoder_hidden_states=embeds, pooled_projections=pooled, joint_attention_kwargs=None,
                               return_dict=False)[0]
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    return velocity


def _velocity_flux(pipe, guidance, true_cfg_scale, positive, negative, image_ids):
    def call(z, t, embeds, pooled, text_ids, context):
        timestep = t.expand(z.shape[0]).to(z.dtype)
        with pipe.transformer.cache_context(context):
            return pipe.transformer(hidden_states=z, timestep=timestep / 1000, guidance=guidance,
                                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                    img_ids=image_ids, joint_attention_kwargs={}, return_dict=False)[0]

    def velocity(z, t):
        out = call(z, t, *positive, "cond")
        if negative is not None:
            negative_out = call(z, t, *negative, "uncond")
            out = negative_out + true_cfg_scale * (out - negative_out)
        return out

    return velocity


def _invert_flow(pipe, family, inverse_cls, image, prompt, num_inference_steps, gamma, guidance_scale,
                 negative_prompt, max_sequence_length=None, true_cfg_scale: float = 1.0, height=None, width=None):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    z, height, width = _flow_latents(pipe, family, image, height, width)
    batch, device, config = z.shape[0], pipe.device, pipe.scheduler.config
    # the prompt encoded as the pipeline's call encodes it (regenerate_with_pipeline: one string, B images)
    prompts, per_prompt = (prompt, batch) if isinstance(prompt, str) else (list(prompt), 1)
    if per_prompt == 1 and len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} images")
    inverse = inverse_cls.from_config(config, gamma=gamma)
    if family == "sd3":
        guidance_scale = 7.0 if guidance_scale is None else float(guidance_scale)
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance_scale > 1, device=device, num_images_per_prompt=per_prompt,
            max_sequence_length=max_sequence_length or 256)
        if guidance_scale > 1:
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
        velocity = _velocity_sd3(pipe, guidance_scale, embeds, pooled)
        mu = None
        if config.get("use_dynamic_shifting", None):  # as StableDiffusion3Pipeline computes it
            patch = pipe.transformer.config.patch_size
            mu = calculate_shift((z.shape[2] // patch) * (z.shape[3] // patch), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.16))
        inverse.set_timesteps(num_inference_steps, device=device, **({} if mu is None else {"mu": mu}))
    else:
        guidance_scale = 3.5 if guidance_scale is None else float(guidance_scale)
        length = max_sequence_length or 512
        positive = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=per_prompt,
                                      max_sequence_length=length)
        negative = None
        if float(true_cfg_scale) > 1 and negative_prompt is not None:
            negative = pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=device,
                                          num_images_per_prompt=per_prompt, max_sequence_length=length)
        image_ids = pipe._prepare_latent_image_ids(batch, 2 * (int(height) // (pipe.vae_scale_factor * 2)) // 2,
                                                   2 * (int(width) // (pipe.vae_scale_factor * 2)) // 2, device, z.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
        velocity = _velocity_flux(pipe, guidance, float(true_cfg_scale), positive, negative, image_ids)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)  # what FluxPipeline passes
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(z.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        inverse.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    for t in inverse.timesteps:
        z = inverse.step(velocity(z, t), t, z, return_dict=False)[0]
    return inverse.inverted_pair
