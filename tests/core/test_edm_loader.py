"""The safe EDM snapshot loader, on pickles written in EDM's exact persistence format (tests/support/edm_pickle.py)."""

import time

import numpy as np
import pytest
import torch

import bdia
from bdia.download import AssetUnavailableError
from bdia.networks import EDM_CLASSES, EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from bdia.networks.loader import CACHE_SUFFIX, SnapshotError, load_edm, read_snapshot
from edm_pickle import write_edm_snapshot

TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)

CONFIGS = {
    "edm-ddpmpp-uncond": lambda: EDMPrecond(8, 3, model_type="SongUNet", augment_dim=9, **TINY_SONG, **DDPMPP),
    "edm-ddpmpp-cond": lambda: EDMPrecond(8, 3, label_dim=10, model_type="SongUNet", augment_dim=9, **TINY_SONG, **DDPMPP),
    "edm-ncsnpp-cond": lambda: EDMPrecond(8, 3, label_dim=10, model_type="SongUNet", **TINY_SONG, **NCSNPP),
    "vp-ddpmpp": lambda: VPPrecond(8, 3, model_type="SongUNet", **TINY_SONG, **DDPMPP),
    "ve-ncsnpp": lambda: VEPrecond(8, 3, model_type="SongUNet", **TINY_SONG, **NCSNPP),
    "iddpm-adm-cond": lambda: iDDPMPrecond(8, 3, label_dim=5, model_type="DhariwalUNet", **TINY_ADM),
    "edm-adm-cond": lambda: EDMPrecond(8, 3, label_dim=5, model_type="DhariwalUNet", **TINY_ADM),
}


def init_kwargs_of(module):
    return module.init_kwargs


def perturbed(net, seed=0):
    """Random non-zero values everywhere (EDM zero-initialises output layers), so outputs really test the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def snapshot(tmp_path, net, name="net.pkl", **kw):
    return write_edm_snapshot(tmp_path / name, net, set(EDM_CLASSES), init_kwargs_of, **kw)


def inputs(net, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 1.3, 20.0][:batch])
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % net.label_dim, net.label_dim).float()
    return x, sigma, labels


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_loaded_network_equals_the_original(tmp_path, config):
    original = perturbed(CONFIGS[config]())
    path = snapshot(tmp_path, original)
    loaded = load_edm(path)
    assert type(loaded) is type(original) and not loaded.training
    assert loaded.init_kwargs == original.init_kwargs
    x, sigma, labels = inputs(original)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), original(x, sigma, labels))
    assert (tmp_path / f"net.pkl{CACHE_SUFFIX}").exists()


def test_embedded_module_src_is_never_executed(tmp_path, capfd):
    path = snapshot(tmp_path, perturbed(CONFIGS["edm-ddpmpp-cond"]()))
    assert b"SECURITY: the module_src" in path.read_bytes()  # the trap is in the file...
    load_edm(path, cache=False)  # ...and loading neither raised SystemExit nor called EDM's reconstructor
    assert "pwned" not in capfd.readouterr().out


def test_snapshot_records_are_inert(tmp_path):
    data = read_snapshot(snapshot(tmp_path, CONFIGS["vp-ddpmpp"]()))
    assert set(data) >= {"ema", "loss_fn", "augment_pipe"}
    assert data["ema"].class_name == "VPPrecond" and data["ema"].state["_init_kwargs"]["model_type"] == "SongUNet"


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize(
    "payload, refused",
    [
        (b"cos\nsystem\n(S'echo pwned'\ntR.", "os.system"),
        (b"cbuiltins\neval\n(S'print(1)'\ntR.", "builtins.eval"),
        (b"csubprocess\nPopen\n(S'true'\ntR.", "subprocess.Popen"),
        (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),
    ],
)
def test_dangerous_globals_are_refused(tmp_path, payload, refused):
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(SnapshotError, match=f"refused to load global '{refused}'"):
        load_edm(path)
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}*"))


def test_dangerous_global_hidden_in_a_valid_snapshot_is_refused(tmp_path):
    net = CONFIGS["edm-ddpmpp-uncond"]()
    path = snapshot(tmp_path, net, extra={"dataset_kwargs": {"hook": _Evil(eval, "__import__('os').system('echo pwned')")}})
    with pytest.raises(SnapshotError, match="refused to load global 'builtins.eval'"):
        load_edm(path)
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}*"))


def test_truncated_snapshot_gives_a_clear_error_and_no_cache(tmp_path):
    path = snapshot(tmp_path, CONFIGS["edm-ddpmpp-cond"]())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        load_edm(path)
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}*"))


def test_unknown_class_name_is_refused(tmp_path):
    path = snapshot(tmp_path, CONFIGS["edm-ddpmpp-uncond"]())
    path.write_bytes(path.read_bytes().replace(b"EDMPrecond", b"MysteryNet"))  # same length: a valid pickle
    with pytest.raises(SnapshotError, match="unknown EDM class name 'MysteryNet'"):
        load_edm(path)
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}*"))


def test_tampered_tensor_shapes_are_refused(tmp_path):
    net = CONFIGS["edm-ddpmpp-uncond"]()
    layer = net.model.map_layer0
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape[0], layer.weight.shape[1] + 1))
    with pytest.raises(SnapshotError, match="do not fit"):
        load_edm(snapshot(tmp_path, net))
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}*"))


def test_numpy_scalars_in_constructor_arguments(tmp_path):
    net = CONFIGS["edm-ddpmpp-uncond"]()
    kwargs = dict(net.init_kwargs, sigma_data=np.float64(0.5), augment_dim=np.int64(9))
    path = write_edm_snapshot(tmp_path / "np.pkl", net, set(EDM_CLASSES), lambda m: kwargs if m is net else m.init_kwargs)
    assert load_edm(path).sigma_data == 0.5


def test_conversion_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    original = perturbed(CONFIGS["edm-ncsnpp-cond"]())
    path = snapshot(tmp_path, original)
    load_edm(path)
    import bdia.networks.loader as loader

    def fail(*a, **k):
        raise AssertionError("the pickle was read although a valid cache exists")

    monkeypatch.setattr(loader, "read_snapshot", fail)
    cached = load_edm(path)
    x, sigma, labels = inputs(original)
    with torch.no_grad():
        assert torch.equal(cached(x, sigma, labels), original(x, sigma, labels))
    monkeypatch.undo()
    other = perturbed(CONFIGS["edm-ncsnpp-cond"](), seed=7)
    snapshot(tmp_path, other)  # same file name, new contents: the cache is stale
    with torch.no_grad():
        assert torch.equal(load_edm(path)(x, sigma, labels), other(x, sigma, labels))


def test_sampling_with_a_loaded_conditional_network(tmp_path):
    original = perturbed(CONFIGS["edm-ddpmpp-cond"]())
    net = load_edm(snapshot(tmp_path, original))
    sigmas = bdia.karras_sigmas(5, sigma_min=max(0.002, net.sigma_min), sigma_max=min(80.0, net.sigma_max))
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 7, 9]), 10).float()
    with torch.no_grad():
        for solver, gamma in (("edm", None), ("bdia_edm", 0.5)):
            ours = bdia.sample(net, latents * sigmas[0], sigmas, solver=solver, gamma=gamma, class_labels=labels)
            ref = bdia.sample(original, latents * sigmas[0], sigmas, solver=solver, gamma=gamma, class_labels=labels)
            assert torch.isfinite(ours).all() and torch.equal(ours, ref)
        other_labels = bdia.sample(net, latents * sigmas[0], sigmas, solver="edm", class_labels=labels.roll(1, 0))
        assert not torch.equal(other_labels, ref)


def test_registry_name_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(AssetUnavailableError) as info:
        load_edm("edm-cifar10-32x32-cond-vp")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl" in message
    # The Python API's error names load_edm's own argument, not the command line's key (models.edm_network's).
    assert str(tmp_path) in message and "source=/path/to/edm-cifar10-32x32-cond-vp.pkl" in message
    assert "model.path" not in message
