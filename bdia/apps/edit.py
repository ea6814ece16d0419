"""The edit app behind ``scripts/edit.py``: one photo, a Stable Diffusion (or a flow-matching SD3 / FLUX model), every
inversion method of :data:`bdia.inversion.METHOD_REGISTRY` (flows: :data:`bdia.inversion.FLOW_METHOD_REGISTRY`), one
run folder.

:func:`invert_and_edit` is the harness over the registry: for one method it inverts the clean states under the
source prompt, regenerates them (the reconstruction) and regenerates them under the edit prompt (the edit),
measuring each phase; :func:`invert_image` is its first half, a :class:`CachedInversion` that regenerates under
any prompt as often as wanted (the web demo, :mod:`bdia.apps.demo`, edits many times from one). :func:`edit_run` reads the photo, encodes it, runs every method and writes the
side-by-side images, each method's representation and ``metrics.json``.

NFE is measured with :class:`bdia.inversion.RowCountingDenoiser` around ``base`` (one guided call, batched over
both halves, counts once; an unguided call also counts once); ``network_rows`` counts the batch rows the network
ran (a guided call on one image = 2 rows). Backward passes (null-text) are counted separately; each costs roughly
two forward passes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..denoisers import RowCountingDenoiser
from ..checks import check_flags, check_grid_size, check_image_grid, check_int, check_num_steps, check_number
from ..imageio import labelled_grid, png_bytes, quantize
from ..inversion import (
    FLOW_METHODS,
    METHOD_OPTION_NAMES,
    METHODS,
    EditSetup,
    Inverted,
    check_method,
    guided,
    latent_to_state,
    method_options,
    method_registry,
    state_to_latent,
    tail_sigmas,
)
from ..solvers import coordinates_of
from ..metrics.clip_score import clip_edit_metrics, load_clip
from ..metrics.lpips import LPIPS
from ..metrics.reconstruction import latent_metrics, pixel_metrics
from ..networks.flow import is_flow_model
from ..runfolder import check_out_dir, environment_info, jsonable, open_run
from ..testing import has_random_weights

__all__ = ["MethodResult", "CachedInversion", "invert_image", "invert_and_edit", "EncodedPhoto", "encode_photo",
           "default_guidance_scale", "as_cond", "SAMPLE_IMAGES", "load_image", "edit_run", "check_edit_settings",
           "image_identity", "EDIT_WRITTEN", "summary_rows", "FLOW_LOADER"]


# --------------------------------------------------------------------------------------------------
# One method, end to end, with measured cost.


@dataclass
class MethodResult:
    """One method's round trip and edit of a batch of clean states (EDM convention, at ``sigmas[-1]``).

    ``representation``: what the image inverts to (tensors; see :func:`invert_and_edit`). ``cost``: per phase
    (``inversion``, ``reconstruction``, ``edit``) the measured ``nfe``, ``network_rows``, ``backward_passes``,
    ``seconds`` (wall) and ``cpu_seconds`` (this process's CPU time: steadier than wall time on a shared machine). ``settings``: the method's parameters (gamma, p, guidance, steps, dtype ...)."""

    method: str
    reconstruction: torch.Tensor
    edit: torch.Tensor | None
    representation: dict
    cost: dict
    settings: dict


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _measured(counted: RowCountingDenoiser, device, fn):
    """``fn()`` and its cost: NFE and network rows through ``counted``, backward passes, wall and CPU seconds."""
    counted.reset()
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    _synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    backward = out.backward_passes if isinstance(out, Inverted) else 0
    return out, {"nfe": counted.nfe, "network_rows": counted.network_rows, "backward_passes": backward,
                 "seconds": seconds, "cpu_seconds": cpu_seconds}


@dataclass
class CachedInversion:
    """One method's inversion of a batch of clean states, kept to regenerate them under any prompt: what
    :func:`invert_and_edit` does in one go, and what an interactive editor (``bdia.apps.demo``) keeps between edits.

    ``inverted``: the method's :class:`bdia.inversion.Inverted` (representation and ``regenerate``); ``setup``: the
    counted denoiser and its guided version the method ran on; ``grid``: the inverted sigmas (the tail of the grid
    for ``strength < 1``); ``cost``: ``{"inversion": <measured cost>}``; ``settings``: as :class:`MethodResult`'s."""

    method: str
    inverted: Inverted
    setup: EditSetup
    grid: torch.Tensor
    device: torch.device
    settings: dict
    cost: dict

    def measure(self, fn):
        """``fn()`` (network calls through ``setup.counted``) and its measured cost, as each phase is measured."""
        return _measured(self.setup.counted, self.device, fn)

    def regenerate(self, embeds):
        """The clean states regenerated under the text embedding ``embeds`` (the source prompt's: the
        reconstruction; another: an edit), and the measured cost of that phase. ``embeds``: Stable Diffusion's
        embedding tensor, or a whole conditioning dict (a flow model's ``encode_prompts``)."""
        return self.measure(lambda: self.inverted.regenerate(as_cond(embeds)))


def as_cond(embeds) -> dict:
    """The conditioning dict of a prompt's encoding: SD's embedding tensor, or a flow model's dict as it is."""
    return dict(embeds) if isinstance(embeds, dict) else {"encoder_hidden_states": embeds}


def invert_image(
    method: str,
    base,
    x_clean: torch.Tensor,
    sigmas,
    source_embeds,
    uncond_embeds,
    guidance_scale: float = 7.5,
    strength: float = 1.0,
    options=None,
    **option_values,
) -> CachedInversion:
    """Invert ``x_clean`` under the source prompt with ``method``, measuring it; arguments as :func:`invert_and_edit`.
    Regenerate from the result with :meth:`CachedInversion.regenerate`, as many times as wanted."""
    known = METHOD_OPTION_NAMES
    unknown = sorted(set(option_values) - known)
    if unknown:
        raise ValueError(f"unknown editing option(s) {unknown}; options: {', '.join(sorted(known))}")
    flow = coordinates_of(base) == "flow"  # a flow-matching model: the flow methods (bdia.inversion)
    check_method(method, flow)
    registry = method_registry(flow)
    options = method_options(method, option_values, flow=flow) if options is None else options
    if not isinstance(options, registry[method].options):
        raise ValueError(f"{method} takes {registry[method].options.__name__}, got {type(options).__name__}")
    grid = tail_sigmas(sigmas, strength)
    counted = RowCountingDenoiser(base)
    setup = EditSetup(counted, guided(counted, guidance_scale, uncond_embeds), uncond_embeds, guidance_scale)
    source = as_cond(source_embeds)
    inverted, c_inv = _measured(counted, x_clean.device, lambda: registry[method].invert(setup, x_clean, grid, source, options))
    settings = {"method": method, "num_steps": len(grid) - 1, "strength": strength, "guidance_scale": guidance_scale,
                "dtype": str(x_clean.dtype).replace("torch.", ""), **inverted.settings}
    return CachedInversion(method, inverted, setup, grid, x_clean.device, settings, {"inversion": c_inv})


def invert_and_edit(
    method: str,
    base,
    x_clean: torch.Tensor,
    sigmas,
    source_embeds,
    uncond_embeds,
    edit_embeds=None,
    guidance_scale: float = 7.5,
    strength: float = 1.0,
    options=None,
    **option_values,
) -> MethodResult:
    """Invert ``x_clean`` under the source prompt, reconstruct it, and (with ``edit_embeds``) edit it, measuring
    each phase (:func:`invert_image`, then :meth:`CachedInversion.regenerate` under each prompt).

    ``method``: a :data:`METHOD_REGISTRY` name; its options as the dataclass ``options`` or as keywords (e.g.
    ``gamma=0.96`` for ``bdia``; keywords of the other methods are accepted and ignored, so one settings dict
    serves every method). ``base``: the unguided denoiser (``D(x, sigma, encoder_hidden_states=e)``);
    ``x_clean``: clean states at ``sigmas[-1]`` (:func:`latent_to_state` of the encoded images), batch B;
    embeddings ``[B or 1, L, D]``. ``strength``: the fraction of steps inverted and regenerated
    (:func:`tail_sigmas`). Every guided call uses ``guidance_scale`` (null-text's pivot is at guidance 1 by
    construction; DDIM inversion's guidance is its option).

    Representations: ``bdia`` -- ``x_end``, ``x_inner`` (the pair at the top of the grid); ``ddim`` -- ``x_noise``;
    ``edict`` -- ``x``, ``y``; ``null_text`` -- ``x_noise`` and ``uncond_embeds`` (stacked ``[N, ...]``).

    A flow-matching ``base`` (coordinates ``"flow"``: an SD3 / FLUX :meth:`FlowModel.denoiser` without
    classifier-free guidance) takes the flow methods (:data:`bdia.inversion.FLOW_METHOD_REGISTRY`): ``x_clean`` is
    the latent itself, the embeddings are :meth:`FlowModel.encode_prompts` dicts, ``uncond_embeds`` the empty
    prompt's (SD3) or ``None`` (FLUX: no unconditional half). Representations: ``rf_inversion`` -- ``x_noise``,
    ``reference`` (the image its reverse ODE steers to), ``target_noise``; ``rf_solver``, ``fireflow`` -- ``x_noise``.
    """
    cached = invert_image(method, base, x_clean, sigmas, source_embeds, uncond_embeds, guidance_scale, strength,
                          options, **option_values)
    reconstruction, c_rec = cached.regenerate(source_embeds)
    cost = {**cached.cost, "reconstruction": c_rec}
    edited = None
    if edit_embeds is not None:
        edited, cost["edit"] = cached.regenerate(edit_embeds)
    return MethodResult(method, reconstruction, edited, cached.inverted.representation, cost, cached.settings)


# --------------------------------------------------------------------------------------------------
# A photo encoded for one model: what every method inverts, on either kind of model.


def default_guidance_scale(sd) -> float:
    """The guidance an edit uses when none is given: Stable Diffusion's 7.5; a flow model's own
    (:attr:`bdia.networks.flow.FlowModel.default_guidance_scale`: SD3 7.0, FLUX.1-dev 3.5, FLUX.1-schnell 0, unused)."""
    return float(sd.default_guidance_scale) if is_flow_model(sd) else 7.5


@dataclass
class EncodedPhoto:
    """A batch of photos encoded for one model, with what :func:`invert_image` needs from that model.

    ``flow``: a flow-matching model (SD3, FLUX); ``z0``: the VAE latents (float64); ``sigmas``: the model's grid of
    ``num_steps`` steps at the photos' size (EDM convention; a flow's from ``inf`` = ``t = 1`` down to 0);
    ``x_clean``: the clean states at ``sigmas[-1]`` -- Stable Diffusion's ``z0 / alpha_N`` (:func:`latent_to_state`),
    a flow's latent itself; ``base``: the unguided denoiser (FLUX.1-dev: with ``guidance_scale`` as its guidance
    embedding); ``uncond``: the unconditional conditioning for classifier-free guidance (the empty prompt's; ``None``
    for FLUX, which has no unconditional half); ``guidance_scale``: the scale resolved (:func:`default_guidance_scale`
    for ``None``)."""

    flow: bool
    z0: torch.Tensor
    x_clean: torch.Tensor
    sigmas: torch.Tensor
    base: object
    uncond: object
    guidance_scale: float

    def latent(self, x: torch.Tensor, grid) -> torch.Tensor:
        """The latent the VAE decodes from a clean state ``x`` at ``grid[-1]`` (a flow's state is its latent)."""
        return x if self.flow else state_to_latent(x, grid)


def encode_photo(sd, pixels: torch.Tensor, num_steps: int, guidance_scale: float | None = None) -> EncodedPhoto:
    """Encode ``pixels`` (``[B, 3, H, W]`` in ``[-1, 1]``) with ``sd`` (a :class:`bdia.networks.sd.StableDiffusion` or a
    flow-matching :class:`bdia.networks.flow.FlowModel`) and give the clean states, the grid of ``num_steps`` steps at
    that size and the denoiser to invert them with (:class:`EncodedPhoto`): the one place where the edit app and the
    web demo (:mod:`bdia.apps.demo`) branch on the model's kind."""
    guidance_scale = default_guidance_scale(sd) if guidance_scale is None else float(guidance_scale)
    z0 = sd.encode_images(pixels)
    if is_flow_model(sd):  # the state is the latent x_t itself; the grid is the pipeline's at this size (FLUX: its mu)
        sigmas = sd.sigmas(num_steps, pixels.shape[-2], pixels.shape[-1])
        base = sd.denoiser(guidance_scale if sd.guidance == "embedded" else 1.0)  # FLUX: its guidance embedding
        uncond = sd.encode_prompts([""]) if sd.guidance == "cfg" else None  # SD3: classifier-free guidance
        return EncodedPhoto(True, z0, z0.to(torch.float64), sigmas, base, uncond, guidance_scale)
    sigmas = sd.sigmas(num_steps)
    return EncodedPhoto(False, z0, latent_to_state(z0, sigmas), sigmas, sd.eps_denoiser(), sd.encode_prompts([""]),
                        guidance_scale)


# --------------------------------------------------------------------------------------------------
# The edit run behind scripts/edit.py: an image, a Stable Diffusion, every method, one folder.

#: Photos that ship offline inside scikit-learn (``sklearn.datasets.load_sample_image``).
SAMPLE_IMAGES = ("china.jpg", "flower.jpg")
#: Larger photos are refused before decoding (the edit works on a square of at most a few thousand pixels).
MAX_IMAGE_PIXELS = 64 * 10**6


def _image_path(image) -> tuple[str, Path | None]:
    """``(name, path)`` of the ``image`` setting: a sample photo's name with ``None``, or a path to a regular file
    (checked without opening it: a folder, a FIFO or a device is refused by name)."""
    from pathlib import Path

    if image is not None and not isinstance(image, (str, Path)):
        raise ValueError(f"image must be a file path or one of {', '.join(SAMPLE_IMAGES)}, got {image!r}")
    name = "china.jpg" if image is None or not str(image).strip() else str(image).strip()
    if name in SAMPLE_IMAGES:
        return name, None
    path = Path(name).expanduser()
    if not os.path.lexists(path) or (path.is_symlink() and not path.exists()):
        raise ValueError(f"image={image}: no such file (give a path or one of {', '.join(SAMPLE_IMAGES)})")
    if path.is_dir():
        raise ValueError(f"image={image}: a folder, not an image file")
    if not path.is_file():
        raise ValueError(f"image={image}: not a regular file (a pipe, socket or device); give an image file")
    return name, path


def _open_picture(image):
    """The ``image`` setting as a PIL RGB picture, its size bounded from the header before decoding."""
    from PIL import Image

    name, path = _image_path(image)
    if path is None:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))
    try:
        with Image.open(path) as opened:  # reads the header only
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image={image}: {opened.width}x{opened.height} pixels, more than this app "
                                 f"reads ({MAX_IMAGE_PIXELS // 10**6} megapixels); resize it first")
            return opened.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"image={image}: too large to read safely ({e})") from None
    except OSError as e:
        raise ValueError(f"image={image}: not an image PIL can read ({e})") from None


def image_identity(image) -> str:
    """What identifies the ``image`` setting's content in ``settings.json``: a sample photo's name, or a file's
    sha256 (a changed file at the same path is another image)."""
    name, path = _image_path(image)
    if path is None:
        return f"sklearn:{name}"
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_image(image: str | None, size: int) -> torch.Tensor:
    """An RGB image as uint8 ``[1, 3, size, size]``: the largest centred square, resized (bicubic) to ``size``.
    ``image``: a file path, or ``china.jpg`` / ``flower.jpg`` (scikit-learn's sample photos; ``None`` = china)."""
    import numpy as np
    from PIL import Image

    picture = _open_picture(image)
    w, h = picture.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    picture = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).unsqueeze(0)


#: Bound on ``image_size`` (pixels per side): far above Stable Diffusion's native sizes.
MAX_IMAGE_SIZE = 4096
#: What an edit run writes (:mod:`bdia.runfolder`): ``resume=false`` removes these (and only these) first.
_ALL_METHODS = (*METHODS, *(m for m in FLOW_METHODS if m not in METHODS))
EDIT_WRITTEN = (rf"({'|'.join(_ALL_METHODS)})\.png", rf"({'|'.join(_ALL_METHODS)})_inversion\.npz", r"bdia_pair\.npz",
                r"edit_grid\.png", r"metrics\.json")

#: The ``_target_`` of the flow-matching model configs (``configs/flow/model/``): SD3 / FLUX, the flow methods.
FLOW_LOADER = "bdia.networks.flow.load_flow"


def check_edit_settings(image="china.jpg", source_prompt="", edit_prompt="", methods=None, num_steps=50,
                        guidance_scale=None, gamma=0.96, strength=1.0, p=0.93, leapfrog=True, num_inner_steps=10,
                        lr=1e-2, early_stop=1e-5, ddim_inversion_guidance=None, controller_gamma=0.5,
                        controller_eta=1.0, eta_start=0.0, eta_stop=0.25, target_noise_seed=0, image_size=None,
                        clip_path=None, lpips_net=None, lpips_weights=None, grid_scale=1, resume=True,
                        flow=False) -> list[str]:
    """Every :func:`edit_run` setting checked without a model (one-line ``ValueError`` naming the key); returns the
    methods as a list (``None``: every method for the model's kind). ``flow``: the model is a flow-matching one (SD3,
    FLUX), which takes the flow methods (:data:`bdia.inversion.FLOW_METHODS`) and refuses the VP-only ones (EDICT,
    null-text). ``scripts/edit.py`` calls it before loading the model."""
    check_flags(flow=flow)
    valid = FLOW_METHODS if flow else METHODS
    methods = list(valid) if methods is None else [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, (list, tuple)) or not methods or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"methods must be a non-empty list of {', '.join(valid)}, got {methods!r}")
    unknown = [m for m in methods if m not in _ALL_METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods: {'unknown ' + str(unknown) if unknown else 'a method given twice'} "
                         f"(choose from {', '.join(valid)})")
    for method in methods:  # a method of the other kind of model: one line saying which methods apply
        check_method(method, flow)
    for key, prompt in (("source_prompt", source_prompt), ("edit_prompt", edit_prompt)):
        if not isinstance(prompt, str):
            raise ValueError(f"{key} must be a string, got {type(prompt).__name__}")
    check_num_steps(num_steps)
    if guidance_scale is not None:  # None: the model's default (Stable Diffusion 7.5; SD3 / FLUX: their cards')
        check_number("guidance_scale", guidance_scale)
    if flow and ddim_inversion_guidance is not None:
        raise ValueError("ddim_inversion_guidance applies to Stable Diffusion's DDIM inversion; a flow model's flow-Euler "
                         "inversion uses guidance_scale (set ddim_inversion_guidance=null)")
    check_number("strength", strength, 0, 1, low_open=True)
    tail_sigmas(torch.linspace(1, 0.1, num_steps + 1, dtype=torch.float64), strength)  # >= 2 steps left
    if ddim_inversion_guidance is not None:
        check_number("ddim_inversion_guidance", ddim_inversion_guidance)
    check_flags(leapfrog=leapfrog, resume=resume)
    for method in methods:  # each method's options (gamma, p, num_inner_steps, lr, early_stop, ...) check themselves
        method_options(method, dict(gamma=gamma, p=p, leapfrog=leapfrog, num_inner_steps=num_inner_steps, lr=lr,
                                    early_stop=early_stop, ddim_inversion_guidance=ddim_inversion_guidance,
                                    controller_gamma=controller_gamma, controller_eta=controller_eta,
                                    eta_start=eta_start, eta_stop=eta_stop, target_noise_seed=target_noise_seed),
                       flow=flow)
    if image_size is not None:
        check_int("image_size", image_size, 8, MAX_IMAGE_SIZE)
    check_image_grid(None, grid_scale, 0)
    if lpips_net is not None and lpips_net not in ("alex", "vgg"):
        raise ValueError(f"lpips_net must be alex, vgg or null, got {lpips_net!r}")
    for key, value in (("clip_path", clip_path), ("lpips_weights", lpips_weights)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a path, a Hub id or null, got {value!r}")
    _image_path(image)
    return list(methods)


def check_config(cfg) -> None:
    """The checks of a composed ``configs/edit`` config that need no model (every :func:`edit_run` setting and the
    run folder, read-only): what ``scripts/edit.py`` runs on every job of a sweep before any runs, and again before
    it loads the model."""
    import inspect

    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    model = config.get("model")
    flow = isinstance(model, dict) and model.get("_target_") == FLOW_LOADER  # an SD3 / FLUX config (configs/flow/)
    for key in ("model", "logger", "experiment_name", "distributed", "device", "launcher"):
        config.pop(key, None)
    keys = [k for k in inspect.signature(edit_run).parameters if k not in ("sd", "config", "model_info")]
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"unknown edit settings {unknown}; valid keys: {', '.join(keys)}")
    check_edit_settings(**{k: v for k, v in config.items() if k not in ("out_dir", "progress")}, flow=flow)
    check_out_dir(config.get("out_dir"), "edit")


def edit_run(
    sd,
    out_dir,
    image: str | None = "china.jpg",
    source_prompt: str = "a photo of a chinese temple",
    edit_prompt: str = "a watercolor painting of a chinese temple",
    methods: Sequence[str] | None = None,
    num_steps: int = 50,
    guidance_scale: float | None = None,
    gamma: float = 0.96,
    strength: float = 1.0,
    p: float = 0.93,
    leapfrog: bool = True,
    num_inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    ddim_inversion_guidance: float | None = None,
    controller_gamma: float = 0.5,
    controller_eta: float = 1.0,
    eta_start: float = 0.0,
    eta_stop: float = 0.25,
    target_noise_seed: int = 0,
    image_size: int | None = None,
    clip_path: str | None = None,
    lpips_net: str | None = None,
    lpips_weights: str | None = None,
    grid_scale: int = 1,
    resume: bool = True,
    progress: bool = True,
    config: dict | None = None,
    model_info: dict | None = None,
) -> dict:
    """Encode ``image`` with ``sd`` (:class:`bdia.networks.sd.StableDiffusion`, or a flow-matching
    :class:`bdia.networks.flow.FlowModel`: SD3, FLUX), invert it under ``source_prompt`` with each method, reconstruct
    it, edit it with ``edit_prompt``; write into ``out_dir``:

    * ``<method>.png``: original | reconstruction | edit, side by side, labelled; ``edit_grid.png``: one row per
      method (named, with its latent round-trip error), columns named (original / reconstruction / edit: prompt),
      titled with the prompts (and, for a model with random weights, that its images are noise);
    * ``bdia_pair.npz``: BDIA's noise pair (``x_end`` at ``sigmas[0]``, ``x_inner`` at ``sigmas[1]``, EDM convention
      ``x = z / alpha``; a flow model's latents ``x_t`` themselves; ``sigmas`` is the inverted grid, ``gamma``) --
      ``bdia.sample(sd.denoiser(w), (x_end, x_inner), sigmas, solver="bdia_ddim", gamma=gamma, return_pair=True)``
      regenerates the image; other methods' representations in ``<method>_inversion.npz``;
    * ``metrics.json``: per method the latent round-trip errors (``relative_error``, ``max_abs_error``, ``mse`` of
      ``z``), image errors against the original (``psnr``, ``ssim``, ``mse``) and against the VAE's own
      reconstruction (``image_vs_vae``), the measured cost per phase (NFE, network rows, backward passes, seconds)
      and settings (gamma, N, dtype ...), with ``lpips_net`` (``alex`` | ``vgg``; backbone weights from
      ``lpips_weights`` or torchvision's cache, :mod:`bdia.metrics.lpips`) the reconstruction's LPIPS
      (``image.lpips``), and with ``clip_path`` (a CLIP model: Hub id or folder) the edit's CLIP
      score against the edit prompt and its CLIP directional similarity (``clip``); ``env.json``;
      ``config.yaml`` when ``config`` is given; ``settings.json`` (what determines the outputs).

    The folder follows the run-folder contract (:mod:`bdia.runfolder`): a new, empty or own edit folder; the
    settings are checked and the image read before the folder is claimed; a rerun with the same settings
    returns the finished run's metrics (or redoes an unfinished one), other settings are refused unless
    ``resume=False``, which first removes what an edit run writes (every method's files), so no earlier
    method's file stays beside the new ones. Image-space numbers include the VAE: ``vae`` in metrics.json is the
    encode/decode error alone. Returns the metrics.

    ``methods``: ``None`` is every method for the model's kind (:data:`bdia.inversion.METHODS` for Stable Diffusion,
    :data:`bdia.inversion.FLOW_METHODS` for SD3 / FLUX). ``guidance_scale``: ``None`` is the model's default (SD 7.5;
    SD3 / FLUX: :attr:`FlowModel.default_guidance_scale`); on SD3 it is classifier-free guidance, on FLUX.1-dev its
    guidance embedding (no unconditional half). ``controller_gamma``, ``controller_eta``, ``eta_start``, ``eta_stop``,
    ``target_noise_seed``: RF-Inversion's (:class:`bdia.inversion.RFInversionOptions`), flows only.
    """
    import numpy as np

    flow = is_flow_model(sd)
    flow_options = dict(controller_gamma=controller_gamma, controller_eta=controller_eta, eta_start=eta_start,
                        eta_stop=eta_stop, target_noise_seed=target_noise_seed)
    methods = check_edit_settings(image, source_prompt, edit_prompt, methods, num_steps, guidance_scale, gamma,
                                  strength, p, leapfrog, num_inner_steps, lr, early_stop, ddim_inversion_guidance,
                                  **flow_options, image_size=image_size, clip_path=clip_path, lpips_net=lpips_net,
                                  lpips_weights=lpips_weights, grid_scale=grid_scale, resume=resume, flow=flow)
    check_flags(progress=progress)
    check_out_dir(out_dir, "edit")  # cheap, before any work: an out_dir that is not an edit folder is refused
    guidance_scale = default_guidance_scale(sd) if guidance_scale is None else guidance_scale
    size = int(image_size or sd.image_size)
    sd.latent_shape(size, size)  # the size suits the VAE (FLUX: and its 2x2 packing)
    check_grid_size(3 * len(methods), (3, size, size), 3, 1, grid_scale)
    original = load_image(image, size)
    settings = jsonable({
        "image": str(image), "image_content": image_identity(image), "image_size": size,
        "source_prompt": source_prompt, "edit_prompt": edit_prompt, "methods": methods, "num_steps": num_steps,
        "guidance_scale": guidance_scale, "gamma": gamma, "strength": strength, "p": p, "leapfrog": leapfrog,
        "num_inner_steps": num_inner_steps, "lr": lr, "early_stop": early_stop,
        "ddim_inversion_guidance": ddim_inversion_guidance, "clip_path": clip_path, "lpips_net": lpips_net,
        "grid_scale": grid_scale, "model": model_info or {}, "network_dtype": str(sd.dtype).replace("torch.", ""),
        "device_type": torch.device(sd.device).type,
        **(flow_options if flow else {}),  # RF-Inversion's settings: recorded for flow models only
    })
    records = {"env.json": lambda: json.dumps(jsonable(environment_info(sd.device)), indent=2) + "\n"}
    if config is not None:
        from omegaconf import OmegaConf

        records["config.yaml"] = lambda: OmegaConf.to_yaml(OmegaConf.create(jsonable(config)))
    with open_run(out_dir, "edit", settings, resume, written=EDIT_WRITTEN, records=records) as run:
        if run.previous_state == "complete" and isinstance(finished := run.read_json("metrics.json"), dict):
            run.mark("complete")  # the same settings, already done: nothing to redo
            return finished
        pixels = original.to(torch.float32) / 127.5 - 1
        photo = encode_photo(sd, pixels, num_steps, guidance_scale)
        z0, x_clean, sigmas, base, uncond = photo.z0, photo.x_clean, photo.sigmas, photo.base, photo.uncond
        source, edit = sd.encode_prompts([source_prompt]), sd.encode_prompts([edit_prompt])
        vae_images = sd.decode_latents(z0)
        # Before any work, so that a missing model fails at once:
        clip = load_clip(clip_path, sd.device, config_key="clip_path") if clip_path else None
        perceptual = LPIPS(lpips_net, lpips_weights, sd.device) if lpips_net else None
        metrics = {
            "image": str(image), "image_size": size, "source_prompt": source_prompt, "edit_prompt": edit_prompt,
            "num_steps": int(num_steps), "guidance_scale": float(guidance_scale), "strength": float(strength),
            "model": model_info or sd.describe(), "network_dtype": str(sd.dtype).replace("torch.", ""), "state_dtype": "float64",
            "sigmas": {"max": float(sigmas[0]), "min": float(sigmas[-1]), "latent_convention":
                       "flow: the state is the latent x_t, t = sigma / (1 + sigma); z0 = x at t = 0" if flow else
                       "z0 = alpha(sigma_min) x"},
            "vae": _scalars(pixel_metrics(pixels, vae_images, per_image=False)),
            "methods": {},
        }
        rows, row_labels = [], []
        columns = ["original", f"reconstruction ({source_prompt})", f"edit ({edit_prompt})"]
        bar = tqdm(methods, desc="edit", unit="method", dynamic_ncols=True, disable=not progress)
        for method in bar:
            bar.set_postfix_str(f"{method}: invert, reconstruct, edit")
            result = invert_and_edit(method, base, x_clean, sigmas, source, uncond, edit, guidance_scale,
                                     gamma=gamma, strength=strength, p=p, leapfrog=leapfrog,
                                     num_inner_steps=num_inner_steps, lr=lr, early_stop=early_stop,
                                     ddim_inversion_guidance=ddim_inversion_guidance, **(flow_options if flow else {}))
            grid = tail_sigmas(sigmas, strength)
            z_rec = photo.latent(result.reconstruction, grid)
            recon_images = sd.decode_latents(z_rec)
            edit_images = sd.decode_latents(photo.latent(result.edit, grid))
            cost = result.cost
            metrics["methods"][method] = {
                "latent": _scalars(latent_metrics(z0, z_rec, per_image=False)),
                "image": _scalars(pixel_metrics(pixels, recon_images, per_image=False)),
                "image_vs_vae": _scalars(pixel_metrics(vae_images, recon_images, per_image=False)),
                "edit_vs_reconstruction": _scalars(pixel_metrics(recon_images, edit_images, per_image=False)),
                "nfe_inversion_and_reconstruction": cost["inversion"]["nfe"] + cost["reconstruction"]["nfe"],
                "seconds_inversion_and_reconstruction": cost["inversion"]["seconds"] + cost["reconstruction"]["seconds"],
                "cost": cost,
                "settings": {**result.settings, "sigma_top": float(grid[0])},
            }
            if perceptual is not None:
                metrics["methods"][method]["image"]["lpips"] = float(perceptual(pixels, recon_images).mean())
            if clip is not None:
                metrics["methods"][method]["clip"] = clip_edit_metrics(*clip, original, quantize(edit_images),
                                                                       source_prompt, edit_prompt)
            tiles = torch.cat([original, quantize(recon_images), quantize(edit_images)])
            rows.append(tiles)
            label = f"{method} (latent error {metrics['methods'][method]['latent'].get('relative_error', float('nan')):.1e})"
            row_labels.append(label)
            run.write_bytes(f"{method}.png", png_bytes(labelled_grid(tiles, 3, [label], columns, padding=1,
                                                                     scale=grid_scale)))
            arrays = {k: v.detach().cpu().numpy() for k, v in result.representation.items()}
            arrays.update(sigmas=grid.numpy(), method=np.array(method))
            if method == "bdia":
                arrays["gamma"] = np.array(float(gamma))
            run.write_npz("bdia_pair.npz" if method == "bdia" else f"{method}_inversion.npz", arrays)
        bar.close()
        title = f"{(model_info or {}).get('config') or sd.describe().get('source')}, N {num_steps}, guidance " \
                f"{guidance_scale:g}, BDIA gamma {gamma:g}"
        if has_random_weights(sd.describe().get("source")):
            title += " - a model with random weights: its images are noise by construction"
        run.write_bytes("edit_grid.png", png_bytes(labelled_grid(torch.cat(rows), 3, row_labels, columns, title=title,
                                                                 padding=1, scale=grid_scale)))
        run.write_json("metrics.json", metrics)
        run.mark("complete")
    return metrics


def summary_rows(metrics: dict, out_dir) -> list[tuple[str, str]]:
    """What ``scripts/edit.py`` prints when it is done: the photo and prompts, per method its latent round-trip
    error, PSNR, NFE and time of inversion + reconstruction (CLIP when measured), and the run folder."""
    model = metrics.get("model") or {}
    source = model.get("source")
    rows = [("image", f"{metrics['image']} at {metrics['image_size']} px: \"{metrics['source_prompt']}\" -> "
                      f"\"{metrics['edit_prompt']}\""),
            ("setting", f"{model.get('config') or source}, {metrics['network_dtype']} network, float64 state, "
                        f"N {metrics['num_steps']}, guidance {metrics['guidance_scale']:g}, strength {metrics['strength']:g}")]
    for method, m in metrics["methods"].items():
        text = (f"latent round trip {m['latent'].get('relative_error', float('nan')):.2g} relative, PSNR "
                f"{m['image'].get('psnr', float('nan')):.2f} dB vs the photo; {m['nfe_inversion_and_reconstruction']} "
                f"NFE, {m['seconds_inversion_and_reconstruction']:.2f} s (inversion + reconstruction)")
        backward = sum(phase.get("backward_passes", 0) for phase in m["cost"].values())
        if backward:
            text += f", {backward} backward passes"
        if "clip" in m:
            text += f"; edit CLIP score {m['clip']['clip_score_edit']:.2f}"
        gamma = (m.get("settings") or {}).get("gamma")
        rows.append((method + (f" (gamma {gamma:g})" if isinstance(gamma, (int, float)) else ""), text))
    if source and has_random_weights(source):
        rows.append(("note", f"{source} has random weights (a tiny test model): the images are noise by construction; "
                             "the round-trip errors, NFE and times are real"))
    rows.append(("run folder", f"{out_dir} (edit_grid.png: rows = methods, columns = original / reconstruction / edit)"))
    return rows


def _scalars(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
