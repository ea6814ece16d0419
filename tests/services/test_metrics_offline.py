"""Offline behaviour of every downloadable metric asset: fail at once with the URL, the cache path and the config
key for a local file; a local file given through that key is used."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bdia.download import AssetUnavailableError
from bdia.metrics import FID, load_reference
from bdia.metrics.features import (
    CLEAN_FID_INCEPTION_URL,
    TORCH_FIDELITY_INCEPTION_URL,
    CleanFIDInception,
    TorchFidelityInception,
    resolve_inception_weights,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path / "bdia-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return tmp_path


@pytest.mark.parametrize("backend, url, cache", [
    ("torch_fidelity", TORCH_FIDELITY_INCEPTION_URL, "torch-home/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth"),
    ("clean_fid", CLEAN_FID_INCEPTION_URL, "bdia-cache/inception/inception-2015-12-05.pt"),
])
def test_inception_weights_offline_fail_at_once_naming_url_cache_and_key(offline_caches, backend, url, cache):
    started = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        resolve_inception_weights(backend)
    assert time.perf_counter() - started < 10.0  # at once: no download attempt or retry loop (tens of s)
    message = str(info.value)
    assert url in message and str(offline_caches / cache) in message
    assert "metrics.fid.weights=" in message and "offline" in message
    with pytest.raises(AssetUnavailableError, match="no such file"):
        resolve_inception_weights(backend, offline_caches / "missing.pth")


def test_edm_reference_statistics_offline_fail_at_once(offline_caches):
    with pytest.raises(AssetUnavailableError) as info:
        load_reference("cifar10-32x32")
    message = str(info.value)
    assert "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz" in message
    assert str(offline_caches / "bdia-cache" / "fid-refs" / "cifar10-32x32.npz") in message
    assert "metrics.fid.ref=" in message


def test_edm_reference_statistics_from_the_cache_and_local_files(offline_caches):
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(5), rng.standard_normal((5, 5))
    cached = offline_caches / "bdia-cache" / "fid-refs" / "cifar10-32x32.npz"
    cached.parent.mkdir(parents=True)
    np.savez(cached, mu=mu, sigma=a @ a.T)  # EDM's format: mu, sigma
    for spec in ("cifar10", "cifar10-32x32", "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz", str(cached)):
        ref = load_reference(spec)
        np.testing.assert_array_equal(ref.mu, mu)
        assert len(ref.sha256) == 64
    with pytest.raises(AssetUnavailableError, match="no such file"):
        load_reference(str(offline_caches / "nope.npz"))
    with pytest.raises(ValueError, match="unknown reference"):
        load_reference("cifar11")


def test_clip_weights_offline_fail_at_once(offline_caches):
    from bdia.download import hub_cache_path
    from bdia.metrics.clip_score import load_clip

    cache = hub_cache_path("openai/clip-vit-large-patch14")  # huggingface_hub fixes its cache dir at import
    if cache.exists():
        pytest.skip(f"the model is in this machine's Hugging Face cache ({cache})")
    from transformers import CLIPModel, CLIPProcessor  # noqa: F401  (imported first: time only the load attempt)

    started = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        load_clip("openai/clip-vit-large-patch14")
    assert time.perf_counter() - started < 15.0  # no retry loop (huggingface_hub's would take far longer)
    message = str(info.value)
    assert "https://huggingface.co/openai/clip-vit-large-patch14" in message
    assert str(cache) in message
    assert "metrics.clip.path=" in message
    with pytest.raises(AssetUnavailableError, match="no such folder"):
        load_clip(str(offline_caches / "no-clip-here"))


def test_evaluate_cli_offline_fid_is_one_line_naming_the_key(offline_caches):
    run = offline_caches / "run"
    run.mkdir()
    np.savez(run / "images.npz", images=np.zeros((4, 3, 8, 8), np.uint8), seeds=np.arange(4))
    (run / "metrics.json").write_text("{}")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"run_dir={run}", "metrics=fid",
                             "metrics.fid.ref=cifar10-32x32"], cwd=offline_caches, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert TORCH_FIDELITY_INCEPTION_URL in lines[0] and "metrics.fid.weights=" in lines[0]
    assert time.perf_counter() - started < 60


# --------------------------------------------------------------------------------------------------
# Local weight files are honoured (random weights with the real layouts; nothing is downloaded).


def test_torch_fidelity_inception_uses_a_local_weights_file(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # A state dict with the real layout: build the network once without loading anything.
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "my-inception.pth"
    torch.save(net.state_dict(), weights)
    del net

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("tried to download instead of using the local file"))
    extractor = TorchFidelityInception(weights=weights)
    assert extractor.weights_path == str(weights)
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()

    bad = tmp_path / "not-a-state-dict.pth"
    bad.write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    with pytest.raises(AssetUnavailableError, match="plain PyTorch state dict"):
        TorchFidelityInception(weights=bad)


class _FakeTorchScriptInception(torch.nn.Module):
    """The interface clean-fid's InceptionV3W uses: ``layers`` and ``forward(x, return_features)``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 1), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = False):
        return self.layers((x - 128) / 128)


@pytest.mark.parametrize("name", ["inception-2015-12-05.pt", "my-local-inception.pt"])
def test_clean_fid_inception_uses_a_local_weights_file(tmp_path, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / name
    torch.jit.script(_FakeTorchScriptInception()).save(str(path))
    extractor = CleanFIDInception(weights=path)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert extractor(images).shape == (3, 2048)

    # Through the metric, with metrics.fid.weights and a folder reference: nothing is fetched.
    ref = tmp_path / "ref"
    ref.mkdir()
    np.savez(ref / "images.npz", images=torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8).numpy())
    fid = FID(backend="clean_fid", weights=str(path), ref=str(ref), device="cpu", progress=False)
    out = fid(images.numpy())
    assert out["fid"] >= 0 and out["feature_extractor"]["weights"] == str(path)
    assert out["backend"] == "clean_fid" and out["mode"] == "legacy_tensorflow"

    not_torchscript = tmp_path / "garbage.pt"
    not_torchscript.write_bytes(b"garbage")
    with pytest.raises(AssetUnavailableError, match="TorchScript"):
        CleanFIDInception(weights=not_torchscript)


def test_fid_ref_cifar10_offline_is_one_line_naming_url_path_and_key(offline_caches):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    root = offline_caches / "data"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "fid_ref.py"), "source=cifar10", f"root={root}"],
                            cwd=offline_caches, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR-10"), result.stderr
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in lines[0]
    assert str(root / "cifar-10-batches-py") in lines[0] and "root=" in lines[0]
