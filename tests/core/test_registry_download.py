"""EDM checkpoint registry and the downloader: facts, offline failure, and real HTTP against 127.0.0.1.

No test contacts anything but a local ``http.server`` bound to 127.0.0.1; offline tests additionally make
``urllib`` explode if it is ever asked to open a connection.
"""

import dataclasses
import hashlib
import http.server
import pickle
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bdia import download
from bdia.download import AssetUnavailableError, AssetVerificationError, fetch_file
from bdia.networks import registry
from bdia.networks.registry import checkpoint_path, resolve_checkpoint

EDM_NAMES = [
    "edm-cifar10-32x32-cond-vp", "edm-cifar10-32x32-cond-ve",
    "edm-cifar10-32x32-uncond-vp", "edm-cifar10-32x32-uncond-ve",
    "edm-ffhq-64x64-uncond-vp", "edm-ffhq-64x64-uncond-ve",
    "edm-afhqv2-64x64-uncond-vp", "edm-afhqv2-64x64-uncond-ve",
    "edm-imagenet-64x64-cond-adm",
]
BASELINE_NAMES = [
    "baseline-cifar10-32x32-uncond-vp", "baseline-cifar10-32x32-uncond-ve",
    "baseline-cifar10-32x32-cond-vp", "baseline-cifar10-32x32-cond-ve",
    "baseline-ffhq-64x64-uncond-vp", "baseline-ffhq-64x64-uncond-ve",
    "baseline-afhqv2-64x64-uncond-vp", "baseline-afhqv2-64x64-uncond-ve",
    "baseline-imagenet-64x64-cond-adm",
]


# --- registry -------------------------------------------------------------------------------------------


def test_registry_has_every_published_checkpoint():
    assert sorted(registry.CHECKPOINTS) == sorted(EDM_NAMES + BASELINE_NAMES)
    assert registry.checkpoint_names() == sorted(EDM_NAMES + BASELINE_NAMES)


@pytest.mark.parametrize("name", EDM_NAMES + BASELINE_NAMES)
def test_registry_fields_are_sane(name):
    c = registry.get_checkpoint(name)
    assert c.name == name
    assert c.url.startswith("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/") and c.url.endswith(".pkl")
    assert c.filename == name + ".pkl"
    family = name.split("-")[0]
    assert c.family == family
    assert ("/baseline/" in c.url) == (family == "baseline")
    assert c.resolution == (32 if c.dataset == "cifar10" else 64)
    assert f"{c.resolution}x{c.resolution}" in name
    assert c.channels == 3
    if "-uncond-" in name:
        assert c.label_dim == 0 and not c.conditional
    elif c.dataset == "cifar10":
        assert c.label_dim == 10
    else:
        assert c.dataset == "imagenet" and c.label_dim == 1000
    kind = name.rsplit("-", 1)[-1]
    assert c.architecture == {"vp": "ddpmpp", "ve": "ncsnpp", "adm": "adm"}[kind]
    expected_precond = "EDMPrecond" if family == "edm" else {"vp": "VPPrecond", "ve": "VEPrecond",
                                                              "adm": "iDDPMPrecond"}[kind]
    assert c.preconditioner == expected_precond
    assert c.num_steps == {"cifar10": 18, "ffhq": 40, "afhqv2": 40, "imagenet": 256}[c.dataset]
    assert c.nfe == 2 * c.num_steps - 1
    assert (c.sigma_min, c.sigma_max, c.rho) == (0.002, 80.0, 7.0)
    assert c.size_bytes is None and c.sha256 is None  # NVIDIA publishes neither; never invented
    assert c.license == "CC BY-NC-SA 4.0"
    assert c.fid_ref_url.startswith("https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/") and c.fid_ref_url.endswith(".npz")
    assert c.name_source
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_steps = 1  # type: ignore[misc]


def test_recommended_sampler_settings_follow_edm_readme():
    cifar = registry.get_checkpoint("edm-cifar10-32x32-cond-vp")
    assert cifar.deterministic and cifar.nfe == 35 and cifar.fid_reported == 1.79
    ffhq = registry.get_checkpoint("edm-ffhq-64x64-uncond-vp")
    assert ffhq.deterministic and ffhq.nfe == 79
    imagenet = registry.get_checkpoint("edm-imagenet-64x64-cond-adm")
    assert not imagenet.deterministic and imagenet.nfe == 511
    assert (imagenet.s_churn, imagenet.s_min, imagenet.s_max, imagenet.s_noise) == (40, 0.05, 50, 1.003)
    assert imagenet.sampler_kwargs()["s_churn"] == 40
    assert registry.get_checkpoint("baseline-imagenet-64x64-cond-adm").fid_ref_url.endswith("imagenet-64x64-baseline.npz")
    reported = {n for n, c in registry.CHECKPOINTS.items() if c.fid_reported is not None}
    assert reported == {"edm-cifar10-32x32-cond-vp", "edm-ffhq-64x64-uncond-vp", "edm-afhqv2-64x64-uncond-vp",
                        "edm-imagenet-64x64-cond-adm"}


def test_get_checkpoint_accepts_pkl_suffix_and_url_lookup():
    c = registry.get_checkpoint("edm-cifar10-32x32-cond-vp.pkl")
    assert registry.find_by_url(c.url) is c
    assert registry.find_by_url("https://example.invalid/x.pkl") is None


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        registry.get_checkpoint("edm-cifar100-32x32-cond-vp")
    for name in EDM_NAMES + BASELINE_NAMES:
        assert name in str(info.value)


# --- offline --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt by urllib to open a URL fail the test loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the network must not be touched in offline mode")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)


@pytest.mark.parametrize("env_var", ["HF_HUB_OFFLINE", "BDIA_OFFLINE"])
def test_offline_missing_checkpoint_fails_fast_with_one_clear_error(tmp_path, monkeypatch, no_network, env_var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("BDIA_OFFLINE", raising=False)
    monkeypatch.setenv(env_var, "1")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path / "cache"))
    name = "edm-cifar10-32x32-cond-vp"
    t0 = time.perf_counter()
    with pytest.raises(AssetUnavailableError) as info:
        resolve_checkpoint(name)
    assert time.perf_counter() - t0 < 10.0  # at once: no download attempt or retry loop (tens of s)
    message = str(info.value)
    url = registry.get_checkpoint(name).url
    cache_path = tmp_path / "cache" / "edm" / f"{name}.pkl"
    assert url in message
    assert str(cache_path) in message
    assert f"model.path=/path/to/{name}.pkl" in message
    assert env_var in message
    assert info.value.url == url and info.value.cache_path == cache_path and info.value.config_key == "model.path"
    assert info.value.__cause__ is None  # one error, not a chain of tracebacks
    assert checkpoint_path(name) == cache_path
    assert not cache_path.exists() and not (cache_path.parent / f"{name}.pkl.partial").exists()


def test_offline_uses_cached_checkpoint_without_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path))
    cached = checkpoint_path("edm-ffhq-64x64-uncond-ve")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"snapshot")
    assert resolve_checkpoint("edm-ffhq-64x64-uncond-ve") == cached


def test_custom_config_key_is_named(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("BDIA_OFFLINE", "true")
    with pytest.raises(AssetUnavailableError, match=r"edm\.checkpoint=/path/to/baseline-cifar10-32x32-uncond-vp\.pkl"):
        fetch_file(registry.get_checkpoint("baseline-cifar10-32x32-uncond-vp").url, tmp_path / "x.pkl",
                   config_key="edm.checkpoint")


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("BDIA_CACHE", raising=False)
    assert download.cache_dir() == Path.home() / ".cache" / "bdia"
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path))
    assert download.cache_dir() == tmp_path


def test_error_is_picklable():
    err = AssetVerificationError("https://h/x.pkl", "/c/x.pkl", "model.path", reason="bad")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is AssetVerificationError and str(clone) == str(err)


# --- resolve_checkpoint: local paths and names ----------------------------------------------------------


def test_resolve_existing_local_path(tmp_path, no_network):
    f = tmp_path / "my-net.pkl"
    f.write_bytes(b"x")
    assert resolve_checkpoint(f) == f
    assert resolve_checkpoint(str(f)) == f
    assert resolve_checkpoint(f.as_uri()) == f


def test_resolve_missing_local_path_is_clear(tmp_path, no_network):
    missing = tmp_path / "nope" / "edm.pkl"
    with pytest.raises(AssetUnavailableError) as info:
        resolve_checkpoint(str(missing), config_key="model.path")
    message = str(info.value)
    assert str(missing) in message and "no such file" in message and "model.path=" in message
    with pytest.raises(AssetUnavailableError, match="directory"):
        resolve_checkpoint(str(tmp_path))


def test_resolve_unknown_name_lists_valid_names(no_network):
    with pytest.raises(ValueError) as info:
        resolve_checkpoint("edm-cifar10-cond")
    assert "edm-cifar10-32x32-cond-vp" in str(info.value) and "model.path" in str(info.value)


# --- real HTTP against a local server --------------------------------------------------------------------


class _Server:
    """Tiny HTTP/1.0 file server on 127.0.0.1 with ``Range: bytes=N-`` support and a request log."""

    def __init__(self, root: Path, honour_range: bool = True):
        self.root = root
        self.honour_range = honour_range
        self.requests = []  # (path, Range header or None)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                f = server.root / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = f.read_bytes()
                start = 0
                if rng and server.honour_range:
                    start = int(rng.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads allowed (offline flags cleared), cache in tmp, proxies bypassed for 127.0.0.1."""
    for var in ("HF_HUB_OFFLINE", "BDIA_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def payload(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    data = bytes(range(256)) * 4099 + b"tail"  # ~1 MiB + a bit: more than one read chunk
    (root / "net.pkl").write_bytes(data)
    return root, data


@pytest.fixture
def server(payload):
    s = _Server(payload[0])
    yield s
    s.close()


def test_full_download_then_reuse_without_request(online, server, payload, tmp_path):
    _, data = payload
    dest = tmp_path / "dl" / "net.pkl"
    got = fetch_file(server.url("net.pkl"), dest, expected_size=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), progress=True)
    assert got == dest and dest.read_bytes() == data
    assert server.requests == [("/net.pkl", None)]
    assert not dest.with_name("net.pkl.partial").exists()
    again = fetch_file(server.url("net.pkl"), dest, expected_size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert again == dest and len(server.requests) == 1  # cached: no second request


def test_default_destination_is_in_cache(online, server, payload, tmp_path):
    got = fetch_file(server.url("net.pkl"), progress=False)
    assert got == tmp_path / "cache" / "downloads" / "net.pkl" and got.read_bytes() == payload[1]


def test_resume_from_partial_uses_range_request(online, server, payload, tmp_path):
    _, data = payload
    dest = tmp_path / "net.pkl"
    half = len(data) // 2
    dest.with_name("net.pkl.partial").write_bytes(data[:half])
    fetch_file(server.url("net.pkl"), dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [("/net.pkl", f"bytes={half}-")]
    assert not dest.with_name("net.pkl.partial").exists()


def test_complete_partial_with_unknown_size_handles_416(online, server, payload, tmp_path):
    _, data = payload
    dest = tmp_path / "net.pkl"
    dest.with_name("net.pkl.partial").write_bytes(data)
    fetch_file(server.url("net.pkl"), dest, progress=False)
    assert dest.read_bytes() == data and server.requests == [("/net.pkl", f"bytes={len(data)}-")]


def test_server_ignoring_range_restarts_cleanly(online, payload, tmp_path):
    root, data = payload
    s = _Server(root, honour_range=False)
    try:
        dest = tmp_path / "net.pkl"
        dest.with_name("net.pkl.partial").write_bytes(b"garbage-prefix")
        fetch_file(s.url("net.pkl"), dest, expected_size=len(data), progress=False)
        assert dest.read_bytes() == data
        assert s.requests == [("/net.pkl", "bytes=14-")]
    finally:
        s.close()


def test_size_mismatch_leaves_no_file(online, server, payload, tmp_path):
    _, data = payload
    dest = tmp_path / "net.pkl"
    with pytest.raises(AssetVerificationError) as info:
        fetch_file(server.url("net.pkl"), dest, expected_size=len(data) + 1, progress=False, config_key="model.path")
    assert "size mismatch" in str(info.value) and server.url("net.pkl") in str(info.value)
    assert str(dest) in str(info.value) and "model.path=" in str(info.value)
    assert not dest.exists() and not dest.with_name("net.pkl.partial").exists()


def test_sha256_mismatch_leaves_no_file(online, server, payload, tmp_path):
    dest = tmp_path / "net.pkl"
    with pytest.raises(AssetVerificationError, match="sha256 mismatch"):
        fetch_file(server.url("net.pkl"), dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("net.pkl.partial").exists()


def test_invalid_cached_file_is_fetched_again(online, server, payload, tmp_path):
    _, data = payload
    dest = tmp_path / "net.pkl"
    dest.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="invalid"):
        fetch_file(server.url("net.pkl"), dest, expected_size=len(data), progress=False)
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_http_404_is_one_clear_error(online, server, tmp_path):
    dest = tmp_path / "missing.pkl"
    with pytest.raises(AssetUnavailableError) as info:
        fetch_file(server.url("missing.pkl"), dest, progress=False, config_key="model.path")
    assert "404" in str(info.value) and server.url("missing.pkl") in str(info.value)
    assert not dest.exists()


def test_unreachable_server_fails_fast(online, tmp_path):
    closed = _Server(tmp_path)
    url = closed.url("net.pkl")
    closed.close()  # nothing listens on that port any more: connection refused
    t0 = time.perf_counter()
    with pytest.raises(AssetUnavailableError, match="cannot reach"):
        fetch_file(url, tmp_path / "net.pkl", progress=False, timeout=2)
    assert time.perf_counter() - t0 < 1.0


def test_resolve_registry_name_downloads_into_cache(online, server, payload, tmp_path, monkeypatch):
    name = "edm-cifar10-32x32-uncond-vp"
    (payload[0] / f"{name}.pkl").write_bytes(payload[1])
    local = dataclasses.replace(registry.CHECKPOINTS[name], url=server.url(f"{name}.pkl"),
                                size_bytes=len(payload[1]))
    monkeypatch.setitem(registry.CHECKPOINTS, name, local)
    got = resolve_checkpoint(name, progress=False)
    assert got == tmp_path / "cache" / "edm" / f"{name}.pkl" and got.read_bytes() == payload[1]
    assert resolve_checkpoint(local.url, progress=False) == got  # a registry URL maps to the same file
    assert len(server.requests) == 1


def test_resolve_plain_url_is_cached(online, server, payload, tmp_path):
    got = resolve_checkpoint(server.url("net.pkl"), progress=False)
    assert got.read_bytes() == payload[1] and got.is_relative_to(tmp_path / "cache" / "url")
    assert resolve_checkpoint(server.url("net.pkl"), progress=False) == got and len(server.requests) == 1
