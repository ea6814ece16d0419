"""The apps on flow-matching models (SD3, FLUX): scripts/edit.py and scripts/text2image.py on the tiny random SD3 and
FLUX folders (bdia.testing): BDIA's float64 latent round trip and its network calls, the other flow methods' errors
and costs beside it, the VP-only methods refused, text-to-image against diffusers' own pipelines, gamma = 0 as flow
Euler, resume, and one-line errors for missing weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import cli

import bdia
from bdia.apps.edit import edit_run, load_image
from bdia.apps.text2image import text_to_image
from bdia.inversion import FLOW_METHODS
from bdia.networks.flow import FluxVelocity, load_flow

REPO = Path(__file__).resolve().parents[2]
EDIT = REPO / "scripts" / "edit.py"
TEXT2IMAGE = REPO / "scripts" / "text2image.py"
N = 10
PROMPTS = ["a photo of a cat", "a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_sd3_dir, tiny_flux_dir):
    return {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


@pytest.fixture(scope="module")
def models64(folders):
    return {family: load_flow(path=path, dtype=torch.float64) for family, path in folders.items()}


# --------------------------------------------------------------------------------------------------
# Editing.


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_edit_round_trips_exactly_with_bdia_and_reports_every_flow_method(family, models64, tmp_path):
    """In float64, N = 10: BDIA's latent round trip is round-off (<= 1e-10 relative) with N + N - 1 = 19 network calls
    for inversion plus reconstruction; flow-Euler inversion, RF-Inversion, RF-Solver and FireFlow stand beside it with
    their (approximate) errors and measured costs."""
    fm = models64[family]
    out = tmp_path / family
    metrics = edit_run(fm, out, image_size=32, num_steps=N, progress=False)
    assert list(metrics["methods"]) == list(FLOW_METHODS)
    assert metrics["guidance_scale"] == fm.default_guidance_scale  # null: the model's own (SD3 7.0, FLUX 3.5)
    m = metrics["methods"]
    bdia_ = m["bdia"]
    assert bdia_["latent"]["relative_error"] <= 1e-10
    assert bdia_["cost"]["inversion"]["nfe"] == N and bdia_["cost"]["reconstruction"]["nfe"] == N - 1
    assert bdia_["nfe_inversion_and_reconstruction"] == 2 * N - 1 <= 2 * N
    expected_nfe = {"ddim": 2 * N, "rf_inversion": 2 * N, "rf_solver": 4 * N, "fireflow": 2 * (N + 1)}
    rows_per_call = 2 if family == "sd3" else 1  # SD3: classifier-free guidance, both halves in one call
    for method, nfe in expected_nfe.items():
        entry = m[method]
        assert entry["nfe_inversion_and_reconstruction"] == nfe, method
        assert entry["cost"]["inversion"]["network_rows"] == rows_per_call * entry["cost"]["inversion"]["nfe"]
        assert entry["seconds_inversion_and_reconstruction"] > 0
        assert entry["latent"]["relative_error"] > 1e-6, method  # approximate inversions
        assert "psnr" in entry["edit_vs_reconstruction"] and entry["cost"]["edit"]["nfe"] > 0
    assert m["rf_solver"]["latent"]["relative_error"] < m["ddim"]["latent"]["relative_error"]  # second order
    assert m["rf_inversion"]["settings"]["controller_gamma"] == 0.5
    assert json.loads((out / "settings.json").read_text())["controller_eta"] == 1.0

    # The saved pair is the image: regenerating it under the source prompt gives back the encoded latent.
    pair = np.load(out / "bdia_pair.npz")
    sigmas = torch.from_numpy(pair["sigmas"])
    assert torch.isinf(sigmas[0]) and sigmas[-1] == 0  # the flow grid, from t = 1 to t = 0
    z0 = fm.encode_images(load_image("china.jpg", 32).float() / 127.5 - 1)
    again = bdia.sample(fm.denoiser(), (torch.from_numpy(pair["x_end"]), torch.from_numpy(pair["x_inner"])), sigmas,
                        solver="bdia_ddim", gamma=float(pair["gamma"]), cond=fm.encode_prompts(["a photo of a chinese temple"]))
    assert float((again - z0).norm() / z0.norm()) < 1e-10
    for method in FLOW_METHODS[1:]:
        assert (out / f"{method}.png").is_file() and (out / f"{method}_inversion.npz").is_file()
    assert "reference" in np.load(out / "rf_inversion_inversion.npz").files


def test_edit_script_on_tiny_flux_resumes_and_refuses_vp_only_methods(monkeypatch, tmp_path, folders, capsys):
    out = tmp_path / "edit"
    common = ["model=tiny-flux", f"model.path={folders['flux']}", "model.dtype=float64", "image_size=32",
              "num_steps=4", "grid_scale=1", "progress=false", f"out_dir={out}"]
    assert cli(monkeypatch, tmp_path, *common, "methods=[bdia,rf_solver]", script=EDIT) is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["bdia", "rf_solver"] and metrics["model"]["config"] == "tiny-flux"
    assert metrics["methods"]["bdia"]["latent"]["relative_error"] <= 1e-10
    assert metrics["methods"]["bdia"]["nfe_inversion_and_reconstruction"] == 7
    assert "rf_solver" in capsys.readouterr().out  # the summary names each method
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert cli(monkeypatch, tmp_path, *common, "methods=[bdia,rf_solver]", script=EDIT) is None  # resumed: done
    assert (out / "metrics.json").stat().st_mtime_ns == stamp

    for methods, needle in (("[bdia,edict]", "edict is an inversion method for VP"),
                            ("[null_text]", "null_text is an inversion method for VP")):
        message = cli(monkeypatch, tmp_path, *common[:-1], f"out_dir={tmp_path / 'refused'}", f"methods={methods}",
                      script=EDIT)
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message and needle in message
    message = cli(monkeypatch, tmp_path, "model=tiny-sd", "methods=[rf_inversion]", f"out_dir={tmp_path / 'sd'}",
                  script=EDIT)
    assert "rf_inversion is an inversion method for flow-matching models" in message
    message = cli(monkeypatch, tmp_path, *common[:-1], f"out_dir={tmp_path / 'x'}", "ddim_inversion_guidance=1",
                  script=EDIT)
    assert "ddim_inversion_guidance applies to Stable Diffusion" in message
    assert not (tmp_path / "refused").exists() and not (tmp_path / "x").exists() and not (tmp_path / "sd").exists()


@pytest.mark.parametrize("script", [EDIT, TEXT2IMAGE])
def test_missing_flow_weights_fail_at_once_in_one_line(script, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    message = cli(monkeypatch, tmp_path, "model=flux-dev", f"out_dir={tmp_path / 'run'}", script=script)
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert "huggingface.co/black-forest-labs/FLUX.1-dev" in message and "model.path" in message
    message = cli(monkeypatch, tmp_path, "model=tiny-sd3", f"model.path={tmp_path / 'nowhere'}",
                  f"out_dir={tmp_path / 'run'}", script=script)
    assert message.startswith("error: ") and "nowhere" in message and "\n" not in message
    assert not (tmp_path / "run" / "metrics.json").exists()


# --------------------------------------------------------------------------------------------------
# Text to image.


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_to_image_is_the_diffusers_pipeline_with_the_same_generator(family, folders, tmp_path):
    """Flow Euler (solver=ddim) from the app equals StableDiffusion3Pipeline / FluxPipeline called with
    generator=torch.Generator().manual_seed(seed) (float32 networks; the pipeline rounds its latents to float32 every
    step, the app keeps them in float64: measured ~6e-7 relative)."""
    fm = load_flow(path=folders[family], dtype=torch.float32)
    out = tmp_path / "run"
    text_to_image(fm, PROMPTS, seeds="3-4", solver="ddim", gamma=None, num_steps=5, guidance_scale=None, height=32,
                  width=32, out_dir=out, save_states=True, progress=False)
    ours = np.load(out / "images.npz")["z_end"]
    for i, (p, seed) in enumerate([(0, 3), (0, 4), (1, 3), (1, 4)]):
        theirs = fm.pipe(PROMPTS[p], generator=torch.Generator().manual_seed(seed), num_inference_steps=5, height=32,
                         width=32, output_type="latent", guidance_scale=fm.default_guidance_scale).images
        theirs = (FluxVelocity.unpack(theirs, 16, 16) if family == "flux" else theirs)[0].double().numpy()
        assert np.abs(ours[i] - theirs).max() / np.abs(theirs).max() < 1e-5, (family, p, seed)


def test_text_to_image_gamma_zero_is_flow_euler_and_resumes(models64, tmp_path):
    fm = models64["sd3"]
    common = dict(seeds="0-1", num_steps=4, height=32, width=32, save_states=True, progress=False, guidance_scale=3.0)
    bdia0 = text_to_image(fm, PROMPTS, solver="bdia_ddim", gamma=0.0, out_dir=tmp_path / "bdia0", **common)
    euler = text_to_image(fm, PROMPTS, solver="ddim", gamma=None, out_dir=tmp_path / "euler", **common)
    assert bdia0["nfe"] == euler["nfe"] == 4 and bdia0["sigmas"]["levels"][0] == "inf"
    a, b = np.load(tmp_path / "bdia0" / "images.npz"), np.load(tmp_path / "euler" / "images.npz")
    assert np.array_equal(a["z_end"], b["z_end"]) and np.array_equal(a["images"], b["images"])
    # BDIA (gamma 0.5) keeps the pair that inverts exactly
    pair_run = text_to_image(fm, PROMPTS[:1], solver="bdia_ddim", gamma=0.5, out_dir=tmp_path / "pair", **common)
    assert pair_run["num_images"] == 2
    record = np.load(tmp_path / "pair" / "records" / "p00000_s000000.npz")
    sigmas = fm.sigmas(4, 32, 32)
    cond = fm.encode_prompts(PROMPTS[:1])
    pair = (torch.from_numpy(record["z_end"])[None], torch.from_numpy(record["z_inner"])[None])
    noise = bdia.invert(fm.denoiser(3.0), pair, sigmas, solver="bdia_ddim", gamma=0.5, cond=cond)
    seed0 = torch.randn(fm.latent_shape(32, 32), generator=torch.Generator().manual_seed(0)).double()
    assert float((noise.x_end[0] - seed0).norm() / seed0.norm()) < 1e-10
    again = text_to_image(fm, PROMPTS, solver="ddim", gamma=None, out_dir=tmp_path / "euler", **common)  # resume
    assert again["num_sampled"] == 0 and again["num_resumed"] == 4


def test_text_to_image_defaults_and_flux_refuses_a_negative_prompt(models64, tiny_sd, tmp_path):
    sd = text_to_image(tiny_sd, PROMPTS[:1], seeds="0", solver="ddim", gamma=None, num_steps=2, guidance_scale=None,
                       out_dir=tmp_path / "sd", progress=False)
    assert sd["guidance_scale"] == 7.5  # null on Stable Diffusion: its usual 7.5
    with pytest.raises(ValueError, match="negative_prompt: FLUX has no unconditional half"):
        text_to_image(models64["flux"], PROMPTS, negative_prompt="blurry", height=32, width=32,
                      out_dir=tmp_path / "flux", progress=False)
    with pytest.raises(ValueError, match="multiples of 4"):
        text_to_image(models64["flux"], PROMPTS, height=34, width=32, out_dir=tmp_path / "flux", progress=False)
    assert not (tmp_path / "flux").exists()


def test_text2image_script_on_tiny_flux(monkeypatch, tmp_path, folders, capsys):
    args = ["model=tiny-flux", f"model.path={folders['flux']}", "height=32", "width=32", "seeds=0", "solver.num_steps=3",
            "progress=false", "hydra.sweep.dir=sweep", 'prompts=["a red fox"]']
    assert cli(monkeypatch, tmp_path, "-m", *args, script=TEXT2IMAGE) is None
    (run,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert "model=tiny-flux" in run.name.split(",")  # the folder is named after the overrides
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["nfe"] == 3 and metrics["guidance_scale"] == 3.5 and metrics["solver"] == "bdia_ddim"
    assert "random weights" in capsys.readouterr().out


def test_make_clean_knows_the_files_of_the_flow_methods():
    """scripts/clean.py keeps its own list of what an edit run writes (it imports nothing from bdia): the same
    patterns as bdia.apps.edit.EDIT_WRITTEN, which now holds the flow methods' files."""
    import runpy

    from bdia.apps.edit import EDIT_WRITTEN

    clean = runpy.run_path(str(REPO / "scripts" / "clean.py"), run_name="clean_module")
    assert clean["WRITTEN"]["edit"] == list(EDIT_WRITTEN)
    for method in FLOW_METHODS:
        assert re.fullmatch(EDIT_WRITTEN[0], f"{method}.png") and re.fullmatch(EDIT_WRITTEN[1], f"{method}_inversion.npz")
