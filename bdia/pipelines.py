"""Exact inversion with any loaded diffusers Stable Diffusion pipeline, through the drop-in schedulers of
:mod:`bdia.schedulers`: :func:`invert_with_pipeline` runs a photo back to BDIA's noise-side pair with the
pipeline's own UNet, VAE and text encoder; :func:`regenerate_with_pipeline` runs the pipeline from that pair,
under the same prompt (the reconstruction) or another (the edit).
"""

from __future__ import annotations

import torch

from .schedulers import BDIADDIMInverseScheduler, BDIADDIMScheduler, BDIAInvertedPair

__all__ = ["invert_with_pipeline", "regenerate_with_pipeline"]


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
                         guidance_scale: float = 7.5, negative_prompt: str = "") -> BDIAInvertedPair:
    """Invert ``image`` exactly with a loaded ``StableDiffusionPipeline`` (its VAE, text encoder, UNet and
    scheduler config): BDIA inversion under ``prompt`` with classifier-free guidance, the model evaluated on the
    pipeline's own dtype. Returns the :class:`BDIAInvertedPair`; :func:`regenerate_with_pipeline` (or any
    pipeline whose scheduler got :meth:`BDIADDIMScheduler.regenerate_from`) regenerates the latent from it up to
    round-off (use a float64 pipeline for a round trip to ~1e-12)."""
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
                             guidance_scale: float = 7.5, output_type: str = "pil", **pipe_kwargs):
    """Run ``pipe`` from an inverted ``pair`` with a :class:`BDIADDIMScheduler` of the pair's gamma that continues
    the pair (:meth:`BDIADDIMScheduler.regenerate_from`): the source ``prompt`` reconstructs the image, another
    prompt edits it. The pipeline's own scheduler is put back afterwards. Returns the pipeline's output."""
    original = pipe.scheduler
    scheduler = BDIADDIMScheduler.from_config(original.config, gamma=pair.gamma)
    scheduler.regenerate_from(pair)
    pipe.scheduler = scheduler
    try:
        return pipe(prompt, latents=pair.upper, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    output_type=output_type, **pipe_kwargs)
    finally:
        pipe.scheduler = original
