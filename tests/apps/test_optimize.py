"""The noise-optimisation app (bdia.apps.optimize, scripts/optimize.py): the loss terms against closed forms, a small
run end to end, resume (bit-identical to an uninterrupted run, refusing other settings), one-line errors, and the
Stable Diffusion CLIP-score pipeline check on the tiny random SD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app_helpers import REPO, cli
from bdia.apps.optimize import classifier_loss, gaussian_prior, optimize_clip_score, optimize_run

SCRIPT = REPO / "scripts" / "optimize.py"
SMALL = dict(seeds="0-3", num_steps=4, iterations=2, progress=False)


@pytest.fixture(scope="module")
def digits():
    from bdia.metrics.digits_classifier import load_digits_classifier
    from bdia.models import digits_network

    return digits_network(), load_digits_classifier()


def test_gaussian_prior_is_the_chi_negative_log_density_shifted_to_zero_at_its_mode():
    d = 256
    g = torch.Generator().manual_seed(0)
    n = torch.randn(5, 1, 16, 16, generator=g, dtype=torch.float64) * torch.tensor([0.5, 0.9, 1.0, 1.1, 2.0]).reshape(
        -1, 1, 1, 1).double()
    r = n.flatten(1).norm(dim=1)

    def chi_logpdf(x):  # log of x^(d-1) exp(-x^2/2) / (2^(d/2-1) Gamma(d/2))
        return (d - 1) * torch.log(x) - x**2 / 2 - (d / 2 - 1) * math.log(2) - math.lgamma(d / 2)

    mode = torch.tensor(math.sqrt(d - 1), dtype=torch.float64)
    torch.testing.assert_close(gaussian_prior(n), chi_logpdf(mode) - chi_logpdf(r), rtol=1e-12, atol=1e-9)
    at_mode = (torch.ones(1, 1, 16, 16, dtype=torch.float64) * math.sqrt((d - 1) / d)).requires_grad_(True)
    value = gaussian_prior(at_mode)
    value.sum().backward()
    assert abs(float(value.detach())) < 1e-9 and float(at_mode.grad.abs().max()) < 1e-12


def test_classifier_loss_is_cross_entropy(digits):
    _, classifier = digits
    images = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    expected = F.cross_entropy(classifier(images.float()).double(), torch.full((3,), 7), reduction="none")
    torch.testing.assert_close(classifier_loss(classifier, 7)(images), expected)


def test_small_run_writes_its_folder_and_raises_the_target_share(tmp_path, digits, one_thread):
    net, classifier = digits
    out = tmp_path / "run"
    metrics = optimize_run(net, classifier, target_class=3, seeds="0-7", num_steps=5, iterations=3, out_dir=out,
                           progress=False)
    for name in ("before.png", "after.png", "before_after.png", "loss.png", "metrics.json", "images.npz",
                 "history.jsonl", "state.npz", "settings.json", "env.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy_after"] == metrics["accuracy_after"] and saved["nfe"] == 9
    assert saved["network_calls_per_iteration"] == 18  # forward 9 + the backward pass's recomputation 9
    assert saved["max_recovery_error"] < 1e-10
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["loss"] < rows[0]["loss"]
    assert metrics["accuracy_after"] > metrics["accuracy_before"]
    with np.load(out / "images.npz") as data:
        assert data["before"].shape == data["after"].shape == (8, 1, 16, 16) and data["before"].dtype == np.uint8
        # "before" is the plain BDIA-EDM sample of the seeds' noise
        import bdia

        sigmas = bdia.karras_sigmas(5, 0.002, 80.0)
        plain = bdia.sample(net, torch.as_tensor(data["noise_before"]) * sigmas[0], sigmas, solver="bdia_edm")
        assert np.array_equal(bdia.imageio.quantize(plain.float()).numpy(), data["before"])


def test_resume_continues_bit_for_bit_and_refuses_other_settings(tmp_path, digits, one_thread):
    net, classifier = digits
    straight = optimize_run(net, classifier, **SMALL, out_dir=tmp_path / "straight")
    first = dict(SMALL, iterations=1)
    optimize_run(net, classifier, **first, out_dir=tmp_path / "resumed")
    resumed = optimize_run(net, classifier, **SMALL, out_dir=tmp_path / "resumed")
    assert resumed["iterations_this_session"] == 1
    with np.load(tmp_path / "straight" / "images.npz") as a, np.load(tmp_path / "resumed" / "images.npz") as b:
        assert np.array_equal(a["noise_after"], b["noise_after"]) and np.array_equal(a["after"], b["after"])
    assert resumed["accuracy_after"] == straight["accuracy_after"]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir()}
    with pytest.raises(ValueError, match="other settings"):
        optimize_run(net, classifier, **dict(SMALL, lr=0.2), out_dir=tmp_path / "resumed")
    with pytest.raises(ValueError, match="already holds 2 iterations"):
        optimize_run(net, classifier, **dict(SMALL, iterations=1), out_dir=tmp_path / "resumed")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir()} == before
    fresh = optimize_run(net, classifier, **dict(SMALL, lr=0.2), out_dir=tmp_path / "resumed", resume=False)
    assert fresh["iterations_this_session"] == 2


def test_checkpoint_backprop_gives_the_same_run(tmp_path, digits, one_thread):
    net, classifier = digits
    a = optimize_run(net, classifier, **SMALL, out_dir=tmp_path / "a")
    b = optimize_run(net, classifier, **SMALL, backprop="checkpoint", out_dir=tmp_path / "b")
    with np.load(tmp_path / "a" / "images.npz") as x, np.load(tmp_path / "b" / "images.npz") as y:
        assert np.abs(x["noise_after"] - y["noise_after"]).max() < 1e-9  # gradients equal up to float64 round-off
    assert b["network_calls_per_iteration"] == 2 * a["nfe"]


@pytest.mark.parametrize("args,message", [
    (["target_class=12"], "target_class must be an integer in 0..9"),
    (["solver=edm"], "backprop=reversible needs a BDIA solver"),
    (["lr=0"], "lr must be a finite number in (0"),
    (["seeds=5-1"], "seeds"),
    (["backprop=adjoint"], "backprop must be one of"),
])
def test_script_mistakes_end_in_one_line(tmp_path, monkeypatch, args, message):
    code = cli(monkeypatch, tmp_path, *args, f"out_dir={tmp_path / 'run'}", script=SCRIPT)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code and message in code, code
    assert not (tmp_path / "run").exists()


def test_script_refuses_a_foreign_out_dir_and_a_missing_model_in_one_line(tmp_path, monkeypatch):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    code = cli(monkeypatch, tmp_path, f"out_dir={foreign}", script=SCRIPT)
    assert code.startswith("error: ") and "not a bdia run folder" in code and "\n" not in code
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"] and (foreign / "mine.txt").read_text() == "keep me"
    code = cli(monkeypatch, tmp_path, f"model_path={tmp_path / 'missing.safetensors'}", f"out_dir={tmp_path / 'r'}",
               script=SCRIPT)
    assert code.startswith("error: model_path=") and "no such file" in code and not (tmp_path / "r").exists()


def test_script_runs_and_prints_a_summary(tmp_path, monkeypatch, capsys):
    code = cli(monkeypatch, tmp_path, "seeds=0-1", "num_steps=3", "iterations=1", "threads=1", "progress=false",
               f"out_dir={tmp_path / 'run'}", script=SCRIPT)
    assert code is None
    out = capsys.readouterr().out
    assert "optimize: 2 images, noise optimised for class 3" in out and "reads target" in out
    assert (tmp_path / "run" / "before_after.png").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_the_logger_gets_every_iteration_and_the_pictures(tmp_path, one_thread):
    from app_helpers import RecordingLogger, compose, hydra_configs

    from bdia.apps.optimize import optimize_from_config

    RecordingLogger.calls.clear()
    with hydra_configs("optimize"):
        cfg = compose("logger._target_=app_helpers.RecordingLogger", "seeds=0-1", "num_steps=3", "iterations=2",
                      "threads=1", "progress=false", f"out_dir={tmp_path / 'run'}", app="optimize")
    optimize_from_config(cfg)
    kinds = [c[0] for c in RecordingLogger.calls]
    assert kinds == ["init", "start", "log_metrics", "log_metrics", "log_metrics", "log_image", "log_image", "finish"]
    start = RecordingLogger.calls[1][1]
    assert start["group"] == "optimize" and start["config"]["target_class"] == 3
    per_iteration = [c[1] for c in RecordingLogger.calls if c[0] == "log_metrics"][:2]
    assert [m["iteration"] for m in per_iteration] == [0, 1] and all("accuracy" in m for m in per_iteration)
    assert [c[1][0] for c in RecordingLogger.calls if c[0] == "log_image"] == ["before_after", "loss"]
    assert RecordingLogger.calls[-1] == ("finish", None)


def test_clip_score_pipeline_on_tiny_sd(tiny_sd, tmp_path_factory, one_thread):
    """50 BDIA-DDIM steps of the tiny random SD, the VAE decoder and a tiny random CLIP: the reversible gradient of
    the CLIP loss equals plain autograd's (float32 networks: 1e-6), and one Adam step raises the CLIP score."""
    from bdia.metrics.clip_score import load_clip
    from bdia.testing import build_tiny_clip

    clip_model, processor = load_clip(str(build_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32)))
    grads, results = {}, {}
    for backprop in ("reversible", "autograd"):
        def capture(row, state, backprop=backprop):  # after Adam's first step, exp_avg = (1 - beta1) * gradient
            grads[backprop] = state["exp_avg"].clone() / 0.1

        results[backprop] = optimize_clip_score(tiny_sd, clip_model, processor, "a red square", seeds="0",
                                                num_steps=50, iterations=1, lr=0.02, backprop=backprop,
                                                on_iteration=capture)
    ref = grads["autograd"]
    assert ref.abs().max() > 0 and float((grads["reversible"] - ref).abs().max() / ref.abs().max()) < 1e-6
    result = results["reversible"]
    assert result["clip_after"][0] > result["clip_before"][0]  # one small step up the gradient raises the score
    assert result["rows"][0]["recovery_error"] < 1e-10
