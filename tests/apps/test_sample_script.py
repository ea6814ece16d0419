"""The sampling run (bdia.apps.sample), the analytic digits model (bdia.analytic) and the scripts/sample.py shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bdia
from bdia.analytic import digits_gmm, gmm_toy, mixture_metrics
from bdia.apps.sample import format_seeds, image_grid, parse_seeds, quantize, sample_run, save_image_grid, seed_noise

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "sample.py"


@pytest.fixture(scope="module")
def digits():
    """A small digits mixture on 8x8 images: cheap enough for many solver calls."""
    return digits_gmm(image_size=8, num_components=60)


def run(denoiser, out_dir, **kwargs):
    defaults = dict(solver="bdia_edm", gamma=0.5, num_steps=4, seeds="0-3", batch_size=2, progress=False)
    return sample_run(denoiser, out_dir=out_dir, **{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------------
# The run folder.


def test_sample_run_writes_the_run_folder(digits, tmp_path):
    metrics = run(digits, tmp_path / "run", grid_scale=3, grid_padding=1, config={"note": "hi"})
    out = tmp_path / "run"
    for name in ("grid.png", "images.npz", "metrics.json", "env.json", "config.yaml", "settings.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{s:06d}.png" for s in range(4)]
    assert sorted(p.name for p in (out / "records").iterdir()) == [f"{s:06d}.npz" for s in range(4)]
    for folder in (out, out / "images", out / "records"):
        assert not [p for p in folder.iterdir() if ".tmp-" in p.name], "temporary files left behind"

    with Image.open(out / "grid.png") as grid:
        grid.load()
        # 2 x 2 tiles of 8 * 3 pixels, 1 pixel of padding between and around them
        assert grid.size == (2 * 24 + 3, 2 * 24 + 3)
    data = np.load(out / "images.npz")
    assert data["images"].dtype == np.uint8 and data["images"].shape == (4, 1, 8, 8)
    assert data["seeds"].tolist() == [0, 1, 2, 3]
    assert "class_labels" not in data and "x_end" not in data  # unconditional model; save_states off
    assert np.array_equal(data["sigmas"], bdia.karras_sigmas(4).numpy())
    with Image.open(out / "images" / "000002.png") as png:
        assert np.array_equal(np.asarray(png), data["images"][2, 0])

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["solver"] == "bdia_edm" and metrics["gamma"] == 0.5 and metrics["num_steps"] == 4
    assert metrics["num_images"] == 4 and metrics["seeds"] == "0-3"
    assert metrics["num_sampled"] == 4 and metrics["num_resumed"] == 0 and metrics["world_size"] == 1
    assert metrics["nfe_per_batch"] == [7, 7] and metrics["nfe"] == 7
    assert metrics["sampling_seconds"] > 0 and metrics["images_per_second"] > 0 and metrics["wall_seconds"] > 0
    assert set(metrics["mixture"]) >= {"nearest_mean_rms", "log_prob_per_dim", "class_counts"}
    assert json.loads((out / "env.json").read_text())["versions"]["torch"] == torch.__version__


def test_rerun_resumes_and_outputs_follow_the_seeds_asked_for(digits, tmp_path):
    run(digits, tmp_path, seeds="0-3", num_steps=2)
    again = run(digits, tmp_path, seeds="2-5", num_steps=2)
    assert again["num_resumed"] == 2 and again["num_sampled"] == 2
    assert np.load(tmp_path / "images.npz")["seeds"].tolist() == [2, 3, 4, 5]
    assert len(list((tmp_path / "images").iterdir())) == 6  # earlier seeds stay; images.npz names this run's


def test_rerun_with_resume_false_starts_afresh(digits, tmp_path):
    run(digits, tmp_path, seeds="0-3", num_steps=2)
    metrics = run(digits, tmp_path, seeds=[7], num_steps=2, resume=False)
    assert metrics["num_sampled"] == 1
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["000007.png"]
    assert np.load(tmp_path / "images.npz")["seeds"].tolist() == [7]


def test_resume_refuses_a_folder_sampled_with_other_settings(digits, tmp_path):
    run(digits, tmp_path, seeds="0-1", num_steps=2)
    with pytest.raises(ValueError, match=r"other settings \(num_steps: 2 there, 3 now.*resume=false"):
        run(digits, tmp_path, seeds="0-1", num_steps=3)
    assert run(digits, tmp_path, seeds="0-1", num_steps=3, resume=False)["num_sampled"] == 2


@pytest.mark.parametrize(
    "solver, options, expected",
    [
        ("ddim", {}, lambda n: n),
        ("bdia_ddim", {}, lambda n: n),
        ("edm", {}, lambda n: 2 * n - 1),
        ("bdia_edm", {}, lambda n: 2 * n - 1),
        ("bdia_edm", {"backward": "heun"}, lambda n: 3 * n - 2),
    ],
)
def test_nfe_is_measured_per_batch(digits, tmp_path, solver, options, expected):
    gamma = 0.5 if solver.startswith("bdia") else None
    metrics = run(digits, tmp_path, solver=solver, gamma=gamma, num_steps=5, seeds="0-2", batch_size=2, **options)
    assert metrics["nfe_per_batch"] == [expected(5)] * 2


@pytest.mark.parametrize("solver", ["bdia_edm", "ddim"])
def test_images_do_not_depend_on_the_batch_size(digits, tmp_path, solver):
    gamma = 0.5 if solver == "bdia_edm" else None
    kwargs = dict(solver=solver, gamma=gamma, seeds="3-7")
    run(digits, tmp_path / "b1", batch_size=1, **kwargs)
    run(digits, tmp_path / "b3", batch_size=3, **kwargs)
    a, b = (np.load(tmp_path / d / "images.npz") for d in ("b1", "b3"))
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])
    assert len(np.unique(a["images"].reshape(5, -1), axis=0)) == 5  # different seeds, different images


def test_float_states_are_bit_identical_across_batches(digits):
    sigmas = bdia.karras_sigmas(5)
    whole = bdia.sample(digits, seed_noise(range(4), (1, 8, 8), sigmas[0]), sigmas, solver="bdia_edm", gamma=0.5)
    rows = [bdia.sample(digits, seed_noise([k], (1, 8, 8), sigmas[0]), sigmas, solver="bdia_edm", gamma=0.5) for k in range(4)]
    assert torch.equal(whole, torch.cat(rows))


def test_stochastic_edm_is_per_image_reproducible(digits, tmp_path):
    kwargs = dict(solver="edm", gamma=None, seeds="0-3", s_churn=40.0)
    a = run(digits, tmp_path / "a", batch_size=1, **kwargs)
    b = run(digits, tmp_path / "b", batch_size=4, **kwargs)
    assert a["nfe"] == b["nfe"] == 7
    assert np.array_equal(np.load(tmp_path / "a" / "images.npz")["images"], np.load(tmp_path / "b" / "images.npz")["images"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=1.5), r"gamma must lie in \[0, 1\]"),
        (dict(solver="ddim", gamma=0.5), "gamma applies to the BDIA solvers only"),
        (dict(seeds="3-1"), "descending"),
        (dict(solver="dpm"), "unknown solver"),
        (dict(backward="midpoint"), "backward must be one of"),
        (dict(solver="ddim", gamma=None, backward="euler"), "has no option"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_steps=1), "num_steps >= 2"),
        (dict(class_idx=3), "needs a class-conditional model"),
        (dict(network_batch=0), "network_batch"),
        (dict(device="cuda:0" if not torch.cuda.is_available() else "tpu"), "device"),
    ],
)
def test_user_mistakes_raise_before_sampling(digits, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(digits, tmp_path, **kwargs)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "images").exists()


def test_non_image_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image_shape"):
        run(gmm_toy(dim=3), tmp_path)


# --------------------------------------------------------------------------------------------------
# Seeds, noise, quantisation, grids.


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-3", [0, 1, 2, 3]),
        ("0,5,7-9", [0, 5, 7, 8, 9]),
        (" 2 , 4 - 5 ", [2, 4, 5]),
        ("12", [12]),
        (7, [7]),
        (np.int64(7), [7]),
        ([3, 1, "5-6"], [3, 1, 5, 6]),
        ((0,), [0]),
        ("4294967295", [2**32 - 1]),
    ],
)
def test_parse_seeds(spec, expected):
    assert parse_seeds(spec) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "cannot parse"),
        ("abc", "cannot parse 'abc'"),
        ("0-", "cannot parse"),
        ("1-2-3", "cannot parse"),
        ("-5", "cannot parse"),
        ("1,,2", "cannot parse"),
        ("1.5", "cannot parse"),
        ("9-7", "descending"),
        ("1,1", "more than once"),
        ("0-3,2", "more than once"),
        (-1, "outside"),
        ("4294967296", "outside"),
        ([], "no seeds"),
        (True, "expected a seed"),
        (None, "expected a seed"),
        (2.5, "expected a seed"),
        ([[1, 2]], "nested"),
        ("0-99999999", "more than"),
    ],
)
def test_parse_seeds_rejects_malformed_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(spec)


def test_format_seeds_round_trips():
    for seeds in ([0, 1, 2, 3], [0, 5, 7, 8, 9], [9, 3, 4], [1]):
        assert parse_seeds(format_seeds(seeds)) == seeds
    assert format_seeds([0, 1, 2, 3, 7]) == "0-3,7"


def test_seed_noise_is_per_seed():
    both = seed_noise([4, 9], (1, 2, 2), sigma_max=80.0)
    assert both.dtype == torch.float64 and both.shape == (2, 1, 2, 2)
    assert torch.equal(both[1:], seed_noise([9], (1, 2, 2), sigma_max=80.0))
    expected = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(4)).to(torch.float64) * 80.0
    assert torch.equal(both[0], expected)  # EDM's latents: float32 draws from a generator seeded with the seed


def test_quantize_matches_edm_formula_on_edge_values():
    x = torch.tensor([-3.0, -1.0, -1 + 1e-12, -0.996, -0.5, 0.0, 1 / 255, 0.5, 0.999, 1.0, 1.5, 1e9], dtype=torch.float64)
    q = quantize(x)
    assert q.dtype == torch.uint8
    reference = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert q.tolist() == reference.tolist()
    assert q[[0, 1, 5, 9, 10, 11]].tolist() == [0, 0, 128, 255, 255, 255]
    assert quantize(torch.zeros(2, 1, 3, 3, dtype=torch.float32)).shape == (2, 1, 3, 3)
    with pytest.raises(TypeError):
        quantize(torch.zeros(3, dtype=torch.uint8))


def test_image_grid_layout(tmp_path):
    images = np.stack([np.full((3, 2, 2), v, dtype=np.uint8) for v in (10, 20, 30)])
    grid = image_grid(images, nrow=2)
    assert grid.shape == (4, 4, 3)
    assert grid[0, 0].tolist() == [10] * 3 and grid[0, 2].tolist() == [20] * 3 and grid[2, 0].tolist() == [30] * 3
    assert grid[2, 2].tolist() == [0] * 3  # empty cell
    path = save_image_grid(torch.from_numpy(images), tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(path) as png:
        assert png.size == (12, 4) and png.mode == "RGB"
    with pytest.raises(TypeError, match="uint8"):
        image_grid(images.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The analytic model.


def test_digits_gmm():
    den = digits_gmm()
    assert isinstance(den, bdia.GaussianMixtureDenoiser)
    assert den.means.shape == (1797, 1, 16, 16) and den.event_shape == (1, 16, 16)
    assert den.means.min() == -1 and den.means.max() <= 1
    small = digits_gmm(image_size=8, classes=[3, 8], num_components=10, interpolation="nearest")
    assert small.means.shape == (10, 1, 8, 8) and set(small.component_labels.tolist()) == {3, 8}
    with pytest.raises(ValueError, match="classes"):
        digits_gmm(classes=[10])


def test_mixture_metrics_on_exact_samples():
    den = digits_gmm(image_size=8, num_components=100, std=0.05)
    data = den.sample_data(200, generator=torch.Generator().manual_seed(3))
    metrics = mixture_metrics(den, data, chunk_size=64)
    assert metrics["nearest_mean_rms"] == pytest.approx(0.05, rel=0.05)
    assert metrics["log_prob_per_dim"] == pytest.approx(metrics["log_prob_per_dim_reference"], abs=0.05)
    assert sum(metrics["class_counts"].values()) == 200


# --------------------------------------------------------------------------------------------------
# scripts/sample.py (Hydra shell).

TINY = ["seeds=0-3", "solver.num_steps=3", "batch_size=2", "progress=false",
        "model.image_size=8", "model.num_components=40"]  # fmt: skip


def run_script(tmp_path, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_script_writes_outputs(tmp_path):
    out = tmp_path / "out"
    result = run_script(tmp_path, *TINY, "solver=ddim", f"out_dir={out}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["solver"] == "ddim" and metrics["nfe"] == 3 and metrics["num_images"] == 4
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 4
    assert (out / "config.yaml").is_file() and (out / ".bdia-run.json").is_file()
    # Hydra writes nothing of its own (no .hydra/, no log, no outputs/): the run folder is the run's alone.
    assert not (out / ".hydra").exists() and not list(out.glob("*.log")) and not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_script_reports_a_malformed_seed_spec_in_one_line(tmp_path):
    result = run_script(tmp_path, *TINY, "seeds=0-x", f"out_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: seeds: cannot parse '0-x'"), result.stderr
