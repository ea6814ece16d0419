"""The exact-editing web demo behind ``scripts/demo.py`` (Gradio): upload a photo, invert it once with BDIA (BDIA-DDIM
on Stable Diffusion 1.x / 2.x, BDIA over flow Euler on the flow-matching SD3 / FLUX), edit it as many times as wanted
from the cached inversion, and read the numbers that make the method's point (latent round-trip error, PSNR of the
reconstruction, NFE and seconds of the inversion and of each edit).

The page is a thin layer over plain functions that the tests call directly:

* :func:`invert_photo` -- a new :class:`Session`: the photo read and bounded as the edit app reads it
  (:func:`bdia.apps.edit.load_image`), encoded for the chosen model (:func:`bdia.apps.edit.encode_photo`: the clean
  state, the grid and the denoiser of either kind of model), inverted under the source prompt with
  :func:`bdia.apps.edit.invert_image` (BDIA, and any comparison methods that apply to the model's kind:
  :data:`COMPARE_METHODS` for Stable Diffusion, :data:`FLOW_COMPARE_METHODS` for SD3 / FLUX), reconstructed, measured;
* :func:`edit_photo` -- one more edit in a session (edit prompt, strength), from the cached inversion;
* :func:`save_session` -- the session's images and numbers as a zip in the demo's temporary folder (the page offers
  it for download; nothing else is written outside that folder);
* :class:`Models` -- the models the page can pick (the ``model`` group: ``configs/sd/model/`` and ``configs/flow/model/``),
  loaded on first use (or when picked in the page's menu),
  one at a time besides the one the demo started with, shared read-only by every session. Everything of a user's
  photo lives in that user's :class:`Session`, held in ``gr.State``: one browser session never sees another's.

A user mistake (a bad image, an empty prompt, a missing model) raises ``ValueError`` or
:class:`bdia.download.AssetUnavailableError` with one line; the page shows it in its status box and keeps the
session as it was.

**Strength without inverting again.** An edit of strength ``s`` regenerates the last ``ceil(s N)`` steps
(:func:`bdia.inversion.tail_sigmas`) under the edit prompt. Inverting only those steps is what
``scripts/edit.py strength=s`` does; BDIA's inversion from the clean end is the same computation for every prefix
of the grid, and its regeneration retraces it exactly (up to round-off), so the demo inverts the whole grid once and
gets the state pair at the tail's top by regenerating the first ``N - ceil(s N)`` steps under the source prompt
(once per strength, kept in the session). ``tests/apps/test_demo.py`` checks the edit against ``invert_and_edit``
with that strength, on the tiny SD, SD3 and FLUX. The comparison methods (Stable Diffusion: DDIM inversion, EDICT,
null-text; flows: flow-Euler inversion, RF-Inversion, RF-Solver, FireFlow) edit from their cached inversion at
strength 1 only.

**Guidance.** ``guidance_scale=None`` is the model's own (:func:`bdia.apps.edit.default_guidance_scale`: SD 7.5,
SD3 7.0, FLUX.1-dev 3.5 as its guidance embedding); picking a model in the page's menu loads it and moves the guidance
slider to its default. FLUX.1-schnell has no guidance (its value is ignored).
"""

from __future__ import annotations

import json
import math
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..configs import instantiate
from ..denoisers import DenoiserWrapper
from ..download import AssetUnavailableError
from ..imageio import quantize
from ..inversion import FLOW_METHODS, METHODS, check_method, tail_sigmas
from ..metrics.reconstruction import latent_metrics, pixel_metrics
from ..networks.flow import is_flow_model
from ..solvers import StatePair, sample
from ..testing import has_random_weights
from .cli import USER_ERRORS, app_config_dir, config_dirs, group_options, one_line
from .edit import (FLOW_LOADER, SAMPLE_IMAGES, CachedInversion, EncodedPhoto, as_cond, default_guidance_scale,
                   encode_photo, invert_image, load_image)

__all__ = ["Session", "Models", "invert_photo", "edit_photo", "save_session", "model_configs", "build_demo", "serve",
           "check_port", "check_compare", "compare_methods", "method_label", "COMPARE_METHODS", "FLOW_COMPARE_METHODS",
           "METHOD_LABELS", "FLOW_METHOD_LABELS"]

#: Methods the page can run beside BDIA on the same photo (the edit app's baselines): on Stable Diffusion ...
COMPARE_METHODS = tuple(m for m in METHODS if m != "bdia")
#: ... and on a flow-matching model (SD3, FLUX; :data:`bdia.inversion.FLOW_METHOD_REGISTRY`).
FLOW_COMPARE_METHODS = tuple(m for m in FLOW_METHODS if m != "bdia")
METHOD_LABELS = {"bdia": "BDIA-DDIM (exact)", "ddim": "DDIM inversion", "edict": "EDICT (exact)",
                 "null_text": "null-text inversion"}
FLOW_METHOD_LABELS = {"bdia": "BDIA over flow Euler (exact)", "ddim": "flow-Euler inversion",
                      "rf_inversion": "RF-Inversion", "rf_solver": "RF-Solver", "fireflow": "FireFlow"}
#: Bounds on what the page accepts (prompts are truncated to CLIP's 77 tokens anyway).
MAX_PROMPT_CHARS = 1000
MAX_DEMO_STEPS = 1000
MAX_EDITS_KEPT = 50
MAX_IMAGE_SIZE = 2048


# --------------------------------------------------------------------------------------------------
# Progress: every network call of a phase ticks the page's progress bar.


class _Ticker(DenoiserWrapper):
    """Passes calls through to the denoiser and reports ``(fraction, phase)`` to ``report`` after each; the
    expected number of calls of the current phase is set with :meth:`phase` (null-text's count is a guess)."""

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.report: Callable | None = None
        self.label, self.done, self.expected = "", 0, 1

    def phase(self, label: str, expected_calls: int) -> None:
        self.label, self.done, self.expected = label, 0, max(1, int(expected_calls))
        if self.report is not None:
            self.report(0.0, label)

    def forward(self, x, sigma, class_labels=None, **cond):
        out = self.denoiser(x, sigma, class_labels, **cond)
        self.done += 1
        if self.report is not None:
            self.report(min(1.0, self.done / self.expected), self.label)
        return out


def _expected_calls(method: str, steps: int, phase: str, flow: bool = False) -> int:
    if method == "edict" or (flow and method == "rf_solver"):
        return 2 * steps
    if method == "null_text" and phase == "inversion":
        return steps * 12
    if flow and method == "fireflow":
        return steps + 1
    if method == "bdia" and phase != "inversion":
        return steps - 1
    return steps


def compare_methods(flow: bool) -> tuple[str, ...]:
    """The comparison methods for a model's kind: :data:`FLOW_COMPARE_METHODS` for a flow model, else
    :data:`COMPARE_METHODS`."""
    return FLOW_COMPARE_METHODS if flow else COMPARE_METHODS


def method_label(method: str, flow: bool) -> str:
    """The page's name of ``method`` on a model of that kind (``ddim`` is flow-Euler inversion on a flow model)."""
    return (FLOW_METHOD_LABELS if flow else METHOD_LABELS)[method]


def _as_list(compare) -> list[str]:
    """The ``compare`` setting (a name, a list, or nothing) as a list."""
    return [compare] if isinstance(compare, str) else list(compare or [])


def check_compare(compare, flow: bool) -> list[str]:
    """``compare`` (a name or a list) as a list of the comparison methods for the model's kind; a method of the
    other kind is refused in one line saying which apply (:func:`bdia.inversion.check_method`), an unknown one too."""
    compare = _as_list(compare)
    valid = compare_methods(flow)
    for method in compare:
        if method not in valid:
            if method in (*COMPARE_METHODS, *FLOW_COMPARE_METHODS):
                try:
                    check_method(method, flow)
                except ValueError as e:
                    raise ValueError(f"compare: {e}") from None
            raise ValueError(f"compare: unknown {method!r}; choose from {', '.join(valid)}")
    return [m for m in valid if m in compare]


# --------------------------------------------------------------------------------------------------
# The models the page can pick.


def model_configs(chosen: str | None = None, chosen_config: dict | None = None) -> dict[str, dict]:
    """The ``model`` group of the demo's configs (``configs/sd/model/*.yaml`` and ``configs/flow/model/*.yaml``,
    the folders of ``APP_CONFIGS["demo"]``) as ``{name: config dict}``; ``chosen`` gets ``chosen_config`` (the command
    line's ``model`` with its overrides)."""
    from omegaconf import OmegaConf

    configs = {}
    for name in group_options(app_config_dir("demo"), "model") or []:
        for folder in config_dirs(app_config_dir("demo")):
            path = folder / "model" / f"{name}.yaml"
            if path.is_file():
                configs[name] = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
                break
    if chosen is not None and chosen_config is not None:
        configs[chosen] = dict(chosen_config)
    return configs


class Models:
    """The models the page offers, by config name: loaded on first use (``bdia.configs.instantiate``, so a missing
    checkpoint raises the loader's one-line :class:`AssetUnavailableError`), kept while in use: the demo's first
    model always, one other at a time. ``lock`` serialises the network work of all sessions (timings stay honest)."""

    def __init__(self, configs: dict[str, dict], default: str, device="cpu", image_size: int | None = None):
        if default not in configs:
            raise ValueError(f"model={default}: not one of {', '.join(sorted(configs))}")
        self.configs, self.default, self.device, self.image_size = dict(configs), default, str(device), image_size
        self.loaded: dict[str, object] = {}
        self.lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return sorted(self.configs)

    def resolve(self, name: str | None) -> str:
        """``name`` stripped (empty or ``None``: the default), checked to be one of :attr:`names` (one line if not)."""
        name = self.default if name is None or not str(name).strip() else str(name).strip()
        if name not in self.configs:
            raise ValueError(f"model {name!r}: not one of {', '.join(self.names)}")
        return name

    def is_flow(self, name: str | None) -> bool:
        """Whether the config ``name`` is a flow-matching model's (SD3, FLUX: ``bdia.networks.flow.load_flow``),
        read from the config without loading it."""
        return self.configs[self.resolve(name)].get("_target_") == FLOW_LOADER

    def get(self, name: str | None):
        name = self.resolve(name)
        with self.lock:
            if name not in self.loaded:
                for other in [n for n in self.loaded if n != self.default]:
                    del self.loaded[other]  # one model besides the default in memory
                model = instantiate(self.configs[name], "model", device=self.device)
                if self.is_flow(name) != is_flow_model(model):
                    raise ValueError(f"model {name!r}: its config loads a {type(model).__name__}, which is "
                                     f"{'not ' if self.is_flow(name) else ''}a flow-matching model")
                kind, needs = (("a flow model's", ("denoiser", "default_guidance_scale")) if is_flow_model(model) else
                               ("Stable Diffusion's", ("eps_denoiser",)))
                missing = [a for a in ("encode_images", "decode_latents", "encode_prompts", "sigmas", "latent_shape",
                                       *needs) if not hasattr(model, a)]
                if missing:
                    raise ValueError(f"model {name!r}: the demo edits through {kind} interface; "
                                     f"{type(model).__name__} has no {', '.join(missing)}")
                self.loaded[name] = model
            return self.loaded[name]


# --------------------------------------------------------------------------------------------------
# A user's session: one photo, its inversion, its edits.


@dataclass
class Session:
    """One browser session's photo and everything computed from it (held in ``gr.State``; never shared).

    ``sd``: the model (Stable Diffusion or a flow model); ``original``: uint8 ``[1, 3, H, W]``; ``photo``: it encoded
    for the model (:class:`bdia.apps.edit.EncodedPhoto`: latent ``z0``, clean state, grid, denoiser);
    ``vae_images``: ``z0`` decoded (``[-1, 1]``); ``source_embeds``: the source prompt's encoding (SD: a tensor; a
    flow model: its conditioning dict); ``inversions``: method -> the cached inversion (``bdia`` always);
    ``reconstructions``: method -> uint8 image; ``numbers``: method -> the round-trip numbers
    (:func:`_round_trip_numbers`); ``start_pairs``: BDIA's state pair at a grid level (what an edit of a strength
    below 1 starts from), with the cost of computing it; ``edits``: one dict per edit, newest last."""

    model: str
    sd: object
    image: str
    source_prompt: str
    num_steps: int
    gamma: float
    guidance_scale: float
    original: torch.Tensor
    vae_images: torch.Tensor
    photo: EncodedPhoto
    source_embeds: object
    ticker: _Ticker
    inversions: dict = field(default_factory=dict)
    reconstructions: dict = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)
    start_pairs: dict = field(default_factory=dict)
    edits: list = field(default_factory=list)
    number_of_edits: int = 0

    @property
    def z0(self) -> torch.Tensor:
        return self.photo.z0

    @property
    def flow(self) -> bool:
        return self.photo.flow

    def label(self, method: str) -> str:
        return method_label(method, self.flow)


def _check_prompt(text, what: str) -> str:
    text = "" if text is None else str(text)
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what}: {len(text)} characters, more than {MAX_PROMPT_CHARS}")
    if not text.strip():
        raise ValueError(f"{what}: empty; describe the photo (source) or what it should become (edit)")
    return text.strip()


def _check_number(value, what: str, low: float, high: float, low_open: bool = False, integer: bool = False):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: not a number ({value!r})") from None
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{what} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    if integer:
        if number != int(number):
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        return int(number)
    return number


def _image_name(image) -> str:
    if image is None or not str(image).strip():
        raise ValueError("no photo: upload one or pick an example, then invert")
    return str(image)


def _round_trip_numbers(session: Session, method: str, reconstruction_x: torch.Tensor, cost: dict,
                        pixels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    inversion = session.inversions[method]
    z_rec = session.photo.latent(reconstruction_x, inversion.grid)
    images = session.sd.decode_latents(z_rec)
    latent = latent_metrics(session.z0, z_rec, per_image=False)
    versus_photo = pixel_metrics(pixels, images, per_image=False)
    versus_vae = pixel_metrics(session.vae_images, images, per_image=False)
    numbers = {
        "latent_relative_error": float(latent["relative_error"]), "latent_max_abs_error": float(latent["max_abs_error"]),
        "psnr_vs_photo": float(versus_photo["psnr"]), "psnr_vs_vae": float(versus_vae["psnr"]),
        "nfe_inversion": inversion.cost["inversion"]["nfe"], "seconds_inversion": inversion.cost["inversion"]["seconds"],
        "backward_passes": inversion.cost["inversion"]["backward_passes"],
        "nfe_reconstruction": cost["nfe"], "seconds_reconstruction": cost["seconds"],
        "settings": {k: v for k, v in inversion.settings.items() if isinstance(v, (int, float, str, bool))},
    }
    return numbers, quantize(images).cpu()


def invert_photo(
    models: Models,
    image,
    model: str | None = None,
    source_prompt: str = "a photo of a chinese temple",
    num_steps: int = 50,
    gamma: float = 0.96,
    guidance_scale: float | None = None,
    compare: Sequence[str] = (),
    progress: Callable[[float, str], None] | None = None,
) -> Session:
    """Read ``image`` (a file path, or ``china.jpg`` / ``flower.jpg``), encode it with ``model``, invert it under
    ``source_prompt`` with BDIA (``gamma``, ``num_steps``, ``guidance_scale``: ``None`` is the model's own) and each
    method in ``compare`` (those of the model's kind, :func:`compare_methods`), reconstruct it with each; return the
    new :class:`Session`. ``progress(fraction, phase)`` is told after every network call."""
    image = _image_name(image)
    source_prompt = _check_prompt(source_prompt, "source prompt")
    num_steps = _check_number(num_steps, "steps", 2, MAX_DEMO_STEPS, integer=True)
    gamma = _check_number(gamma, "gamma", 0, 1, low_open=True)
    name = models.resolve(model)  # an unknown name is one line here
    flow = models.is_flow(name)  # from the config
    if guidance_scale is not None:  # Stable Diffusion: classifier-free guidance, >= 1; a flow's may be 0 (none)
        guidance_scale = _check_number(guidance_scale, "guidance", 0 if flow else 1, 50)
    compare = check_compare(compare, flow)
    with models.lock:
        sd = models.get(name)
        size = int(models.image_size or sd.image_size)
        sd.latent_shape(size, size)  # the size suits the VAE (FLUX: and its 2x2 packing); one line if not
        try:
            original = load_image(image, size)  # size bound before decoding, centre square, resized
        except ValueError as e:  # name the photo, not the server's temporary path
            name = Path(image).name
            raise ValueError(str(e).replace(f"image={image}", f"photo {name}", 1).replace(str(image), name)) from None
        pixels = original.to(torch.float32) / 127.5 - 1
        with torch.no_grad():
            photo = encode_photo(sd, pixels, num_steps, guidance_scale)  # the edit app's: either kind of model
            vae_images = sd.decode_latents(photo.z0)  # the photo through the VAE alone, [-1, 1]
        source = sd.encode_prompts([source_prompt])
        ticker = _Ticker(photo.base)
        ticker.report = progress
        session = Session(name, sd, Path(image).name, source_prompt, num_steps, gamma, photo.guidance_scale, original,
                          vae_images, photo, source, ticker)
        for method in ["bdia", *compare]:
            label = session.label(method)
            ticker.phase(f"{label}: inverting", _expected_calls(method, num_steps, "inversion", flow))
            inversion = invert_image(method, ticker, photo.x_clean, photo.sigmas, source, photo.uncond,
                                     photo.guidance_scale, gamma=gamma)
            session.inversions[method] = inversion
            ticker.phase(f"{label}: reconstructing", _expected_calls(method, num_steps, "reconstruction", flow))
            reconstruction, cost = inversion.regenerate(source)
            session.numbers[method], session.reconstructions[method] = _round_trip_numbers(
                session, method, reconstruction, cost, pixels)
        ticker.report = None
    return session


def _bdia_start_pair(session: Session, inversion: CachedInversion, level: int):
    """BDIA's state pair ``(x at grid[level], x at grid[level + 1])``: the inverted pair at the top regenerated under
    the source prompt for ``level`` steps (exact inverse of the inversion's steps), cached per level; and the cost
    of computing it now (``None`` when cached or ``level == 0``)."""
    rep = inversion.inverted.representation
    top = StatePair(rep["x_end"], rep["x_inner"])
    if level == 0:
        return top, None
    if level in session.start_pairs:
        return session.start_pairs[level], None
    gamma = inversion.settings["gamma"]
    cond = as_cond(session.source_embeds)
    with warnings.catch_warnings():  # ending at a noisy level is the point here (the edit continues from it)
        warnings.filterwarnings("ignore", message="sigmas end at")
        pair, cost = inversion.measure(lambda: sample(inversion.setup.cfg, top, inversion.grid[: level + 2],
                                                      solver="bdia_ddim", gamma=gamma, cond=cond, return_pair=True,
                                                      dtype=None))
    start = StatePair(pair.x_inner, pair.x_end)  # sample returns (x at level + 1, x at level)
    session.start_pairs[level] = start
    return start, cost


def edit_photo(
    models: Models,
    session: Session | None,
    edit_prompt: str,
    strength: float = 1.0,
    progress: Callable[[float, str], None] | None = None,
) -> Session:
    """One more edit of the session's photo: BDIA regenerates the last ``ceil(strength N)`` steps under
    ``edit_prompt`` from the cached inversion (no inversion again; see the module notes); each comparison method
    regenerates its cached inversion under it when ``strength`` is 1. Appends the edit to ``session.edits``
    (images, NFE, seconds) and returns the session."""
    if session is None:
        raise ValueError("no inverted photo in this session yet: upload a photo (or pick an example) and invert it first")
    edit_prompt = _check_prompt(edit_prompt, "edit prompt")
    strength = _check_number(strength, "strength", 0, 1, low_open=True)
    bdia = session.inversions["bdia"]
    grid = tail_sigmas(bdia.grid, strength)
    steps = len(grid) - 1
    level = len(bdia.grid) - 1 - steps
    ticker = session.ticker
    with models.lock:
        ticker.report = progress
        try:
            edit_embeds = session.sd.encode_prompts([edit_prompt])
            ticker.phase("BDIA: regenerating under the source prompt to the edit's start", level)
            start, prefix_cost = _bdia_start_pair(session, bdia, level)
            ticker.phase("BDIA: editing", steps - 1)
            if level == 0:
                x, cost = bdia.regenerate(edit_embeds)
            else:
                cond = as_cond(edit_embeds)
                x, cost = bdia.measure(lambda: sample(bdia.setup.cfg, start, grid, solver="bdia_ddim",
                                                      gamma=bdia.settings["gamma"], cond=cond, dtype=None))
            images = {"bdia": quantize(session.sd.decode_latents(session.photo.latent(x, grid))).cpu()}
            costs = {"bdia": cost}
            for method, inversion in session.inversions.items():
                if method == "bdia" or level != 0:
                    continue
                ticker.phase(f"{session.label(method)}: editing", _expected_calls(method, steps, "edit", session.flow))
                x_m, costs[method] = inversion.regenerate(edit_embeds)
                images[method] = quantize(session.sd.decode_latents(session.photo.latent(x_m, inversion.grid))).cpu()
        finally:
            ticker.report = None
    session.number_of_edits += 1
    session.edits.append({"number": session.number_of_edits, "prompt": edit_prompt, "strength": strength,
                          "steps": steps, "images": images, "costs": costs, "prefix_cost": prefix_cost})
    del session.edits[:-MAX_EDITS_KEPT]
    return session


def session_record(session: Session) -> dict:
    """The session's settings and numbers as JSON-ready data (what :func:`save_session` writes)."""
    return {
        "model": session.model, "model_info": session.sd.describe() if hasattr(session.sd, "describe") else {},
        "model_kind": "flow" if session.flow else "vp",
        "methods": {method: session.label(method) for method in session.inversions},
        "image": session.image, "image_size": int(session.original.shape[-1]), "source_prompt": session.source_prompt,
        "num_steps": session.num_steps, "gamma": session.gamma, "guidance_scale": session.guidance_scale,
        "state_dtype": "float64", "round_trip": session.numbers,
        "edits": [{"number": e["number"], "prompt": e["prompt"], "strength": e["strength"], "steps": e["steps"],
                   "costs": e["costs"], "prefix_cost": e["prefix_cost"]} for e in session.edits],
    }


def save_session(session: Session | None, folder) -> Path:
    """A zip of the session's photo (as inverted), reconstructions, edits and ``numbers.json`` in ``folder`` (the
    demo's temporary folder; the page offers it for download). Returns its path."""
    from PIL import Image

    if session is None:
        raise ValueError("nothing to save yet: invert a photo first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bdia-demo-{uuid.uuid4().hex[:12]}.zip"

    def png(image: torch.Tensor) -> bytes:
        import io

        buffer = io.BytesIO()
        Image.fromarray(image[0].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        return buffer.getvalue()

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("original.png", png(session.original))
        for method, image in session.reconstructions.items():
            archive.writestr(f"reconstruction_{method}.png", png(image))
        for e in session.edits:
            for method, image in e["images"].items():
                archive.writestr(f"edit_{e['number']:03d}_{method}.png", png(image))
        archive.writestr("numbers.json", json.dumps(session_record(session), indent=2, default=float) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# What the page shows.


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def _display(image: torch.Tensor, display_size: int):
    """uint8 ``[1, 3, H, W]`` -> ``H' x W' x 3`` numpy, enlarged (nearest) to at least ``display_size`` pixels."""
    scale = max(1, int(display_size) // int(image.shape[-1]))
    array = image[0].permute(1, 2, 0)
    if scale > 1:
        array = array.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return array.numpy()


def round_trip_text(session: Session | None) -> str:
    if session is None:
        return "Latent round-trip error: invert a photo to measure it."
    n = session.numbers["bdia"]
    return (f"**Latent round-trip error** (BDIA, relative): **{n['latent_relative_error']:.3g}** "
            f"(max abs {n['latent_max_abs_error']:.3g}) — PSNR of the reconstruction {_fmt(n['psnr_vs_photo'], '.2f')} dB "
            f"against the photo, {_fmt(n['psnr_vs_vae'], '.2f')} dB against the VAE's own round trip")


def _guidance_kind(sd) -> str:
    """How ``sd`` is guided: ``"cfg"`` (classifier-free: Stable Diffusion, SD3), ``"embedded"`` (FLUX.1-dev's guidance
    embedding) or ``"none"`` (FLUX.1-schnell)."""
    return getattr(sd, "guidance", "cfg") if is_flow_model(sd) else "cfg"


def _guidance_text(sd, guidance_scale: float) -> str:
    kind = _guidance_kind(sd)
    if kind == "none":
        return "no guidance (the model has none)"
    return f"guidance {guidance_scale:g}" + (" (its guidance embedding)" if kind == "embedded" else "")


def numbers_table(session: Session | None) -> str:
    if session is None:
        return ""
    lines = [f"Inverted **{session.image}** on **{session.model}**: {session.num_steps} steps, "
             f"{_guidance_text(session.sd, session.guidance_scale)}, γ {session.gamma:g}, float64 states, "
             f"{session.original.shape[-1]}×{session.original.shape[-2]} pixels.", "",
             "| method | latent round-trip error (relative) | max abs | PSNR vs photo (dB) | PSNR vs VAE (dB) "
             "| inversion: NFE / s | reconstruction: NFE / s |",
             "|---|---|---|---|---|---|---|"]
    for method, n in session.numbers.items():
        backward = f" + {n['backward_passes']} backward" if n["backward_passes"] else ""
        lines.append(f"| {session.label(method)} | {n['latent_relative_error']:.3g} | {n['latent_max_abs_error']:.3g} "
                     f"| {_fmt(n['psnr_vs_photo'], '.2f')} | {_fmt(n['psnr_vs_vae'], '.2f')} "
                     f"| {n['nfe_inversion']}{backward} / {n['seconds_inversion']:.2f} "
                     f"| {n['nfe_reconstruction']} / {n['seconds_reconstruction']:.2f} |")
    lines += ["", "PSNR vs photo includes the VAE's own loss; PSNR vs VAE compares with the photo encoded and "
              "decoded without inversion (the method's own error)."]
    if has_random_weights(getattr(session.sd, "source", "")):
        lines += ["", f"*{session.model} has random weights: its VAE does not reproduce the photo and its images are "
                  "noise-like; what it shows is the round trip (PSNR vs VAE) and the cost.*"]
    return "\n".join(lines)


def edits_table(session: Session | None) -> str:
    if session is None or not session.edits:
        return ""
    lines = ["| edit | prompt | strength (steps) | BDIA: NFE / s | comparisons: NFE / s |", "|---|---|---|---|---|"]
    for e in reversed(session.edits):
        bdia = e["costs"]["bdia"]
        prefix = e["prefix_cost"]
        extra = f" (+ {prefix['nfe']} / {prefix['seconds']:.2f} to reach the start, once)" if prefix else ""
        others = ", ".join(f"{session.label(m)} {c['nfe']} / {c['seconds']:.2f}" for m, c in e["costs"].items()
                           if m != "bdia")
        if not others and len(session.inversions) > 1:
            others = "at strength 1 only"
        prompt = e["prompt"].replace("|", "\\|")
        lines.append(f"| #{e['number']} | {prompt} | {e['strength']:g} ({e['steps']}) | {bdia['nfe']} / "
                     f"{bdia['seconds']:.2f}{extra} | {others or '–'} |")
    return "\n".join(lines)


def gallery_items(session: Session | None, display_size: int) -> list:
    items = []
    for e in reversed((session.edits if session else [])):
        for method, image in e["images"].items():
            items.append((_display(image, display_size), f"#{e['number']} {session.label(method)}: {e['prompt']} "
                                                         f"(strength {e['strength']:g})"))
    return items


# --------------------------------------------------------------------------------------------------
# The page.

_INTRO = """# Exact editing with BDIA — invert once, edit many times
Upload a photo (or pick an example), describe it, **Invert**: BDIA-DDIM maps it to noise exactly, at DDIM's cost
(on SD3 / FLUX: BDIA over flow Euler, at flow Euler's cost). Then **Edit** as often as you like: each edit
regenerates from the cached inversion under your edit prompt, without inverting again. The numbers show the round
trip: regenerating under the source prompt gives the photo's latent back to round-off."""


def _photo_path(payload):
    """gr.Image's upload payload -> the uploaded file's path (``None`` without one)."""
    path = getattr(payload, "path", None)
    return None if path is None else str(path)


def _compare_choices(flow: bool) -> list[tuple[str, str]]:
    return [(method_label(m, flow), m) for m in compare_methods(flow)]


def build_demo(models: Models, temp_dir, source_prompt: str = "a photo of a chinese temple",
               edit_prompt: str = "a watercolor painting of a chinese temple", num_steps: int = 50,
               gamma: float = 0.96, guidance_scale: float | None = None, strength: float = 1.0,
               compare: Sequence[str] = (), display_size: int = 256, counters: dict | None = None):
    """The Gradio Blocks of the demo (not launched). ``temp_dir``: where example photos and saved zips go.
    ``guidance_scale``: the slider's starting value (``None``: the starting model's own; picking a model in the menu
    moves it to that model's); ``compare``: the comparison methods ticked at the start (those of the starting
    model's kind; picking a model of the other kind keeps those that apply to it)."""
    import gradio as gr
    from PIL import Image

    temp_dir = Path(temp_dir)
    counters = counters if counters is not None else {}
    start_flow = models.is_flow(models.default)
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(models.get(models.default))
    compare = [m for m in _as_list(compare) if m in compare_methods(start_flow)]
    examples = []
    for name in SAMPLE_IMAGES:
        path = temp_dir / "examples" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(load_image(name, 512)[0].permute(1, 2, 0).numpy()).save(path, quality=95)
        examples.append([str(path)])

    def views(session):
        if session is None:
            return [None, None, None, [], round_trip_text(None), "", ""]
        latest = session.edits[-1]["images"]["bdia"] if session.edits else None
        return [_display(session.original, display_size), _display(session.reconstructions["bdia"], display_size),
                None if latest is None else _display(latest, display_size), gallery_items(session, display_size),
                round_trip_text(session), numbers_table(session), edits_table(session)]

    def reporter(progress):
        return lambda fraction, phase: progress(fraction, desc=phase)

    def on_invert(session, image, model, source, steps, gamma_value, guidance, methods, progress=gr.Progress()):
        started = time.perf_counter()
        try:
            new = invert_photo(models, image, model, source, steps, gamma_value, guidance, methods or (),
                               progress=reporter(progress))
        except USER_ERRORS + (AssetUnavailableError,) as e:
            return [session, *[gr.update()] * 7, f"**error:** {one_line(e)}"]
        counters["inversions"] = counters.get("inversions", 0) + 1
        n = new.numbers["bdia"]
        status = (f"Inverted in {time.perf_counter() - started:.1f} s (BDIA: {n['nfe_inversion']} NFE, "
                  f"{n['seconds_inversion']:.2f} s). Now edit: type an edit prompt and press Edit.")
        return [new, *views(new), status]

    def on_edit(session, prompt, strength_value, progress=gr.Progress()):
        try:
            session = edit_photo(models, session, prompt, strength_value, progress=reporter(progress))
        except USER_ERRORS + (AssetUnavailableError,) as e:
            return [session, *[gr.update()] * 7, f"**error:** {one_line(e)}"]
        counters["edits"] = counters.get("edits", 0) + 1
        e = session.edits[-1]
        c = e["costs"]["bdia"]
        status = (f"Edit #{e['number']} done: {c['nfe']} NFE, {c['seconds']:.2f} s, from the cached inversion "
                  f"(no inversion again).")
        return [session, *views(session), status]

    def on_model(name, ticked):
        """A model picked in the menu: load it (its weights missing: one line), offer its kind's comparisons (keeping
        those ticked that apply) and move the guidance slider to its own default."""
        try:
            flow = models.is_flow(name)
            choices = _compare_choices(flow)
            methods_update = gr.update(choices=choices, value=[m for _, m in choices if m in (ticked or [])])
            sd = models.get(name)
        except USER_ERRORS + (AssetUnavailableError,) as e:
            return [gr.update(), gr.update(), f"**error:** {one_line(e)}"]
        default = default_guidance_scale(sd)
        note = {"cfg": "classifier-free guidance", "embedded": "its guidance embedding",
                "none": "the model has no guidance: the value is ignored"}[_guidance_kind(sd)]
        guidance_update = gr.update(minimum=0.0 if flow else 1.0, value=default, info=f"{note}; its default {default:g}")
        return [methods_update, guidance_update,
                f"Model **{name}** loaded ({'flow matching: BDIA over flow Euler' if flow else 'BDIA-DDIM'}); guidance "
                f"set to its default {default:g}. Upload a photo or pick an example, then press Invert."]

    def on_save(session):
        try:
            return gr.update(value=str(save_session(session, temp_dir / "saved")), visible=True), \
                "Saved: download the zip below (images and numbers.json)."
        except ValueError as e:
            return gr.update(), f"**error:** {one_line(e)}"

    with gr.Blocks(title="bdia — exact editing", analytics_enabled=False) as demo:
        state = gr.State(None, time_to_live=3 * 3600)
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"], height=260,
                                 elem_id="photo")
                # The upload reaches the handler as the file's path, not opened here: the handler reads it with the
                # edit app's checks (size bound before decoding), so a bad file is a message in the page instead of
                # Gradio's preprocessing error. (An instance attribute: subclassing a Gradio component would make
                # Gradio write a .pyi stub next to this module.)
                photo.preprocess = _photo_path
                gr.Examples(examples, inputs=[photo], label="Examples (scikit-learn's sample photos)")
                model = gr.Dropdown(models.names, value=models.default, label="Model", elem_id="model",
                                    info="configs/sd/model/ (Stable Diffusion) and configs/flow/model/ (SD3, FLUX), "
                                         "loaded when picked; real checkpoints must be in the Hugging Face cache offline")
                source = gr.Textbox(source_prompt, label="Source prompt (describes the photo)", elem_id="source")
                with gr.Accordion("Inversion settings", open=True):
                    steps = gr.Slider(2, 200, value=num_steps, step=1, label="Steps (N)", elem_id="steps")
                    gamma_slider = gr.Slider(0.8, 1.0, value=gamma, step=0.005, label="γ (BDIA weight)",
                                             info="round-off grows like γ^-N; 0.92-1 for editing", elem_id="gamma")
                    guidance = gr.Slider(0.0 if start_flow else 1.0, max(15.0, guidance_scale), value=guidance_scale,
                                         step=0.5,
                                         label="Guidance", elem_id="guidance",
                                         info="picking a model sets its own default (SD 7.5, SD3 7.0, FLUX.1-dev 3.5)")
                    methods = gr.CheckboxGroup(_compare_choices(start_flow), value=compare,
                                               label="Compare with (same photo, same settings)", elem_id="compare")
                invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
                prompt = gr.Textbox(edit_prompt, label="Edit prompt", elem_id="edit_prompt")
                strength_slider = gr.Slider(0.05, 1.0, value=strength, step=0.05, label="Strength",
                                            info="fraction of the steps regenerated under the edit prompt",
                                            elem_id="strength")
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit_button")
                save_button = gr.Button("Save images and numbers (zip)", elem_id="save")
                download = gr.File(label="Download", visible=False, elem_id="download")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload a photo or pick an example, then press Invert.", elem_id="status")
                with gr.Row():
                    original = gr.Image(label="Original", interactive=False, format="png", elem_id="original")
                    reconstruction = gr.Image(label="Reconstruction", interactive=False, format="png",
                                              elem_id="reconstruction")
                    edited = gr.Image(label="Edit", interactive=False, format="png", elem_id="edit")
                round_trip = gr.Markdown(round_trip_text(None), elem_id="roundtrip")
                numbers = gr.Markdown("", elem_id="numbers")
                edits = gr.Markdown("", elem_id="edits")
                gallery = gr.Gallery(label="All edits of this session", columns=6, height=260, object_fit="contain",
                                     elem_id="gallery")
        outputs = [state, original, reconstruction, edited, gallery, round_trip, numbers, edits, status]
        invert_button.click(on_invert, [state, photo, model, source, steps, gamma_slider, guidance, methods], outputs)
        edit_button.click(on_edit, [state, prompt, strength_slider], outputs)
        save_button.click(on_save, [state], [download, status])
        model.input(on_model, [model, methods], [methods, guidance, status])
    return demo


def offline_theme():
    """Gradio's default theme with the system's fonts (no web fonts: the page works offline)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def check_port(host: str, port) -> int:
    port = _check_number(port, "port", 1, 65535, integer=True)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (a closed connection's
        try:                                                           # TIME_WAIT does not block it)
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"port={port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                             f"choose another with port=...") from None
    return port


def serve(
    models: Models,
    host: str = "127.0.0.1",
    port: int = 7860,
    source_prompt: str = "a photo of a chinese temple",
    edit_prompt: str = "a watercolor painting of a chinese temple",
    num_steps: int = 50,
    gamma: float = 0.96,
    guidance_scale: float | None = None,
    strength: float = 1.0,
    compare: Sequence[str] = (),
    display_size: int = 256,
    max_upload_mb: float = 20,
) -> dict:
    """Serve the demo on ``host:port`` until interrupted (Ctrl-C). Gradio's files (uploads, shown images, saved zips)
    go to a new temporary folder, removed when the demo stops. Returns what the demo did (inversions, edits)."""
    import logging
    import os
    import shutil

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests are not news
    port = check_port(str(host), port)
    start_flow = models.is_flow(models.default)
    compare = check_compare(compare, start_flow)  # a method of the other kind of model: one line
    if guidance_scale is not None:
        guidance_scale = _check_number(guidance_scale, "guidance_scale", 0 if start_flow else 1, 50)
    max_upload_mb = _check_number(max_upload_mb, "max_upload_mb", 0.001, 1000)
    display_size = _check_number(display_size, "display_size", 1, 4096, integer=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="bdia-demo-"))
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir / "gradio")  # read when the components are made
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    counters = {"inversions": 0, "edits": 0}
    started = time.perf_counter()
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    demo = None
    try:
        demo = build_demo(models, temp_dir, source_prompt, edit_prompt, num_steps, gamma, guidance_scale, strength,
                          compare, display_size, counters)
        demo.queue(default_concurrency_limit=1)
        demo.launch(server_name=str(host), server_port=port, share=False, inbrowser=False, show_error=True,
                    max_file_size=int(max_upload_mb * 2**20), ssr_mode=False, quiet=True, theme=offline_theme(),
                    prevent_thread_lock=True)
        print(f"bdia demo: http://{host}:{port} (model {models.default}; Ctrl-C stops it; temporary files in "
              f"{temp_dir})", flush=True)
        while not stop.wait(0.2):  # until Ctrl-C or SIGTERM
            pass
    finally:
        if demo is not None:
            demo.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the folder this call created
    minutes = (time.perf_counter() - started) / 60
    print(f"bdia demo stopped after {minutes:.1f} min: inversions {counters['inversions']}, edits {counters['edits']}; "
          f"temporary files removed", flush=True)
    return {**counters, "minutes": minutes}
