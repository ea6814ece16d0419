"""Text-to-image (bdia.prompts, bdia.apps.text2image, scripts/text2image.py) on the tiny SD folder: prompt sources,
run folders, resume, parity of the decoded images with diffusers' own pipeline, the Hydra app and its sweep
folders, CLIP score end to end, and the offline failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import cli as app_cli
from sd_helpers import PROMPTS, build_tiny_clip

from bdia.apps.cli import prompts_tag
from bdia.prompts import coco_captions, load_prompts, read_prompt_file
from bdia.apps.text2image import image_name, text_to_image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "text2image.py"
FAST = dict(num_steps=3, guidance_scale=3.0, progress=False)


# --------------------------------------------------------------------------------------------------
# Prompts.


def _coco_file(path: Path) -> Path:
    annotations = [{"image_id": i // 3, "id": 100 - i, "caption": f"  caption {i} of\nimage {i // 3} "} for i in range(30)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [{"id": i} for i in range(10)], "annotations": annotations}))
    return path


def test_prompts_from_a_list_a_file_and_coco_captions(tmp_path):
    assert load_prompts(["a cat ", "a dog"]) == ["a cat", "a dog"]
    assert load_prompts("one prompt") == ["one prompt"]
    assert load_prompts(["a", "b", "c"], num_prompts=2) == ["a", "b"]
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na red fox\n\n  a blue whale  \n")
    assert read_prompt_file(file) == load_prompts(prompt_file=file) == ["a red fox", "a blue whale"]

    captions = _coco_file(tmp_path / "coco" / "annotations" / "captions_val2014.json")
    subset = load_prompts(coco_captions=captions, num_prompts=4, prompt_seed=0)
    assert subset == coco_captions(captions, num=4, seed=0) == coco_captions(tmp_path / "coco", num=4, seed=0)
    assert coco_captions(captions, num=6, seed=0)[:4] == subset  # a smaller subset is a prefix
    assert coco_captions(captions, num=4, seed=1) != subset
    records = coco_captions(captions, seed=0, return_records=True)
    # one caption per image, the lowest caption id: image k's captions have ids 100-3k, 99-3k, 98-3k
    assert sorted(r["image_id"] for r in records) == list(range(10))
    assert all(r["caption_id"] == 98 - 3 * r["image_id"] for r in records)
    assert all("\n" not in r["caption"] and r["caption"] == r["caption"].strip() for r in records)
    expected_order = np.random.default_rng(0).permutation(10)  # the documented rule, written out
    by_caption_id = sorted(records, key=lambda r: r["caption_id"])
    assert [r["caption_id"] for r in records] == [by_caption_id[i]["caption_id"] for i in expected_order]
    assert len(coco_captions(captions, one_per_image=False)) == 30


def test_prompt_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts()
    with pytest.raises(ValueError, match="exactly one prompt source"):
        load_prompts(["a"], prompt_file=tmp_path / "p.txt")
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(prompt_file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts in it"):
        load_prompts(prompt_file=tmp_path / "empty.txt")
    captions = _coco_file(tmp_path / "captions_val2014.json")
    with pytest.raises(ValueError, match="only 10 usable captions"):
        load_prompts(coco_captions=captions, num_prompts=11)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        coco_captions(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------------
# Run folders.


def test_text_to_image_writes_the_run_folder_and_resumes(tiny_sd, tmp_path):
    out = tmp_path / "run"
    metrics = text_to_image(tiny_sd, PROMPTS, seeds="0-2", solver="bdia_ddim", gamma=0.5, batch_size=4, out_dir=out, **FAST)
    names = [image_name(p, s) for p in range(2) for s in range(3)]
    assert sorted(f.stem for f in (out / "images").glob("*.png")) == names
    for name in ("images.npz", "grid.png", "prompts.json", "prompts.txt", "metrics.json", "settings.json", "env.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["nfe"] == 3 and metrics["num_images"] == 6 and metrics["num_sampled"] == 6
    assert metrics["gamma"] == 0.5 and metrics["model"]["timestep_spacing"] == "leading"
    assert metrics["wall_seconds"] > 0 and metrics["sampling_seconds"] > 0
    assert json.loads((out / "prompts.json").read_text()) == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    with np.load(out / "images.npz") as data:
        images = data["images"]
        assert images.shape == (6, 3, 32, 32) and images.dtype == np.uint8
        assert list(data["seeds"]) == [0, 1, 2] * 2 and list(data["prompts"]) == json.loads((out / "prompts.json").read_text())

    again = text_to_image(tiny_sd, PROMPTS, seeds="0-3", solver="bdia_ddim", gamma=0.5, batch_size=4, out_dir=out, **FAST)
    assert again["num_resumed"] == 6 and again["num_sampled"] == 2 and again["num_images"] == 8
    with np.load(out / "images.npz") as data:
        np.testing.assert_array_equal(data["images"][[0, 1, 2, 4, 5, 6]], images)  # unchanged, in image order
    with pytest.raises(ValueError, match="other settings.*gamma"):
        text_to_image(tiny_sd, PROMPTS, seeds="0-3", solver="bdia_ddim", gamma=1.0, out_dir=out, **FAST)
    fresh = text_to_image(tiny_sd, PROMPTS, seeds="0", solver="bdia_ddim", gamma=1.0, out_dir=out, resume=False, **FAST)
    assert fresh["num_images"] == 2 and len(list((out / "images").glob("*.png"))) == 2


def test_images_equal_diffusers_pipeline_and_do_not_depend_on_the_batch(tiny_sd, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    seeds = [3, 4]
    with pytest.raises(ValueError, match=r"gamma applies to the BDIA solvers only; 'ddim' is gamma = 0 \(use bdia_ddim\)"):
        text_to_image(tiny_sd, PROMPTS[:1], seeds=seeds, solver="ddim", gamma=0.5, out_dir=tmp_path / "a", **FAST)
    assert not (tmp_path / "a" / "images").exists()  # refused before sampling
    ours = text_to_image(tiny_sd, PROMPTS[:1], seeds=seeds, solver="ddim", gamma=None, out_dir=tmp_path / "a",
                         batch_size=2, **FAST)
    assert ours["gamma"] is None  # ddim is gamma = 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPTS[:1] * 2, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # [0, 1]
    reference = (reference * 255).round().to(torch.uint8).numpy()
    with np.load(tmp_path / "a" / "images.npz") as data:
        images = data["images"]
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 1
    assert images.std() > 5  # not a blank image

    one = text_to_image(tiny_sd, PROMPTS, seeds=seeds, out_dir=tmp_path / "one", batch_size=1, network_batch=2, **FAST)
    four = text_to_image(tiny_sd, PROMPTS, seeds=seeds, out_dir=tmp_path / "four", batch_size=4, network_batch=2, **FAST)
    assert one["nfe"] == four["nfe"] == 3
    for name in [image_name(p, s) for p in range(2) for s in seeds]:
        assert (tmp_path / "one" / "images" / f"{name}.png").read_bytes() == (tmp_path / "four" / "images" / f"{name}.png").read_bytes()


def test_states_are_saved_for_inversion_and_noise_per_prompt(tiny_sd, tmp_path):
    import bdia
    from bdia.networks.sd import x_to_z, z_to_x

    out = tmp_path / "states"
    text_to_image(tiny_sd, PROMPTS, seeds=[0], solver="bdia_ddim", gamma=0.95, out_dir=out, save_states=True, **FAST)
    with np.load(out / "images.npz") as data:
        z_end, z_inner = torch.from_numpy(data["z_end"]), torch.from_numpy(data["z_inner"])
    sigmas = tiny_sd.sigmas(3)
    denoiser = tiny_sd.denoiser(3.0)
    cond = {"encoder_hidden_states": tiny_sd.encode_prompts(PROMPTS)}
    with torch.no_grad():
        noise = bdia.invert(denoiser, (z_to_x(z_end, sigmas[-1]), z_to_x(z_inner, sigmas[-2])), sigmas,
                            solver="bdia_ddim", gamma=0.95, cond=cond)
    z_init = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))] * 2).double()
    torch.testing.assert_close(x_to_z(noise.x_end, sigmas[0]), z_init, rtol=0, atol=1e-9)

    shared = text_to_image(tiny_sd, PROMPTS, seeds=[0], out_dir=tmp_path / "n", noise_per_prompt=True, **FAST)
    assert shared["noise_per_prompt"] is True
    with pytest.raises(ValueError, match="unknown solver 'edm'.*ddim, bdia_ddim"):
        text_to_image(tiny_sd, PROMPTS, solver="edm", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        text_to_image(tiny_sd, PROMPTS, gamma=2.0, out_dir=tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# The Hydra app.


def cli(monkeypatch, cwd, *args):
    """Run ``scripts/text2image.py args`` in this process; the exit message/code, or ``None`` for success."""
    return app_cli(monkeypatch, cwd, *args, script=SCRIPT)


def test_every_model_config_composes_and_the_default_is_sd15():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs" / "text2image"), version_base="1.3"):
        cfg = compose("text2image")
        # guidance_scale null: the model's default (SD 7.5: text_to_image resolves it; SD3 / FLUX: their cards')
        assert cfg.model.name == "sd15" and cfg.solver.name == "bdia_ddim" and cfg.guidance_scale is None
        assert (cfg.solver.gamma, cfg.solver.num_steps) == (0.5, 10)  # the authors' gamma at 10 steps
        swept = compose("text2image", ["solver=ddim", "solver.num_steps=40", "solver.gamma=1.0"])
        assert (swept.solver.name, swept.solver.gamma, swept.solver.num_steps) == ("ddim", 1.0, 40)
        for name in ("sd14", "sd21_base", "tiny-sd"):
            assert compose("text2image", [f"model={name}"]).model._target_ == "bdia.networks.sd.load_sd"
        both = compose("text2image", ["metrics=[clip,fid]"])
        assert set(both.metrics) == {"clip", "fid"}
    GlobalHydra.instance().clear()


def test_sweep_over_solver_and_steps_names_run_folders_after_overrides(monkeypatch, tmp_path, tiny_sd_dir):
    code = cli(monkeypatch, tmp_path, "-m", "solver=ddim,bdia_ddim", "solver.num_steps=2,3",
               f"model.path={tiny_sd_dir}", "seeds=0", "prompts=[a red fox]",
               "guidance_scale=2", "device=cpu", "progress=false", "hydra.sweep.dir=sweep")
    assert code is None
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    # model.path, device, progress ... are excluded from folder names (configs/text2image/text2image.yaml); the
    # prompts are named by a slug of the first one and a hash of the prompt source (bdia.apps.cli.prompts_tag)
    tag = prompts_tag(["a red fox"], None, None, None, 0)
    assert tag.startswith("prompts=a-red-fox-") and tag != prompts_tag(["a red fox", "a blue cat"], None, None, None, 0)
    assert folders == [f"guidance_scale=2,seeds=0,solver.num_steps={n},solver={s},{tag}"
                       for n in (2, 3) for s in ("bdia_ddim", "ddim")]
    for name in folders:
        metrics = json.loads((tmp_path / "sweep" / name / "metrics.json").read_text())
        assert metrics["nfe"] == int(name.split("num_steps=")[1][0])
        assert metrics["gamma"] == (0.5 if "bdia" in name else None)  # bdia_ddim's gamma from its solver config
        assert metrics["prompt_source"]["source"] == "list"
    # A base solver takes no gamma: one line, before anything is sampled.
    message = cli(monkeypatch, tmp_path, "solver=ddim", "solver.gamma=0.5", f"model.path={tiny_sd_dir}", "seeds=0",
                  "device=cpu", "progress=false", f"out_dir={tmp_path / 'refused'}")
    assert message == "error: gamma applies to the BDIA solvers only; 'ddim' is gamma = 0 (use bdia_ddim)"
    assert not (tmp_path / "refused" / "images").exists()


def test_clip_score_end_to_end_on_a_tiny_sd_run(monkeypatch, tmp_path, tiny_sd_dir):
    from bdia.metrics import CLIPScore

    clip = build_tiny_clip(tmp_path / "tiny-clip")
    out = tmp_path / "run"
    code = cli(monkeypatch, tmp_path, f"model.path={tiny_sd_dir}", "seeds=0-1", "solver.num_steps=2",
               "device=cpu", "progress=false", f"out_dir={out}", "metrics=clip", f"metrics.clip.path={clip}",
               "metrics.clip.device=cpu", "batch_size=4")
    assert code is None
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = metrics["evaluation"]["clip"]
    assert evaluation["num_images"] == 4 and len(evaluation["per_image"]) == 4
    with np.load(out / "images.npz") as data:
        direct = CLIPScore(path=str(clip), prompts=list(data["prompts"]), device="cpu")(data["images"])
    assert evaluation["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-9)


def test_offline_hub_model_and_clip_model_fail_at_once_with_one_line(monkeypatch, tmp_path, tiny_sd_dir):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    message = cli(monkeypatch, tmp_path, "device=cpu", f"out_dir={tmp_path / 'sd15'}")
    assert time.perf_counter() - started < 10
    assert message.startswith("error: Stable Diffusion checkpoint 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    assert "\n" not in message and "model.path=" in message and "HF_HUB_OFFLINE" in message
    message = cli(monkeypatch, tmp_path, f"model.path={tiny_sd_dir}", "device=cpu",
                  f"out_dir={tmp_path / 'clip'}", "metrics=clip")
    assert message.startswith("error: CLIP model 'openai/clip-vit-large-patch14' is not available")
    assert not (tmp_path / "clip" / "images").exists()  # failed before sampling
    message = cli(monkeypatch, tmp_path, "model=tiny-sd", "model.path=nowhere", "device=cpu", f"out_dir={tmp_path / 'x'}")
    assert message.startswith("error: model.path=nowhere is not available: no such folder")
    assert cli(monkeypatch, tmp_path, "model=sd3") .startswith("error: unknown model 'sd3'")


def test_make_tiny_sd_script_writes_a_loadable_folder(tmp_path, capsys):
    import runpy as _runpy

    main = _runpy.run_path(str(REPO / "scripts" / "make_tiny_sd.py"))["main"]
    assert main([str(tmp_path / "tiny"), "--seed", "2"]) == 0
    assert "model.path=" in capsys.readouterr().out
    from bdia.networks.sd import load_sd

    assert load_sd(path=tmp_path / "tiny").latent_shape() == (4, 8, 8)
    assert main([str(tmp_path / "bad"), "--sample-size", "30"]) == 1
    assert "multiple of 8" in capsys.readouterr().err


def test_torchrun_two_cpu_processes_match_one_process_bit_for_bit(monkeypatch, tmp_path, tiny_sd_dir):
    """The sampling driver shards (prompt, seed) items over torchrun ranks (gloo on the CPU): the PNG bytes and
    the float64 final latents equal one process's with another batch size, and the CLIP score computed on
    two ranks (features sharded, rows gathered) equals one process's."""
    import filecmp
    import subprocess
    import sys

    from app_helpers import subprocess_env

    clip = build_tiny_clip(tmp_path / "tiny-clip")
    common = [f"model.path={tiny_sd_dir}", "seeds=0-2", "solver.num_steps=3", "guidance_scale=2", "device=cpu",
              "progress=false", "save_states=true", "network_batch=2", "prompts=[a red fox,a blue boat]",
              "metrics=clip", f"metrics.clip.path={clip}", "metrics.clip.device=cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               "batch_size=2", f"out_dir={tmp_path / 'torchrun'}", *common]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' setting (OMP_NUM_THREADS=1)
    try:
        assert cli(monkeypatch, tmp_path, "batch_size=5", f"out_dir={tmp_path / 'single'}", *common) is None
    finally:
        torch.set_num_threads(threads)
    sharded, single = tmp_path / "torchrun", tmp_path / "single"
    names = sorted(p.name for p in (single / "images").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (sharded / "images").iterdir())
    for name in names:
        assert filecmp.cmp(sharded / "images" / name, single / "images" / name, shallow=False), name
    with np.load(sharded / "images.npz") as a, np.load(single / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["z_end"], b["z_end"])
        assert list(a["prompts"]) == list(b["prompts"])
    m_sharded = json.loads((sharded / "metrics.json").read_text())
    m_single = json.loads((single / "metrics.json").read_text())
    assert m_sharded["world_size"] == 2 and m_single["world_size"] == 1
    assert m_sharded["num_images"] == m_single["num_images"] == 6 and m_sharded["nfe"] == m_single["nfe"] == 3
    # Same images, CLIP features on other batch shapes: float32 rounding (a few ulps) only.
    assert m_sharded["evaluation"]["clip"]["clip_score"] == pytest.approx(
        m_single["evaluation"]["clip"]["clip_score"], rel=1e-5)
