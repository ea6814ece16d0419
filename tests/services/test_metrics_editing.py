"""Editing metrics: SSIM against a direct transcription of its definition and closed forms; the CLIP edit score
and directional similarity against the same quantities computed by hand from CLIP's features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdia.metrics.reconstruction import pixel_metrics, ssim


def _ssim_by_loops(x: np.ndarray, y: np.ndarray, data_range: float, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. (2004) written out: a Gaussian-weighted window at every position where it fits."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[c, i : i + size, j : j + size], y[c, i : i + size, j : j + size]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_equals_its_definition_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 14, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    got = ssim(x, y, data_range=2.0)
    for n in range(2):
        assert got[n].item() == pytest.approx(_ssim_by_loops(x[n].numpy(), y[n].numpy(), 2.0), rel=1e-10)
    assert torch.allclose(ssim(x, x, data_range=2.0), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    # Constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, -0.4, (0.01 * 2) ** 2
    const = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b), data_range=2.0).item()
    assert const == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-9)
    assert got.min() < 0.9  # noise lowers it
    with pytest.raises(ValueError, match="ssim needs two"):
        ssim(x, y[:, :2], data_range=2.0)


def test_pixel_metrics_report_ssim_with_psnr():
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    y = x + 0.1
    m = pixel_metrics(x, y)
    assert m["psnr"] == pytest.approx(10 * math.log10(4 / 0.01)) and 0 < m["ssim"] < 1
    assert m["ssim_per_image"] == [pytest.approx(m["ssim"])]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from bdia.metrics.clip_score import load_clip
    from bdia.testing import build_tiny_clip

    return load_clip(str(build_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32)))


def test_clip_edit_metrics_equal_the_features_computed_by_hand(tiny_clip):
    from bdia.metrics.clip_score import clip_edit_metrics

    model, processor = tiny_clip
    g = torch.Generator().manual_seed(1)
    original = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    edited = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    got = clip_edit_metrics(model, processor, original, edited, "a photo of a cat", "a painting of a cat")

    def unit(v):
        v = getattr(v, "pooler_output", v).double()
        return v / v.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        images = processor(images=[*original, *edited], return_tensors="pt")["pixel_values"]
        feats = unit(model.get_image_features(pixel_values=images))
        text = processor(text=["a photo of a cat", "a painting of a cat"], return_tensors="pt", padding=True)
        t = unit(model.get_text_features(**text))
    i_orig, i_edit = feats[:2], feats[2:]
    # One batch of four images here, two batches of two in the metric: the float32 network may round a row
    # differently with the batch shape (~1e-7 relative); the formulas themselves are exact.
    assert got["clip_score_edit"] == pytest.approx(float((100 * i_edit @ t[1]).mean()), rel=1e-5)
    di, dt = i_edit - i_orig, t[1] - t[0]
    expected = float(((di @ dt) / (di.norm(dim=-1) * dt.norm())).mean())
    assert got["clip_directional_similarity"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert -1 <= expected <= 1
    same = clip_edit_metrics(model, processor, original, original, "a photo of a cat", "a painting of a cat")
    assert same["clip_directional_similarity"] == 0.0  # no change in the image: no direction


# --------------------------------------------------------------------------------------------------
# LPIPS: the lpips package with its backbone read from a local file.


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """torchvision's AlexNet state dict with random weights (the real ones are a download)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_loads_the_backbone_from_a_local_file_into_the_packages_slices(alexnet_file):
    """Against the lpips package wired by hand: torchvision's AlexNet with the same weights, its feature layers
    put into the package's slices by index."""
    import lpips
    import torchvision

    from bdia.metrics.lpips import LPIPS

    ours = LPIPS("alex", weights=alexnet_file)
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.load_state_dict(torch.load(alexnet_file, weights_only=True))
    for slice_ in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4,
                   reference.net.slice5):
        for name in list(slice_._modules):
            slice_._modules[name] = alexnet.features[int(name)]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten().double()
    assert torch.allclose(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(ours(x, x), torch.zeros(3, dtype=torch.float64))
    assert (ours(x, y) > 0).all() and torch.allclose(ours(x, y), ours(y, x), rtol=1e-5)


def test_lpips_offline_without_weights_fails_at_once_naming_url_cache_and_key(tmp_path, monkeypatch):
    import time

    from bdia.download import AssetUnavailableError
    from bdia.metrics.lpips import BACKBONES, LPIPS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    started = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        LPIPS("alex")
    assert time.perf_counter() - started < 10.0  # no download attempt
    message = str(info.value)
    assert BACKBONES["alex"] in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "lpips_weights=" in message
    with pytest.raises(AssetUnavailableError, match="no such file"):
        LPIPS("alex", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("squeeze")
    bad = tmp_path / "not_alexnet.pth"
    torch.save({"classifier.0.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not torchvision's alex"):
        LPIPS("alex", weights=bad)
