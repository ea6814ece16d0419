"""The sampling app at run time: torchrun sharding, bit-identical images, resume after a kill, EDM's labels,
saved states that invert, and one-line errors for user mistakes."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bdia
from app_helpers import REPO, SCRIPT, TINY_GMM, cli, compose, hydra_configs, run_script, subprocess_env, write_tiny_edm
from bdia.analytic import digits_gmm
from bdia.apps.cli import one_line, preflight
from bdia.apps.sample import sample_from_config
from bdia.distributed import DistContext, context_from_env, shard
from bdia.networks import load_edm
from bdia.denoisers import FixedBatchDenoiser
from bdia.apps.sample import StackedRandomGenerator, class_labels_for, sample_run, seeds_done


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cond(tmp_path_factory):
    return write_tiny_edm(tmp_path_factory.mktemp("nets") / "cond.pkl", label_dim=10)


def assert_same_outputs(a, b):
    x, y = np.load(a / "images.npz"), np.load(b / "images.npz")
    assert sorted(x.files) == sorted(y.files)
    for key in x.files:
        assert np.array_equal(x[key], y[key]), key
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == sorted(p.name for p in (b / "images").iterdir())
    assert all(filecmp.cmp(a / "images" / n, b / "images" / n, shallow=False) for n in names)


# --------------------------------------------------------------------------------------------------
# Per-image determinism: labels, fixed network batches, torchrun.


def test_class_labels_follow_edm_generate_py():
    seeds, shape, label_dim = [0, 7, 12], (3, 4, 4), 10
    rng = StackedRandomGenerator(seeds)
    latents = rng.randn(shape)
    indices, one_hot = class_labels_for(rng, label_dim)
    for k, seed in enumerate(seeds):  # EDM: per image, randn(latents) then randint(label_dim) from the same generator
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(latents[k], torch.randn(shape, generator=g).double())
        assert indices[k] == torch.randint(label_dim, size=(), generator=g)
    assert torch.equal(one_hot, torch.eye(label_dim)[indices]) and one_hot.dtype == torch.float32
    fixed, fixed_hot = class_labels_for(StackedRandomGenerator(seeds), label_dim, class_idx=4)
    assert fixed.tolist() == [4, 4, 4] and fixed_hot.argmax(1).tolist() == [4, 4, 4]
    assert class_labels_for(rng, 0) == (None, None)


def test_fixed_network_batch_makes_a_float32_network_batch_invariant(tiny_cond):
    net = load_edm(tiny_cond)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = torch.eye(10)[torch.tensor([1, 4, 2, 8, 5])]
    sigma = torch.tensor(2.5, dtype=torch.float64)
    fixed = FixedBatchDenoiser(net, 4)
    whole = fixed(x, sigma, labels)
    rows = torch.cat([fixed(x[k : k + 1], sigma, labels[k : k + 1]) for k in range(5)])
    assert torch.equal(whole, rows)  # the padded calls see the same shapes, so the same rounding
    assert torch.allclose(whole, net(x, sigma, labels), atol=1e-5)  # and the same function
    assert fixed.sigma_min == net.sigma_min and fixed.round_sigma(1.0) == net.round_sigma(1.0)


def test_distributed_context_and_sharding():
    assert context_from_env({}) == DistContext()
    ctx = context_from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (1, 3, False)
    seeds = list(range(10))
    parts = [shard(seeds, DistContext(r, 3, r)) for r in range(3)]
    assert parts[1] == [1, 4, 7] and sorted(sum(parts, [])) == seeds
    with pytest.raises(ValueError, match="inconsistent"):
        context_from_env({"RANK": "3", "WORLD_SIZE": "2"})


def test_torchrun_two_cpu_processes_match_one_process_bit_for_bit(tmp_path, tiny_cond):
    """torchrun --nproc_per_node=2 (gloo) vs one process with another batch size: same PNG bytes, same arrays."""
    common = ["dataset=cifar10", f"model.path={tiny_cond}", "seeds=0-6", "solver.num_steps=3", "network_batch=3",
              "save_states=true", "device=cpu", "progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "launcher=torchrun", "batch_size=2", f"out_dir={tmp_path / 'torchrun'}", *common]
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with hydra_configs():
        cfg = compose(*common, "batch_size=5", f"out_dir={tmp_path / 'single'}")
    single = sample_from_config(cfg)
    assert_same_outputs(tmp_path / "torchrun", tmp_path / "single")
    sharded = json.loads((tmp_path / "torchrun" / "metrics.json").read_text())
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["nfe"] == single["nfe"] == 5 and sharded["num_images"] == 7
    data = np.load(tmp_path / "single" / "images.npz")
    assert data["class_labels"].shape == (7,) and data["x_end"].shape == data["x_inner"].shape == (7, 3, 8, 8)


# --------------------------------------------------------------------------------------------------
# Resume.


def test_resume_after_a_failure_midway_completes_the_remaining_seeds(tmp_path, monkeypatch):
    den = digits_gmm(image_size=8, num_components=40)
    kwargs = dict(solver="bdia_edm", gamma=0.5, num_steps=3, seeds="0-9", batch_size=2, progress=False)
    run = tmp_path / "run"
    sample_run(den, out_dir=run, **{**kwargs, "seeds": "0-3"})  # an earlier, finished run with fewer seeds
    assert (run / "metrics.json").is_file()
    import bdia.apps.driver as driver_module

    original, written = driver_module.write_item, []

    def failing(out_dir, name, image, record):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")  # as if the process died in the second batch
        written.append(int(name))
        original(out_dir, name, image, record)

    monkeypatch.setattr(driver_module, "write_item", failing)
    with pytest.raises(KeyboardInterrupt):
        sample_run(den, out_dir=run, **kwargs)
    monkeypatch.setattr(driver_module, "write_item", original)
    assert written == [4, 5, 6]
    # Not mistaken for finished: the marker says the extension is still running, while the earlier run's
    # end-of-run files stay as they were, describing the 4 images they were built from.
    assert json.loads((run / ".bdia-run.json").read_text())["state"] == "running"
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 4
    with np.load(run / "images.npz") as data:
        assert data["seeds"].tolist() == [0, 1, 2, 3]
    assert seeds_done(run, range(10)) == [0, 1, 2, 3, 4, 5, 6]
    (run / "images" / ".000007.png.tmp-99999").write_bytes(b"\x89PNG half")  # a killed write

    metrics = sample_run(den, out_dir=run, **kwargs)
    assert metrics["num_resumed"] == 7 and metrics["num_sampled"] == 3 and metrics["num_images"] == 10
    assert json.loads((run / ".bdia-run.json").read_text())["state"] == "complete"
    assert not [p for p in (run / "images").iterdir() if p.name.startswith(".")]
    sample_run(den, out_dir=tmp_path / "fresh", **{**kwargs, "batch_size": 3})
    assert_same_outputs(run, tmp_path / "fresh")


def test_killed_run_resumes_and_damaged_files_are_not_trusted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["seeds=0-199", "batch_size=1", "solver.num_steps=2", *TINY_GMM, "progress=false", f"out_dir={out}"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # generous: a busy machine starts Python slowly
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "records").is_dir() and len(os.listdir(out / "records")) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / "metrics.json").exists()
    done = seeds_done(out, range(200))
    assert 4 <= len(done) < 200
    # Damage two finished seeds, as a crash before the disk caught up could: neither may be trusted.
    (out / "images" / f"{done[0]:06d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (out / "records" / f"{done[1]:06d}.npz").write_bytes(b"PK\x03\x04 truncated")
    (out / "records" / ".000199.npz.tmp-12345").write_bytes(b"partial")

    assert cli(monkeypatch, tmp_path, *args) is None  # the same command again
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 200 and metrics["num_resumed"] >= len(done) - 2
    assert metrics["num_sampled"] == 200 - metrics["num_resumed"]
    assert not [p for p in (out / "records").iterdir() if p.name.startswith(".")]
    assert cli(monkeypatch, tmp_path, *args[:-1], f"out_dir={tmp_path / 'fresh'}", "batch_size=64") is None
    assert_same_outputs(out, tmp_path / "fresh")


# --------------------------------------------------------------------------------------------------
# Saved states invert.


def test_saved_states_hold_the_bdia_pair_that_inverts_the_run(tmp_path):
    with hydra_configs():
        cfg = compose(*TINY_GMM, "seeds=0-2", "solver.num_steps=6", "solver.gamma=0.9", "save_states=true",
                      "progress=false", f"out_dir={tmp_path}")
    sample_from_config(cfg)
    data = np.load(tmp_path / "images.npz")
    den = digits_gmm(image_size=8, num_components=40)
    sigmas = torch.from_numpy(data["sigmas"])
    pair = (torch.from_numpy(data["x_end"]), torch.from_numpy(data["x_inner"]))
    noise_pair = bdia.invert(den, pair, sigmas, solver="bdia_edm", gamma=0.9)
    expected = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]).double() * 80
    assert (noise_pair.x_end - expected).abs().max() < 1e-9  # back to each seed's own latents
    assert np.array_equal(data["images"], bdia.apps.sample.quantize(pair[0]).numpy())


# --------------------------------------------------------------------------------------------------
# User mistakes: one line, non-zero exit, no traceback.


@pytest.mark.parametrize(
    "args, expected",
    [
        (["solver=foo"], "error: unknown solver 'foo' (solver=foo); choose one of: bdia_ddim, bdia_edm, ddim, dpmpp_2m, edm, ipndm, rex, unipc"),
        (["dataset=mnist"], "error: unknown dataset 'mnist' (dataset=mnist); choose one of: afhqv2, cifar10, digits"),
        (["model=edm-cifar11"], "error: unknown model 'edm-cifar11' (model=edm-cifar11); choose one of: baseline-"),
        (["-m", "solver=edm,dpm"], "error: unknown solver 'dpm'"),
        (["experiment=table9"], "error: unknown experiment 'table9'"),
        (["solver.gama=0.5"], "error: Could not override 'solver.gama'"),
        (["seeds=0-x"], "error: seeds: cannot parse '0-x'"),
        (["solver.gamma=1.5"], "error: gamma must lie in [0, 1]"),
        (["dataset=cifar10", "model.path=/no/such/edm.pkl"], "error: model.path=/no/such/edm.pkl is not available: no such file."),
        (["dataset=digits", "model.path=/no/such.safetensors"], "error: model.path=/no/such.safetensors is not available: no such file."),
        (["class_idx=3"], "error: class_idx=3 needs a class-conditional model"),
        (["launcher=torchrun"], "error: distributed=required (launcher=torchrun) but this process was not started by torchrun"),
        (["model.stdd=0.1"], "error: Could not override 'model.stdd'"),
    ],
)
def test_user_mistakes_end_in_one_line(args, expected, tmp_path, monkeypatch, capsys):
    tiny = [] if any(a.startswith(("dataset=", "model=")) for a in args) else TINY_GMM
    code = cli(monkeypatch, tmp_path, *tiny, "seeds=0-1", "progress=false", f"out_dir={tmp_path / 'out'}", *args)
    captured = capsys.readouterr()
    assert isinstance(code, str) and "\n" not in code and code.startswith(expected), code
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_unreachable_url_ends_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("BDIA_OFFLINE", raising=False)
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BDIA_DOWNLOAD_TIMEOUT", "3")
    start = time.monotonic()
    code = cli(monkeypatch, tmp_path, "dataset=cifar10", "model.path=http://127.0.0.1:9/edm.pkl", f"out_dir={tmp_path / 'o'}")
    assert time.monotonic() - start < 20
    assert isinstance(code, str) and "\n" not in code
    assert code.startswith("error: checkpoint 'edm.pkl' is not available: cannot reach the server") and "model.path=" in code


def test_offline_cifar10_names_the_checkpoint_url_and_model_path(tmp_path):
    """The headline command on a machine without the checkpoint: one line naming URL, cache path and model.path."""
    result = run_script(tmp_path, "solver=bdia_edm", "dataset=cifar10", env=subprocess_env(BDIA_CACHE=str(tmp_path / "cache")))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    line = lines[0]
    assert line.startswith("error: EDM checkpoint 'edm-cifar10-32x32-cond-vp' is not available: offline mode")
    assert "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl" in line
    assert str(tmp_path / "cache" / "edm" / "edm-cifar10-32x32-cond-vp.pkl") in line and "model.path=" in line
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("metrics.json"))


def test_preflight_and_one_line():
    assert preflight(["solver=edm", "seeds=0-3"]) is None
    assert preflight(["--cfg", "job"]) is None  # Hydra's own flags are left to Hydra
    assert preflight(["-m", "solver=edm,bdia_edm", "solver.num_steps=4,8"]) is None
    assert preflight(["seeds=[1,"]).startswith("cannot parse the command line")
    assert one_line("a\n  b    c\n\n d") == "a | b c | d"
    assert (REPO / "configs" / "image_metrics" / "metrics" / "none.yaml").is_file()


def test_offline_fid_weights_fail_before_any_image_is_drawn(tmp_path):
    """metrics=fid fetches the Inception weights when the metric is built, so offline it stops at once."""
    result = run_script(tmp_path, "dataset=gmm", "seeds=0-3", "solver.num_steps=3", "metrics=fid",
                        f"out_dir={tmp_path / 'run'}", env=subprocess_env(BDIA_CACHE=str(tmp_path / "cache")))
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.strip().startswith("error:") and "metrics.fid.weights" in result.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_network_batch_auto_pads_a_small_run_only_to_its_own_batch(tmp_path, tiny_cond):
    """network_batch=auto (the default) is min(64, number of seeds): an 8-image run calls the network on 8 rows,
    not 64, whatever its batch_size; the images equal an explicit network_batch of 8, and a rerun with another
    batch_size resumes them."""
    net = load_edm(tiny_cond)
    rows = []

    class Rows(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.sigma_min, self.sigma_max, self.round_sigma = inner.sigma_min, inner.sigma_max, inner.round_sigma
            self.img_resolution, self.img_channels, self.label_dim = inner.img_resolution, inner.img_channels, inner.label_dim

        def forward(self, x, sigma, class_labels=None, **cond):
            rows.append(x.shape[0])
            return self.inner(x, sigma, class_labels, **cond)

    kwargs = dict(solver="edm", num_steps=3, seeds="0-7", progress=False, device="cpu")
    metrics = sample_run(Rows(net), out_dir=tmp_path / "auto", **kwargs)
    assert metrics["network_batch"] == 8 and set(rows) == {8}  # 64 before: 56 padded rows per call
    explicit = sample_run(net, out_dir=tmp_path / "explicit", network_batch=8, batch_size=3, **kwargs)
    assert explicit["network_batch"] == 8
    assert_same_outputs(tmp_path / "auto", tmp_path / "explicit")
    assert sample_run(net, out_dir=tmp_path / "auto", batch_size=4, **kwargs)["num_resumed"] == 8
    with pytest.raises(ValueError, match="network_batch: 8 there, 5 now"):
        sample_run(net, out_dir=tmp_path / "auto", network_batch=5, **kwargs)


# --------------------------------------------------------------------------------------------------
# Speed options (bdia.speed) through the sampling app.


def test_reduced_precision_run_is_recorded_and_batch_invariant(tiny_cond, tmp_path):
    net = load_edm(tiny_cond)
    common = dict(solver="bdia_edm", num_steps=4, seeds="0-4", device="cpu", progress=False, network_batch=4)
    plain = sample_run(net, out_dir=tmp_path / "f32", batch_size=5, **common)
    assert "speed" not in json.loads((tmp_path / "f32" / "settings.json").read_text())  # old run folders still resume
    assert plain["speed"] == {"precision": "float32", "channels_last": False, "compile": None}
    whole = sample_run(net, out_dir=tmp_path / "bf16_whole", batch_size=5, precision="bf16", **common)
    sample_run(net, out_dir=tmp_path / "bf16_single", batch_size=1, precision="bf16", **common)
    assert json.loads((tmp_path / "bf16_whole" / "settings.json").read_text())["speed"]["precision"] == "bf16"
    assert whole["speed"]["precision"] == "bf16"
    assert_same_outputs(tmp_path / "bf16_whole", tmp_path / "bf16_single")  # fixed rows: batch-size invariant
    a = np.load(tmp_path / "f32" / "images.npz")["images"].astype(int)
    b = np.load(tmp_path / "bf16_whole" / "images.npz")["images"].astype(int)
    assert 0 < np.abs(a - b).max() < 64  # bf16 changes the low bits of the images, not the images
    with pytest.raises(ValueError, match="settings"):  # a rerun with another precision is another run
        sample_run(net, out_dir=tmp_path / "f32", batch_size=5, precision="bf16", **common)


def test_auto_batch_size_changes_nothing_in_the_images(tiny_cond, tmp_path):
    net = load_edm(tiny_cond)
    common = dict(solver="edm", num_steps=3, seeds="0-5", device="cpu", progress=False)
    auto = sample_run(net, out_dir=tmp_path / "auto", batch_size="auto", **common)
    assert auto["batch_size"] in (1, 2, 4)  # a power of two, at most the 6 images of this run
    sample_run(net, out_dir=tmp_path / "fixed", batch_size=3, **common)
    assert_same_outputs(tmp_path / "auto", tmp_path / "fixed")


@pytest.mark.parametrize("bad, message", [
    (dict(precision="int8"), "precision must be one of"),
    (dict(channels_last="yes"), "channels_last must be true or false"),
    (dict(compile="fastest"), "compile must be null or one of"),
    (dict(batch_size="big"), "batch_size must be a positive integer"),
])
def test_bad_speed_options_are_refused_before_sampling(tiny_cond, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        sample_run(load_edm(tiny_cond), num_steps=3, seeds="0", out_dir=tmp_path / "run", progress=False, **bad)
    assert not (tmp_path / "run").exists()
