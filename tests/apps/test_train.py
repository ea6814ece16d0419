"""EDM-style training on the embedded digits: the loss, determinism, saving and reloading."""

import math

import pytest
import torch

import bdia
from bdia.data import TEST_SIZE, digits_images
from bdia.apps.train import TrainConfig, build_network, edm_loss, load_network, save_network, train

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
            batch_size=8, total_images=64, lr_rampup_images=16, ema_halflife_images=32,
            checkpoint_every_images=32, log_every_images=16)


def test_digits_split_is_fixed_and_disjoint():
    train_images, train_labels = digits_images(16, "train")
    test_images, _ = digits_images(16, "test")
    assert len(test_images) == TEST_SIZE and len(train_images) + len(test_images) == 1797
    assert train_images.shape[1:] == (1, 16, 16) and -1 <= train_images.min() and train_images.max() <= 1
    everything, _ = digits_images(16, "all")
    flat = everything.reshape(len(everything), -1)
    # every held-out image is one of the data set's images and none is in the training split
    def index_of(x):
        return int((flat - x.reshape(1, -1)).abs().sum(1).argmin())
    assert not {index_of(x) for x in test_images[:50]} & {index_of(x) for x in train_images[:200]}
    assert set(train_labels.tolist()) == set(range(10))


def test_edm_loss_matches_its_formula():
    net = build_network(TrainConfig(**TINY), 8, 1).eval()
    y = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = edm_loss(net, y, None, -1.2, 1.2, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(4, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=g) * sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * (net(y + n, sigma.flatten()) - y) ** 2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)


def test_training_is_deterministic_and_reloads(tmp_path):
    images, _ = digits_images(8, "train")
    config = TrainConfig(**TINY)
    ema_a, rows_a = train(images[:40], config, tmp_path / "a", progress=False)
    ema_b, rows_b = train(images[:40], config, tmp_path / "b", progress=False)
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b] and all(math.isfinite(r["loss"]) for r in rows_a)
    for (name, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*.safetensors")) == [
        "checkpoint-000000032.safetensors", "checkpoint-000000064.safetensors"]
    path = save_network(ema_a, tmp_path / "net.safetensors", config)
    loaded = load_network(path)
    x, sigma = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    assert torch.equal(loaded(x, sigma), ema_a(x, sigma))
    out = bdia.sample(loaded, x * 80, bdia.karras_sigmas(3), solver="bdia_edm", gamma=0.5)
    assert torch.isfinite(out).all()


def test_ema_half_life_with_ramp_up():
    from bdia.apps.train import _ema_beta

    config = TrainConfig(ema_halflife_images=50_000, ema_rampup_ratio=0.05)
    # early on the half-life is 5% of the images seen; later the configured 50k images
    assert _ema_beta(config, 10_000, 100) == pytest.approx(0.5 ** (100 / 500))
    assert _ema_beta(config, 5_000_000, 100) == pytest.approx(0.5 ** (100 / 50_000))
