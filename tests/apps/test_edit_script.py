"""scripts/edit.py and bdia.apps.edit.edit_run end to end on scikit-learn's china.jpg with the tiny local SD folder;
model=sd15 offline fails at once with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bdia
from bdia.apps.cli import preflight
from bdia.inversion import METHODS
from bdia.apps.edit import edit_run, load_image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "edit.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}


def test_load_image_centre_crops_the_shipped_photo():
    from sklearn.datasets import load_sample_image

    image = load_image("china.jpg", 32)
    assert image.dtype == torch.uint8 and image.shape == (1, 3, 32, 32)
    full = load_sample_image("china.jpg")  # 427 x 640: the centred 427 x 427 square, shrunk 13x
    mean_full_square = full[:, 106:533].mean(axis=(0, 1))
    assert np.abs(image[0].float().mean(dim=(1, 2)).numpy() - mean_full_square).max() < 3  # same region, same colours
    with pytest.raises(ValueError, match="no such file"):
        load_image("/nonexistent/cat.png", 32)


def test_edit_run_writes_images_pair_and_metrics(tiny_sd, tmp_path):  # noqa: F811
    out = tmp_path / "edit"
    metrics = edit_run(tiny_sd, out, image="china.jpg", num_steps=4, guidance_scale=3.0, gamma=0.96,
                       num_inner_steps=2, grid_scale=1)
    for method in METHODS:
        with Image.open(out / f"{method}.png") as png:
            # original | reconstruction | edit, 32 px tiles, 1 px padding, below the column labels, right of the row's
            assert png.size[0] > 3 * 33 + 1 and png.size[1] > 33 + 1
            tiles = np.asarray(png.convert("RGB"))[-(33 + 1):, -(3 * 33 + 1):]
        assert np.array_equal(tiles[1:33, 1:33], load_image("china.jpg", 32)[0].permute(1, 2, 0).numpy())
        m = metrics["methods"][method]
        assert m["settings"]["num_steps"] == 4 and m["cost"]["inversion"]["nfe"] > 0 and m["cost"]["inversion"]["seconds"] > 0
        assert set(m) >= {"latent", "image", "image_vs_vae", "cost", "settings"}
    with Image.open(out / "edit_grid.png") as grid:  # one labelled row per method
        assert grid.size[0] > 3 * 33 + 1 and grid.size[1] > len(METHODS) * 33 + 1
        tiles = np.asarray(grid.convert("RGB"))[-(len(METHODS) * 33 + 1):, -(3 * 33 + 1):]
    assert all(np.array_equal(tiles[1 + 33 * r:33 * (r + 1), 1:33], load_image("china.jpg", 32)[0].permute(1, 2, 0).numpy())
               for r in range(len(METHODS)))
    assert json.loads((out / "metrics.json").read_text())["methods"].keys() == set(METHODS)
    assert metrics["methods"]["bdia"]["settings"]["gamma"] == 0.96
    assert metrics["methods"]["bdia"]["latent"]["relative_error"] < 1e-10  # float32 UNet, float64 state
    assert metrics["methods"]["edict"]["latent"]["relative_error"] < 1e-10
    assert metrics["methods"]["ddim"]["latent"]["relative_error"] > 1e-6
    assert metrics["methods"]["bdia"]["nfe_inversion_and_reconstruction"] == 4 + 3
    assert metrics["methods"]["edict"]["nfe_inversion_and_reconstruction"] == 2 * (4 + 4)
    assert (out / "env.json").is_file() and not [p for p in out.iterdir() if ".tmp-" in p.name]

    # The saved pair is the image: regenerating from it with the source prompt gives back the encoded latent.
    pair = np.load(out / "bdia_pair.npz")
    assert float(pair["gamma"]) == 0.96 and pair["x_end"].dtype == np.float64
    sigmas = torch.from_numpy(pair["sigmas"])
    embeds = tiny_sd.encode_prompts(["a photo of a chinese temple"])
    x = bdia.sample(tiny_sd.denoiser(3.0), (torch.from_numpy(pair["x_end"]), torch.from_numpy(pair["x_inner"])), sigmas,
                    solver="bdia_ddim", gamma=0.96, cond={"encoder_hidden_states": embeds})
    z0 = tiny_sd.encode_images(load_image("china.jpg", 32).float() / 127.5 - 1)
    z = x * bdia.vp_alpha(sigmas[-1])
    assert float((z - z0).norm() / z0.norm()) < 1e-10


def test_edit_run_rejects_unknown_methods(tiny_sd, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="unknown"):
        edit_run(tiny_sd, tmp_path, methods=["bdia", "p2p"], num_steps=4)


def test_script_config_runs_end_to_end_on_the_tiny_folder(tiny_sd_dir, tmp_path):  # noqa: F811
    """The Hydra shell's function on configs/edit/edit.yaml composed with model=tiny-sd (the command line
    ``python scripts/edit.py model=tiny-sd model.path=... num_steps=3 ...``), in process to keep the test fast."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    spec = importlib.util.spec_from_file_location("edit_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    overrides = ["model=tiny-sd", f"model.path={tiny_sd_dir}", "num_steps=3", "methods=[bdia,edict]",
                 "guidance_scale=2", "gamma=0.92", f"out_dir={out}"]
    assert preflight(overrides, config_name="edit") is None  # what the script's cli() runs first
    assert "unknown model" in preflight(["model=sd99"], config_name="edit")
    with initialize_config_dir(str(REPO / "configs" / "edit"), version_base="1.3"):
        cfg = compose("edit", overrides=overrides)
    metrics = script.edit_from_config(cfg, choices={"model": "tiny-sd"})
    assert sorted(metrics["methods"]) == ["bdia", "edict"]
    assert metrics["model"]["config"] == "tiny-sd" and metrics["methods"]["bdia"]["settings"]["gamma"] == 0.92
    assert json.loads((out / "metrics.json").read_text())["num_steps"] == 3
    assert (out / "bdia_pair.npz").is_file() and (out / "bdia.png").is_file() and (out / "config.yaml").is_file()


def test_script_with_sd15_offline_fails_at_once_with_one_line(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), f"out_dir={tmp_path / 'x'}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0] and "model.path" in lines[0]
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # imports only: no download retries (measured ~10 s on 2 busy cores)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_edit_run_reports_lpips_and_clip_edit_metrics(tiny_sd, tmp_path):  # noqa: F811
    import torchvision

    from bdia.testing import build_tiny_clip

    torch.manual_seed(0)
    alexnet = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), alexnet)
    clip = build_tiny_clip(tmp_path / "clip")
    metrics = edit_run(tiny_sd, tmp_path / "edit", image="china.jpg", methods=["bdia", "ddim"], num_steps=3,
                       guidance_scale=3.0, lpips_net="alex", lpips_weights=str(alexnet), clip_path=str(clip))
    for method in ("bdia", "ddim"):
        m = metrics["methods"][method]
        assert m["image"]["lpips"] >= 0 and 0 < m["image"]["ssim"] <= 1
        assert set(m["clip"]) == {"clip_score_edit", "clip_directional_similarity"}
        assert -1 <= m["clip"]["clip_directional_similarity"] <= 1


def test_torchrun_deals_the_images_of_a_sweep_out_over_the_ranks(tmp_path, tiny_sd_dir, monkeypatch):  # noqa: F811
    """Table 3 on several GPUs: under torchrun each rank runs its share of the sweep's jobs (one image each);
    the folders equal one process's, bit for bit."""
    import filecmp

    from app_helpers import cli, subprocess_env

    script = Path(__file__).resolve().parents[2] / "scripts" / "edit.py"
    common = ["model=tiny-sd", f"model.path={tiny_sd_dir}", "methods=[bdia,ddim]", "num_steps=3", "image_size=32",
              "image=china.jpg,flower.jpg", "device=cpu"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), "-m", "launcher=torchrun", "hydra.sweep.dir=ranks", *common],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("is rank") == 2  # each rank skipped the other's job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' setting
    try:
        assert cli(monkeypatch, tmp_path, "-m", "hydra.sweep.dir=single", *common, script=script) is None
    finally:
        torch.set_num_threads(threads)
    folders = sorted(p.name for p in (tmp_path / "single").iterdir() if p.is_dir())
    assert len(folders) == 2 and folders == sorted(p.name for p in (tmp_path / "ranks").iterdir() if p.is_dir())
    for folder in folders:
        a, b = tmp_path / "ranks" / folder, tmp_path / "single" / folder
        for name in ("bdia.png", "ddim.png", "edit_grid.png"):
            assert filecmp.cmp(a / name, b / name, shallow=False), (folder, name)
        with np.load(a / "bdia_pair.npz") as x, np.load(b / "bdia_pair.npz") as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
