"""The web demo's functions without a browser (bdia.apps.demo): invert once, edit twice from the cached inversion
on the tiny SD, SD3 and FLUX, each edit equal to the edit app's invert_and_edit with the same strength; the
comparison methods of each model's kind beside BDIA with their NFE; bad inputs (a method of the other kind among
them) end in one line; sessions are independent; saving writes one zip in the given folder; the page builds and
picking a model offers its methods and its guidance; the script's mistakes end in one line. The page in a real
browser: tests/apps/test_demo_browser.py."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from bdia.apps.demo import (
    COMPARE_METHODS,
    FLOW_COMPARE_METHODS,
    Models,
    build_demo,
    edit_photo,
    edits_table,
    invert_photo,
    model_configs,
    numbers_table,
    round_trip_text,
    save_session,
)
from bdia.apps.edit import invert_and_edit, load_image
from bdia.inversion import FLOW_METHODS, latent_to_state, state_to_latent

REPO = Path(__file__).resolve().parents[2]
SOURCE, EDIT = "a photo of a chinese temple", "a watercolor painting of a chinese temple"
STEPS = 10


@pytest.fixture(scope="module")
def models(tiny_sd_dir, tiny_sd3_dir, tiny_flux_dir, one_thread):
    """The page's models with the tiny SD, SD3 and FLUX written for this session, at 32 pixels (the tiny SD's own
    size; the flow pipelines' default would be 256)."""
    configs = model_configs()
    for name, path in (("tiny-sd", tiny_sd_dir), ("tiny-sd3", tiny_sd3_dir), ("tiny-flux", tiny_flux_dir)):
        configs[name] = {**configs[name], "path": str(path)}
    return Models(configs, "tiny-sd", image_size=32)


@pytest.fixture(scope="module")
def session(models):
    return invert_photo(models, "china.jpg", "tiny-sd", SOURCE, num_steps=STEPS, gamma=0.96, guidance_scale=3.0)


def _reference(models, strength, edit=True):
    """The edit app's own invert_and_edit with the same photo, settings and strength (an independent path:
    it inverts only the tail of the grid, where the demo regenerates the head from its one full inversion)."""
    sd = models.get("tiny-sd")
    original = load_image("china.jpg", sd.image_size)
    z0 = sd.encode_images(original.to(torch.float32) / 127.5 - 1)
    sigmas = sd.sigmas(STEPS)
    embeds = sd.encode_prompts([EDIT]) if edit else None
    result = invert_and_edit("bdia", sd.eps_denoiser(), latent_to_state(z0, sigmas), sigmas, sd.encode_prompts([SOURCE]),
                             sd.encode_prompts([""]), embeds, 3.0, strength, gamma=0.96)
    return result, sigmas


def test_invert_once_measures_an_exact_round_trip(models, session):
    n = session.numbers["bdia"]
    assert n["latent_relative_error"] < 1e-6  # float64 states, float32 UNet; gamma^-N = 1.5 at N = 10
    assert n["nfe_inversion"] == STEPS and n["nfe_reconstruction"] == STEPS - 1
    assert n["psnr_vs_vae"] > 100  # the reconstruction decodes to the VAE's own round trip (float32 images)
    reference, _ = _reference(models, 1.0, edit=False)
    assert torch.equal(session.inversions["bdia"].inverted.representation["x_end"], reference.representation["x_end"])
    assert session.original.shape == (1, 3, 32, 32) and session.reconstructions["bdia"].dtype == torch.uint8
    assert "round-trip error" in round_trip_text(session) and "BDIA-DDIM" in numbers_table(session)


def test_two_edits_from_the_cached_inversion_equal_the_edit_apps(models, session):
    ticker = session.ticker
    inversion_cost = dict(session.inversions["bdia"].cost["inversion"])
    calls = []
    edit_photo(models, session, EDIT, 1.0, progress=lambda fraction, phase: calls.append(phase))
    assert ticker.done == STEPS - 1 and len(calls) >= STEPS - 1  # regeneration only: no inversion again
    first = session.edits[-1]
    assert first["costs"]["bdia"]["nfe"] == STEPS - 1 and first["prefix_cost"] is None
    reference, sigmas = _reference(models, 1.0)
    sd = models.get("tiny-sd")
    assert torch.equal(first["images"]["bdia"], (sd.decode_latents(state_to_latent(reference.edit, sigmas)) * 127.5 + 128)
                       .clip(0, 255).to(torch.uint8))

    edit_photo(models, session, EDIT, 0.5)  # 5 of 10 steps: the pair at level 5 from the source regeneration
    second = session.edits[-1]
    assert second["steps"] == 5 and second["costs"]["bdia"]["nfe"] == 4 and second["prefix_cost"]["nfe"] == 5
    assert session.inversions["bdia"].cost["inversion"] == inversion_cost  # inverted once
    reference, _ = _reference(models, 0.5)
    # Same maths; the demo's start pair is the inversion's pair at level 5 regenerated, equal to the tail
    # inversion's up to the round trip's round-off (measured above below 1e-6; the float32 UNet may round a
    # regenerated input to a neighbouring float, 6e-8 relative, carried through 4 more steps).
    start = session.start_pairs[5]
    assert (start.x_end - reference.representation["x_end"]).abs().max() <= 1e-6 * reference.representation["x_end"].abs().max()
    edited = session.edits[-1]["images"]["bdia"].to(torch.int16)
    sd_edit = (sd.decode_latents(state_to_latent(reference.edit, sigmas[5:])) * 127.5 + 128).clip(0, 255).to(torch.int16)
    assert (edited - sd_edit).abs().max() <= 1  # at most one grey level (a value on a rounding boundary)
    edit_photo(models, session, "another prompt", 0.5)  # the same strength again: the start pair is cached
    assert session.edits[-1]["prefix_cost"] is None and len(session.edits) == 3
    assert "#3" in edits_table(session) and "to reach the start" in edits_table(session)


def test_comparison_methods_invert_beside_bdia(models):
    session = invert_photo(models, "flower.jpg", None, "a flower", num_steps=4, gamma=0.96, guidance_scale=3.0,
                           compare=["ddim", "edict"])
    assert set(session.numbers) == {"bdia", "ddim", "edict"}
    assert session.numbers["edict"]["latent_relative_error"] < 1e-6 < session.numbers["ddim"]["latent_relative_error"]
    edit_photo(models, session, "a red flower", 1.0)
    assert set(session.edits[-1]["images"]) == {"bdia", "ddim", "edict"}
    edit_photo(models, session, "a red flower", 0.5)  # the baselines edit at strength 1 only
    assert set(session.edits[-1]["images"]) == {"bdia"} and "strength 1 only" in edits_table(session)
    assert COMPARE_METHODS == ("ddim", "edict", "null_text")


# --------------------------------------------------------------------------------------------------
# Flow-matching models (SD3, FLUX): the same page, BDIA over flow Euler, the flow registry's comparisons.

FLOW_STEPS = 6


def _uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _flow_reference(fm, strength, edit=True):
    """The edit app's invert_and_edit on the flow model's own guided denoiser (``fm.denoiser()``: SD3 with its
    classifier-free guidance at 7.0 inside, FLUX with its guidance embedding at 3.5), the latent as the state, the
    pipeline's grid at 32 pixels: an independent path to the demo's (which guides through the edit app's setup)."""
    z0 = fm.encode_images(load_image("china.jpg", 32).to(torch.float32) / 127.5 - 1)
    sigmas = fm.sigmas(FLOW_STEPS, 32, 32)
    embeds = fm.encode_prompts([EDIT]) if edit else None
    result = invert_and_edit("bdia", fm.denoiser(), z0, sigmas, fm.encode_prompts([SOURCE]), None, embeds, 1.0,
                             strength, gamma=0.96)
    return result, sigmas


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_model_inverts_once_and_edits_twice_as_the_edit_app(models, family):
    name = f"tiny-{family}"
    session = invert_photo(models, "china.jpg", name, SOURCE, num_steps=FLOW_STEPS, gamma=0.96)
    fm = session.sd
    assert session.flow and session.guidance_scale == fm.default_guidance_scale == {"sd3": 7.0, "flux": 3.5}[family]
    n = session.numbers["bdia"]
    assert n["latent_relative_error"] < 1e-6  # float64 states, float32 transformer; gamma^-N = 1.3 at N = 6
    assert n["nfe_inversion"] == FLOW_STEPS and n["nfe_reconstruction"] == FLOW_STEPS - 1 and n["psnr_vs_vae"] > 100
    assert n["settings"]["guidance_scale"] == fm.default_guidance_scale
    assert "BDIA over flow Euler" in numbers_table(session) and session.original.shape == (1, 3, 32, 32)
    assert "embedding" in numbers_table(session) if family == "flux" else "embedding" not in numbers_table(session)
    reference, sigmas = _flow_reference(fm, 1.0)
    assert torch.isinf(session.inversions["bdia"].grid[0]) and torch.equal(session.inversions["bdia"].grid, sigmas)
    assert torch.equal(session.inversions["bdia"].inverted.representation["x_end"], reference.representation["x_end"])

    edit_photo(models, session, EDIT, 1.0)
    first = session.edits[-1]
    assert first["costs"]["bdia"]["nfe"] == FLOW_STEPS - 1 and first["prefix_cost"] is None
    assert torch.equal(first["images"]["bdia"], _uint8(fm.decode_latents(reference.edit)))  # a flow's state is its latent

    edit_photo(models, session, EDIT, 0.5)  # 3 of 6 steps: the pair at level 3 from the source regeneration
    second = session.edits[-1]
    assert second["steps"] == 3 and second["costs"]["bdia"]["nfe"] == 2 and second["prefix_cost"]["nfe"] == 3
    assert session.inversions["bdia"].cost["inversion"]["nfe"] == FLOW_STEPS  # inverted once
    reference, _ = _flow_reference(fm, 0.5)
    # As on SD: the regenerated pair equals the tail inversion's up to the round trip's round-off.
    start, top = session.start_pairs[3], reference.representation["x_end"]
    assert (start.x_end - top).abs().max() <= 1e-6 * top.abs().max()
    edited = second["images"]["bdia"].to(torch.int16)
    assert (edited - _uint8(fm.decode_latents(reference.edit)).to(torch.int16)).abs().max() <= 1  # one grey level


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_model_compares_with_the_flow_methods(models, family):
    steps = 4
    session = invert_photo(models, "flower.jpg", f"tiny-{family}", "a flower", num_steps=steps, gamma=0.96,
                           compare=list(FLOW_COMPARE_METHODS))
    assert list(session.numbers) == list(FLOW_METHODS)
    nfe = {"bdia": (steps, steps - 1), "ddim": (steps, steps), "rf_inversion": (steps, steps),
           "rf_solver": (2 * steps, 2 * steps), "fireflow": (steps + 1, steps + 1)}  # per direction
    for method, (inversion, reconstruction) in nfe.items():
        n = session.numbers[method]
        assert (n["nfe_inversion"], n["nfe_reconstruction"]) == (inversion, reconstruction), method
    errors = {m: n["latent_relative_error"] for m, n in session.numbers.items()}
    assert errors["bdia"] < 1e-6 < min(v for m, v in errors.items() if m != "bdia")  # the others are approximate
    assert errors["rf_solver"] < errors["ddim"]  # second order beats flow Euler
    table = numbers_table(session)
    assert all(label in table for label in ("flow-Euler inversion", "RF-Inversion", "RF-Solver", "FireFlow"))
    edit_photo(models, session, "a red flower", 1.0)
    costs = session.edits[-1]["costs"]
    assert set(session.edits[-1]["images"]) == set(FLOW_METHODS)
    assert {m: c["nfe"] for m, c in costs.items()} == {m: r for m, (_, r) in nfe.items()}
    edit_photo(models, session, "a red flower", 0.5)  # the comparisons edit at strength 1 only
    assert set(session.edits[-1]["images"]) == {"bdia"} and "strength 1 only" in edits_table(session)


@pytest.mark.parametrize("model, kwargs, message", [
    ("tiny-flux", {"compare": ["edict"]}, "compare: edict is an inversion method for VP eps-prediction models"),
    ("tiny-sd3", {"compare": ["null_text"]}, "for them choose from bdia, ddim, rf_inversion"),
    ("tiny-sd", {"compare": ["rf_solver"]}, "compare: rf_solver is an inversion method for flow-matching models"),
    ("tiny-flux", {"compare": ["dpm"]}, "compare: unknown 'dpm'; choose from ddim, rf_inversion, rf_solver, fireflow"),
    ("tiny-flux", {"guidance_scale": -1}, r"guidance must be in \[0, 50\]"),
    ("tiny-sd", {"guidance_scale": 0.5}, r"guidance must be in \[1, 50\]"),
    ("tiny-sd3", {"source_prompt": ""}, "source prompt: empty"),
])
def test_flow_mistakes_end_in_one_line(models, model, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        invert_photo(models, **{"image": "china.jpg", "model": model, "source_prompt": SOURCE, "num_steps": 4, **kwargs})
    assert "\n" not in str(info.value)


def test_a_size_the_flow_model_cannot_pack_is_one_line(models):
    odd = Models(models.configs, "tiny-flux", image_size=30)  # FLUX packs 2x2 latents: sides multiples of 2 f = 4
    with pytest.raises(ValueError, match=r"image size 30x30 must be positive multiples of 4 for flux") as info:
        invert_photo(odd, "china.jpg", None, SOURCE, num_steps=4)
    assert "\n" not in str(info.value)


def _png_header(path, width, height):
    """A PNG whose header claims width x height pixels (no pixel data): read without decoding, refused by size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"image": None}, "no photo"),
    ({"image": "/nonexistent/cat.png"}, "no such file"),
    ({"image": "TEXT"}, "not an image"),
    ({"image": "HUGE"}, "megapixels"),
    ({"source_prompt": "  "}, "source prompt: empty"),
    ({"source_prompt": "x" * 5000}, "more than 1000"),
    ({"num_steps": 1}, "steps must be in"),
    ({"num_steps": 2.5}, "whole number"),
    ({"gamma": 0}, r"gamma must be in \(0, 1\]"),
    ({"guidance_scale": float("nan")}, "guidance must be in"),
    ({"compare": ["dpm"]}, "compare: unknown"),
    ({"model": "sd99"}, "not one of"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_inputs_end_in_one_line(models, tmp_path, kwargs, message):
    args = {"image": "china.jpg", "model": "tiny-sd", "source_prompt": SOURCE, "num_steps": 4}
    args.update(kwargs)
    if args["image"] == "TEXT":
        args["image"] = tmp_path / "photo.png"
        args["image"].write_text("not a picture")
    elif args["image"] == "HUGE":
        args["image"] = _png_header(tmp_path / "huge.png", 10000, 10000)
    with pytest.raises(ValueError, match=message) as info:
        invert_photo(models, **args)
    assert "\n" not in str(info.value)


def test_edits_need_an_inversion_and_a_prompt(models, session):
    with pytest.raises(ValueError, match="invert it first"):
        edit_photo(models, None, EDIT)
    with pytest.raises(ValueError, match="edit prompt: empty"):
        edit_photo(models, session, "")
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        edit_photo(models, session, EDIT, 0)


def test_a_missing_checkpoint_is_one_line(tmp_path, monkeypatch):
    from bdia.download import AssetUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = model_configs()
    assert {"tiny-sd", "sd14", "sd15", "sd21_base", "tiny-sd3", "tiny-flux", "sd3-medium", "flux-dev"} <= set(configs)
    absent = Models({**configs, **{name: {**configs[name], "path": str(tmp_path / "none")}
                                   for name in ("tiny-sd", "tiny-flux")}}, "tiny-sd")
    for name, names in (("sd15", "stable-diffusion-v1-5"), ("tiny-sd", "no such folder"), ("flux-dev", "FLUX.1-dev"),
                        ("sd3-medium", "stable-diffusion-3-medium"), ("tiny-flux", "none")):
        with pytest.raises((AssetUnavailableError, ValueError)) as info:
            absent.get(name)
        assert names in str(info.value) and "model.path" in str(info.value), str(info.value)
    assert absent.loaded == {}


def test_sessions_are_independent(models, session):
    other = invert_photo(models, "flower.jpg", "tiny-sd", "a flower", num_steps=4, gamma=0.96, guidance_scale=3.0)
    edits_before = len(session.edits)
    edit_photo(models, other, "a red flower", 1.0)
    assert len(session.edits) == edits_before and len(other.edits) == 1
    assert not torch.equal(other.original, session.original)
    assert other.start_pairs is not session.start_pairs and other.ticker is not session.ticker
    mine = {t.data_ptr() for t in (session.z0, session.original, session.inversions["bdia"].inverted.representation["x_end"])}
    theirs = {t.data_ptr() for t in (other.z0, other.original, other.inversions["bdia"].inverted.representation["x_end"])}
    assert not mine & theirs


def test_save_writes_one_zip_in_the_given_folder(models, session, tmp_path):
    path = save_session(session, tmp_path / "saved")
    assert path.parent == tmp_path / "saved" and list((tmp_path / "saved").iterdir()) == [path]
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        record = json.loads(archive.read("numbers.json"))
    assert {"original.png", "reconstruction_bdia.png", "numbers.json"} <= names
    assert any(n.startswith("edit_") for n in names) == bool(session.edits)
    assert record["round_trip"]["bdia"]["latent_relative_error"] < 1e-6 and record["num_steps"] == STEPS
    with pytest.raises(ValueError, match="nothing to save"):
        save_session(None, tmp_path)


def test_the_page_builds_and_its_handlers_report_mistakes_in_the_page(models, tmp_path):
    demo = build_demo(models, tmp_path, num_steps=4)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"photo", "invert", "edit_button", "original", "reconstruction", "edit", "roundtrip", "status"} <= ids
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    out = handlers["on_invert"](None, None, "tiny-sd", SOURCE, 4, 0.96, 3.0, [], progress=lambda *a, **k: None)
    assert out[0] is None and out[-1].startswith("**error:** no photo")
    out = handlers["on_edit"](None, EDIT, 1.0, progress=lambda *a, **k: None)
    assert out[0] is None and "invert it first" in out[-1]
    out = handlers["on_invert"](None, "china.jpg", "tiny-sd", SOURCE, 4, 0.96, 3.0, [], progress=lambda *a, **k: None)
    assert out[0] is not None and out[-1].startswith("Inverted") and out[1].shape == (256, 256, 3)  # 32 px x 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples"]  # the example photos only
    assert not (REPO / "bdia" / "apps" / "demo.pyi").exists()  # (Gradio writes one for a component subclass)

    # Picking a model: its kind's comparisons (the ticked ones that apply stay ticked), its own guidance.
    methods, guidance, status = handlers["on_model"]("tiny-flux", ["ddim", "edict"])
    assert [m for _, m in methods["choices"]] == list(FLOW_COMPARE_METHODS) and methods["value"] == ["ddim"]
    assert guidance["value"] == 3.5 and guidance["minimum"] == 0 and "guidance embedding" in guidance["info"]
    assert status.startswith("Model **tiny-flux** loaded")
    out = handlers["on_invert"](None, "china.jpg", "tiny-flux", SOURCE, 4, 0.96, guidance["value"], ["rf_solver"],
                                progress=lambda *a, **k: None)
    assert out[-1].startswith("Inverted") and set(out[0].numbers) == {"bdia", "rf_solver"}
    assert out[0].guidance_scale == 3.5 and "RF-Solver" in out[-3]  # the numbers table
    out = handlers["on_invert"](None, "china.jpg", "tiny-flux", SOURCE, 4, 0.96, 3.5, ["edict"],
                                progress=lambda *a, **k: None)
    assert out[0] is None and out[-1].startswith("**error:** compare: edict is an inversion method for VP")
    methods, guidance, status = handlers["on_model"]("tiny-sd3", [])
    assert guidance["value"] == 7.0 and "classifier-free" in guidance["info"]
    methods, guidance, status = handlers["on_model"]("tiny-sd", ["ddim", "rf_solver"])
    assert [m for _, m in methods["choices"]] == list(COMPARE_METHODS) and methods["value"] == ["ddim"]
    assert guidance["value"] == 7.5 and guidance["minimum"] == 1
    absent = Models({**models.configs, "tiny-flux": {**models.configs["tiny-flux"], "path": str(tmp_path / "none")}},
                    "tiny-sd")
    handlers = {fn.name: fn.fn for fn in build_demo(absent, tmp_path, num_steps=4).fns.values()}
    methods, guidance, status = handlers["on_model"]("tiny-flux", [])
    assert status.startswith("**error:**") and "model.path" in status and "\n" not in status
    assert guidance == {"__type__": "update"}  # the slider is left as it was


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}


def _script(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_script_mistakes_end_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _script(f"port={port}", f"model.path={tmp_path}")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: port={port}: cannot listen")
    result = _script("model=sd15", "port=0")
    assert result.returncode == 1 and result.stderr.startswith("error: port must be in")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = _script("model=sd15", f"port={port}")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "stable-diffusion-v1-5" in result.stderr and "model.path" in result.stderr
    result = _script("model=nope")
    assert result.returncode == 1 and "choose one of" in result.stderr and "tiny-sd" in result.stderr
    assert "tiny-flux" in result.stderr  # the flow models are offered too
    result = _script("model=tiny-flux", f"model.path={tmp_path / 'none'}", "compare=[edict]", f"port={port}")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0  # refused before the model is loaded
    assert result.stderr.startswith("error: compare: edict is an inversion method for VP eps-prediction models")
