"""Stable Diffusion through diffusers, as components our solvers drive.

:class:`StableDiffusion` is a plain container of the diffusers / transformers components (UNet, VAE, CLIP text
encoder, tokenizer) and the scheduler numbers the solvers need; it holds no solver state. The solver loop is
always ours (:func:`bdia.sample` / :func:`bdia.invert`), never ``scheduler.step``:

    sd = load_sd("sd15")                                   # or load_sd(path="/models/my-sd-folder")
    sigmas = sd.sigmas(50)                                 # EDM-convention sigmas on the checkpoint's DDIM grid
    embeds = sd.encode_prompts(["a photo of a cat"])
    z_init = torch.randn(1, 4, 64, 64, dtype=torch.float64)  # diffusers' initial latents (init_noise_sigma = 1)
    x = bdia.sample(sd.denoiser(7.5), z_to_x(z_init, sigmas[0]), sigmas, solver="bdia_ddim", gamma=0.5,
                    cond={"encoder_hidden_states": embeds})
    images = sd.decode_latents(x_to_z(x, sigmas[-1]))      # [-1, 1]

Coordinates (``docs/design.md``): VP latents ``z = alpha x0 + sigma_z eps`` (what the UNet sees and
what diffusers' pipelines carry), EDM-scaled state ``x = z / alpha`` with ``sigma = sigma_z / alpha`` (what our
solvers carry), ``alpha = 1 / sqrt(1 + sigma**2)``. diffusers draws its initial latents as unit normals in
z-space, so the matching initial state is ``x = z / alpha(sigmas[0]) = z * sqrt(1 + sigmas[0]**2)`` — not
``z * sigmas[0]`` (the two differ by ~0.2% for SD's ``sigma_max`` of 14.6).

Loading is offline first: a Hub id is read from the Hugging Face cache (``local_files_only``); only when that
fails and the process is online (neither ``HF_HUB_OFFLINE`` nor ``BDIA_OFFLINE`` set, and the Hub reachable
within a few seconds) is it downloaded. Otherwise :class:`bdia.download.AssetUnavailableError` is raised at
once, naming the Hub URL, the cache path and ``model.path`` (which takes any local diffusers folder).

:func:`bdia.testing.build_tiny_sd` writes a tiny random SD as a diffusers folder, for tests and offline demos
(``scripts/make_tiny_sd.py``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..denoisers import ClassifierFreeGuidance, VPEpsDenoiser
from ..download import AssetUnavailableError, hub_cache_path, hub_reachable, is_offline
from ..schedules import make_alphas_cumprod, vp_sigmas, x_to_z, z_to_x  # noqa: F401  (z/x: re-exported)

__all__ = [
    "SD_MODELS",
    "StableDiffusion",
    "load_sd",
    "z_to_x",
    "x_to_z",
    "PATH_KEY",
]

#: Hub ids of the checkpoints the configs name (``configs/sd/model/sd15.yaml`` ...). v1.5 is the default; the
#: paper's own code used v2.1-base for text-to-image and v1.4 for editing.
SD_MODELS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd21_base": "stabilityai/stable-diffusion-2-1-base",
}

#: The config key that takes a local diffusers folder instead of a Hub id.
PATH_KEY = "model.path"

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """``torch.float32`` or a name (``float16``/``fp16``, ``bfloat16``, ``float32``/``fp32``, ``float64``/``fp64``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32, float64; got {dtype!r}") from None


# --------------------------------------------------------------------------------------------------
# The container.


class StableDiffusion:
    """The components of a Stable Diffusion checkpoint and the schedule numbers our solvers need.

    Attributes:
        unet, vae, text_encoder, tokenizer: the diffusers / transformers objects (eval mode, no grad).
        alphas_cumprod: float64 ``[T]``, computed in float64 from the checkpoint's scheduler config
            (SD: ``scaled_linear`` betas 0.00085..0.012; diffusers itself builds them in float32).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (scheduler config).
        latent_scaling: ``vae.config.scaling_factor`` (0.18215 for SD 1.x/2.x); ``latent_shift`` the VAE's
            ``shift_factor`` (0 for SD 1.x/2.x).
        schedule: the scheduler settings the grid uses (``timestep_spacing``, ``steps_offset``,
            ``set_alpha_to_one``, ``num_train_timesteps``).
        dtype, device: where and in which dtype the networks run; solver states stay float64.
        source: the Hub id or folder it was loaded from.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, dtype=torch.float32,
                 device="cpu", source: str | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.source = source
        self.scheduler_config = dict(scheduler_config)
        self.alphas_cumprod = alphas_cumprod_from_config(self.scheduler_config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{source}: prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")
        self.schedule = dict(
            num_train_timesteps=int(self.scheduler_config.get("num_train_timesteps", 1000)),
            timestep_spacing=self.scheduler_config.get("timestep_spacing", "leading"),
            steps_offset=int(self.scheduler_config.get("steps_offset", 0)),
            set_alpha_to_one=bool(self.scheduler_config.get("set_alpha_to_one", True)),
        )
        self.latent_scaling = float(vae.config.scaling_factor)
        self.latent_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        for module in (unet, vae, text_encoder):
            if module.dtype != self.dtype:
                module.to(dtype=self.dtype)
            module.to(device=self.device).eval().requires_grad_(False)

    # --- shapes --------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        """Default image side in pixels: ``unet.config.sample_size * vae_scale_factor`` (512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(C, H / f, W / f)`` of one latent for an image of ``height x width`` pixels (default: native size)."""
        height = int(height or self.image_size)
        width = int(width or self.image_size)
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    # --- text ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, L, D]`` CLIP text hidden states (``encoder_hidden_states``), as diffusers' pipelines compute them:
        tokens padded to ``tokenizer.model_max_length`` (77), truncated beyond it, last hidden layer; the
        attention mask is passed only when the text encoder's config asks for it. In ``self.dtype``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("encode_prompts: no prompts given")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
        return out[0].to(self.dtype)

    # --- images --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> clean latents ``z0 = (posterior mean - shift) * scaling``,
        float64 ``[B, C, H/f, W/f]`` (deterministic: the posterior mean, not a sample)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects [B, 3, H, W] images in [-1, 1], got shape {tuple(images.shape)}")
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return (posterior.mean.to(torch.float64) - self.latent_shift) * self.latent_scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``z0`` ``[B, C, h, w]`` -> images ``[B, 3, h*f, w*f]`` in ``[-1, 1]`` (clamped), float32."""
        z = latents.to(torch.float64) / self.latent_scaling + self.latent_shift
        images = self.vae.decode(z.to(self.device, self.dtype)).sample
        return images.to(torch.float32).clamp(-1, 1)

    # --- the denoiser and the grid ------------------------------------------------------------------

    def eps_denoiser(self) -> VPEpsDenoiser:
        """The UNet as an EDM-protocol denoiser ``D(x, sigma, encoder_hidden_states=...)``, no guidance."""
        return VPEpsDenoiser(self.unet, self.alphas_cumprod, self.prediction_type, model_dtype=self.dtype)

    def denoiser(self, guidance_scale: float = 7.5, uncond_embeds: torch.Tensor | None = None):
        """EDM-protocol denoiser ``D(x, sigma, encoder_hidden_states=embeds)`` with classifier-free guidance
        ``D_u + guidance_scale (D_c - D_u)`` (equal to guidance on eps, as diffusers applies it), the
        unconditional half conditioned on ``uncond_embeds`` (default: the empty prompt, ``encode_prompts([""])``,
        as diffusers' pipelines use without a negative prompt). ``guidance_scale = 1``: the plain conditional
        denoiser (one UNet batch per call, no unconditional half)."""
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        eps = self.eps_denoiser()
        if guidance_scale == 1.0:
            return eps
        if uncond_embeds is None:
            uncond_embeds = self.encode_prompts([""])
        return ClassifierFreeGuidance(eps, guidance_scale, {"encoder_hidden_states": uncond_embeds})

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The checkpoint's DDIM grid in EDM's convention (:func:`bdia.vp_sigmas`; ``num_steps + 1`` float64
        levels): ``sigma_t`` at diffusers' timesteps (SD: "leading" spacing, ``steps_offset`` 1), then the final
        level (SD: ``set_alpha_to_one`` False, so ``sigma_0`` ~ 0.0292)."""
        s = self.schedule
        return vp_sigmas(self.alphas_cumprod, int(num_steps), timestep_spacing=s["timestep_spacing"],
                         steps_offset=s["steps_offset"], set_alpha_to_one=s["set_alpha_to_one"])

    def describe(self) -> dict:
        """What identifies the model in run records."""
        return {"source": self.source, "dtype": str(self.dtype).replace("torch.", ""),
                "prediction_type": self.prediction_type, "latent_scaling": self.latent_scaling, **self.schedule,
                "beta_schedule": self.scheduler_config.get("beta_schedule"),
                "beta_start": self.scheduler_config.get("beta_start"),
                "beta_end": self.scheduler_config.get("beta_end")}


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """float64 ``alphas_cumprod`` from a diffusers scheduler config (``trained_betas`` or a named beta schedule)."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    return make_alphas_cumprod(
        beta_schedule=config.get("beta_schedule", "linear"),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        dtype=torch.float64,
    )


# --------------------------------------------------------------------------------------------------
# Loading.


def _load_components(source, dtype, local_files_only: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = dict(local_files_only=local_files_only)
    scheduler_config = _read_scheduler_config(source, local_files_only)
    # diffusers' low-memory loading needs `accelerate`; say so explicitly instead of a warning per model
    low_memory = dict(low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **low_memory, **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **low_memory, **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _read_scheduler_config(source, local_files_only: bool) -> dict:
    local = Path(str(source))
    if local.is_dir():
        path = local / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise OSError(f"no scheduler/scheduler_config.json in {local}")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(str(source), "scheduler_config.json", subfolder="scheduler",
                           local_files_only=local_files_only)
    return json.loads(Path(path).read_text())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def load_checkpoint(name, path, known: dict, load, kind: str, download_hint: str = ""):
    """The one way the diffusers loaders find a checkpoint: ``path`` (a local folder; wins over ``name``) or ``name`` (a
    key of ``known``, mapped to its Hub id, or a Hub id ``owner/name``), loaded from the Hugging Face cache, and
    downloaded once only when the cache lacks it, the process is not offline and the Hub answers a one-shot probe.
    ``load(source, local_files_only)`` reads the checkpoint (raising ``OSError`` / ``ValueError`` when it is absent or
    incomplete); ``kind`` names it in messages (``"Stable Diffusion"``), ``download_hint`` is added to a failed
    download's reason. Returns ``(load's result, source)``; every failure is one :class:`AssetUnavailableError`
    naming the Hub URL, the cache path and ``model.path``, or a ``ValueError`` for a name that is neither."""
    if path is not None and str(path).strip():
        local = Path(str(path).strip()).expanduser()
        if not local.is_dir():
            reason = "it is a file, not a diffusers folder" if local.exists() else "no such folder"
            raise AssetUnavailableError(None, local, PATH_KEY, reason=reason, what=f"{PATH_KEY}={path}")
        try:
            return load(local, True), str(local)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise AssetUnavailableError(None, local, PATH_KEY, what=f"{PATH_KEY}={path}",
                                        reason=f"not a complete {kind} diffusers folder ({_first_line(e)})") from None

    if name is None or not str(name).strip():
        raise ValueError(f"model: give a checkpoint name ({', '.join(known)}) or a local folder ({PATH_KEY}=...)")
    text = str(name).strip()
    repo_id = known.get(text, text)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise ValueError(f"model.name={text!r} is neither one of {', '.join(known)} nor a Hub id owner/name; "
                         f"for a local folder use {PATH_KEY}=/path/to/folder")

    def unavailable(reason):
        return AssetUnavailableError(f"https://huggingface.co/{repo_id}", hub_cache_path(repo_id), PATH_KEY,
                                     reason=reason, what=f"{kind} checkpoint {repo_id!r}")

    try:
        return load(repo_id, True), repo_id
    except (OSError, ValueError):
        if is_offline():
            var = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "BDIA_OFFLINE"
            raise unavailable(f"offline mode ({var}=1) and not (completely) in the Hugging Face cache") from None
        problem = hub_reachable()
        if problem:
            raise unavailable(f"not in the Hugging Face cache and the Hub is unreachable ({problem})") from None
        try:
            return load(repo_id, False), repo_id
        except (OSError, ValueError) as e:
            raise unavailable(f"download failed ({_first_line(e)}{download_hint})") from None


def load_sd(name: str | None = "sd15", path: str | None = None, dtype=torch.float32, device="cpu") -> StableDiffusion:
    """Load a Stable Diffusion checkpoint's UNet, VAE, text encoder, tokenizer and scheduler config.

    Args:
        name: ``sd15`` (default, ``stable-diffusion-v1-5/stable-diffusion-v1-5``), ``sd14``, ``sd21_base``
            (:data:`SD_MODELS`) or any Hub id (``owner/name``) of a diffusers SD checkpoint.
        path: a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/``); wins over ``name``. Config key ``model.path``.
        dtype: the networks' dtype (``torch.float16`` / ``float32`` / ``float64`` or its name). Solver states
            stay float64 whatever it is; :class:`bdia.VPEpsDenoiser` casts at the network's door.
        device: where the networks run.

    Raises:
        AssetUnavailableError: the folder does not exist or is incomplete; or the Hub checkpoint is not in the
            Hugging Face cache and cannot be downloaded (offline: at once, no retries). The message names
            the Hub URL, the cache path and ``model.path``.
        ValueError: an unknown short name.
    """
    dtype = resolve_dtype(dtype)
    parts, source = load_checkpoint(name, path, SD_MODELS,
                                    lambda source, local_only: _load_components(source, dtype, local_files_only=local_only),
                                    "Stable Diffusion")
    return StableDiffusion(*parts, dtype=dtype, device=device, source=source)
