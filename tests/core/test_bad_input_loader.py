"""Red team: crafted, damaged or odd inputs to the EDM snapshot loader, its conversion cache, the digits
network reader and the download helpers (issue 12, "Bounded untrusted input").

Every case asserts the user-facing outcome: a refusal whose message is one line naming the problem (the
apps print ``error: <message>``), raised *before* any real network is allocated (``_build``, the only place
that allocates one, is made to fail the test), and no data lost: every file in the folder is byte-identical
afterwards, and no conversion cache is left behind by a refused snapshot. Cases that would hang or exhaust
memory without the checks run in a subprocess with a generous timeout, so a regression fails instead of
stalling the suite. No case allocates anything large to make its point.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bdia.networks.loader as loader
from bdia import download
from bdia.apps.cli import one_line
from bdia.models import digits_network
from bdia.networks import EDM_CLASSES, EDMPrecond, iDDPMPrecond
from bdia.networks.loader import CACHE_SUFFIX, CacheWarning, SnapshotError, load_edm
from edm_pickle import container, persistent, write_edm_snapshot, write_records

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SUPPORT = TESTS / "support"

TINY = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
            embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1])
BASE = dict(img_resolution=8, img_channels=3, label_dim=0)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(8, 3, **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return net.eval()


def valid_snapshot(folder, net=None, name="net.pkl"):
    return write_edm_snapshot(Path(folder) / name, net or tiny_net(), set(EDM_CLASSES), lambda m: m.init_kwargs)


def crafted(folder, init_kwargs=None, class_name="EDMPrecond", name="bad.pkl", **state):
    """A snapshot whose ``ema`` record carries exactly these constructor arguments / state."""
    kwargs = dict(BASE, **TINY) if init_kwargs is None else init_kwargs
    return write_records(Path(folder) / name, {"ema": persistent(class_name, kwargs, **state), "loss_fn": None})


def files_in(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def denoise(net):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return net(torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.3, 4.0]))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail if a real network is built: refusals must come before allocation."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network was allocated although the input should have been refused first")

    monkeypatch.setattr(loader, "_build", refuse)


def refused(call, *patterns, exc=SnapshotError):
    """Run ``call``; it must raise ``exc`` with a one-line message containing every pattern."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and one_line(info.value) == message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def assert_refused_snapshot(path, *patterns):
    before = files_in(path.parent)
    message = refused(lambda: load_edm(path), str(path), *patterns)
    assert files_in(path.parent) == before  # nothing written (no cache), nothing changed
    assert not list(path.parent.glob(f"*{CACHE_SUFFIX}*"))
    return message


def run_isolated(code, timeout=120):
    """Run ``code`` in a fresh interpreter (for cases that would hang without the checks); returns stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(SUPPORT)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


# --- constructor arguments: sizes ---------------------------------------------------------------------------


def test_tiny_snapshot_asking_for_a_huge_network(tmp_path, no_allocation):
    path = crafted(tmp_path, dict(BASE, **dict(TINY, model_channels=4096, channel_mult=[4, 4, 4, 4], num_blocks=8)))
    assert path.stat().st_size < 1000
    assert_refused_snapshot(path, "model_channels=4096", "outside the allowed range")


def test_arguments_each_within_limits_but_too_many_parameters(tmp_path, no_allocation):
    kwargs = dict(BASE, **dict(TINY, model_channels=1024, channel_mult=[16, 16], num_blocks=16, attn_resolutions=[]))
    assert_refused_snapshot(crafted(tmp_path, kwargs), "parameters and buffers", "more than the limit 2,000,000,000")


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("model_channels", -5, "model_channels=-5 is outside the allowed range"),
        ("model_channels", True, "model_channels=True must be an integer"),
        ("model_channels", 16.0, "model_channels=16.0 must be an integer"),
        ("img_resolution", 10**12, "img_resolution=1000000000000 is outside the allowed range"),
        ("num_blocks", 17, "num_blocks=17 is outside the allowed range"),
        ("channel_mult", [1, 2.5], "channel_mult=[1, 2.5] must be a list of integers"),
        ("channel_mult", [1] * 9, "channel_mult=[1, 1, 1, 1, 1, 1, 1, 1, 1] must have 1 to 8 entries"),
        ("channel_mult", [], "channel_mult=[] must have 1 to 8 entries"),
        ("channel_mult", "12", "must be a list of integers"),
        ("attn_resolutions", [0], "attn_resolutions=[0] has an entry outside the allowed range"),
        ("resample_filter", [1.0] * 17, "resample_filter="),
        ("resample_filter", [float("nan")], "must be a list of finite numbers"),
        ("dropout", "0.1", "dropout='0.1' must be a finite number"),
        ("use_fp16", 1, "use_fp16=1 must be true or false"),
        ("model_type", "os.system", "model_type='os.system' must be one of"),
        ("label_dim", 10**9, "label_dim=1000000000 is outside the allowed range"),
        ("surprise", 1, "unknown constructor argument 'surprise'"),
    ],
)
def test_badly_typed_or_out_of_range_argument(tmp_path, no_allocation, name, value, expected):
    assert_refused_snapshot(crafted(tmp_path, dict(BASE, **dict(TINY, **{name: value}))), expected)


def test_iddpm_with_a_huge_number_of_levels(tmp_path):
    # Without the check, iDDPMPrecond's constructor loops M = 1e8 times (hours): run it where a hang fails.
    kwargs = dict(BASE, model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], dropout=0.0, M=10**8)
    path = crafted(tmp_path, kwargs, class_name="iDDPMPrecond")
    before = files_in(tmp_path)
    out = run_isolated(
        "import bdia.networks.loader as L\n"
        "L._build = lambda *a, **k: (_ for _ in ()).throw(AssertionError('allocated'))\n"
        f"try:\n    L.load_edm({str(path)!r})\nexcept L.SnapshotError as e:\n    print(e)\n"
    )
    assert "\n" not in out and "M=100000000 is outside the allowed range [1, 10000]" in out, out
    assert files_in(tmp_path) == before


def test_iddpm_with_edm_settings_still_loads(tmp_path):
    net = iDDPMPrecond(8, 3, label_dim=5, model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                       attn_resolutions=[4], dropout=0.0)
    loaded = load_edm(valid_snapshot(tmp_path, net))
    assert loaded.M == 1000 and torch.equal(loaded.u, net.u)


# --- constructor arguments: structure -----------------------------------------------------------------------


def test_nested_list_bomb_in_the_arguments(tmp_path):
    # 40 levels of [previous, previous]: 527 bytes of pickle, 2**40 values if expanded naively.
    bomb = [1]
    for _ in range(40):
        bomb = [bomb, bomb]
    path = crafted(tmp_path, dict(BASE, **dict(TINY, channel_mult=bomb)))
    assert path.stat().st_size < 2000
    before = files_in(tmp_path)
    out = run_isolated(
        "import bdia.networks.loader as L\n"
        f"try:\n    L.load_edm({str(path)!r})\nexcept L.SnapshotError as e:\n    print(e)\n"
    )
    assert "\n" not in out and "nested deeper than 4 levels" in out, out
    assert files_in(tmp_path) == before and not list(tmp_path.glob(f"*{CACHE_SUFFIX}"))


def test_self_referencing_list_in_the_arguments(tmp_path, no_allocation):
    loop = [1, 2]
    loop.append(loop)
    assert_refused_snapshot(crafted(tmp_path, dict(BASE, **dict(TINY, channel_mult=loop))), "includes itself")


def test_too_many_values_in_the_arguments(tmp_path, no_allocation):
    wide = [[1] * 3000 for _ in range(4)]
    assert_refused_snapshot(crafted(tmp_path, dict(BASE, **dict(TINY, attn_resolutions=wide))), "more than 10000 values")


def test_mixed_key_types_in_the_arguments(tmp_path, no_allocation):
    kwargs = {**BASE, **TINY, 1: "one"}
    assert_refused_snapshot(crafted(tmp_path, kwargs), "key 1 that is not a string")


def test_mixed_key_types_in_a_snapshot_without_ema(tmp_path, no_allocation):
    path = write_records(tmp_path / "keys.pkl", {1: None, "a": None, (2, 3): None})
    assert_refused_snapshot(path, "has no 'ema' network")


def test_arguments_that_are_not_a_dict(tmp_path, no_allocation):
    path = write_records(tmp_path / "args.pkl", {"ema": persistent("EDMPrecond", [("img_resolution", 8)])})
    assert_refused_snapshot(path, "'_init_kwargs' is a list, expected a dict")


def test_positional_arguments_given_as_a_tensor(tmp_path, no_allocation):
    assert_refused_snapshot(crafted(tmp_path, _init_args=torch.zeros(3)), "_init_args of type Tensor")


def test_root_that_is_not_a_preconditioner(tmp_path, no_allocation):
    path = crafted(tmp_path, dict(in_features=10**6, out_features=10**6), class_name="Linear")
    assert_refused_snapshot(path, "the network is a 'Linear', not one of EDM's preconditioned networks")


# --- the record tree --------------------------------------------------------------------------------------


def test_modules_given_as_a_list(tmp_path, no_allocation):
    assert_refused_snapshot(crafted(tmp_path, modules=[("model", None)]), "'<root>._modules' is a list, expected a dict")


def test_parameters_given_as_a_list(tmp_path, no_allocation):
    assert_refused_snapshot(crafted(tmp_path, parameters=[torch.zeros(2)]), "'<root>._parameters' is a list")


def test_self_referencing_module_container(tmp_path, no_allocation):
    children = {}
    loop = container(children)
    children["again"] = loop
    assert_refused_snapshot(crafted(tmp_path, modules={"model": loop}), "'model.again' appears more than once")


def test_exponentially_shared_module_records(tmp_path, no_allocation):
    # 14 levels of {a: previous, b: previous}: 2**14 records if walked as a tree (within the depth limit).
    node = persistent("Linear")
    for _ in range(14):
        node = container({"a": node, "b": node})
    assert_refused_snapshot(crafted(tmp_path, modules={"model": node}), "appears more than once")


def test_module_records_nested_too_deep(tmp_path, no_allocation):
    node = persistent("Linear")
    for _ in range(20):
        node = container({"x": node})
    assert_refused_snapshot(crafted(tmp_path, modules={"model": node}), "nested deeper than 16 levels")


def test_too_many_tensors(tmp_path, no_allocation):
    one = torch.zeros(1)
    path = crafted(tmp_path, parameters={f"p{i}": one for i in range(10_001)})
    assert_refused_snapshot(path, "more than 10000 tensors")


def test_bad_tensor_names(tmp_path, no_allocation):
    assert_refused_snapshot(crafted(tmp_path, parameters={"a.b\nc": torch.zeros(1)}), "invalid name 'a.b\\nc'")


def test_tensors_declaring_more_bytes_than_the_file(tmp_path, no_allocation):
    # A stride-0 view: 10**8 floats (400 MB) declared over a 4-byte storage in a file of a few hundred bytes.
    path = crafted(tmp_path, parameters={"w": torch.zeros(1).expand(10**8)})
    assert path.stat().st_size < 5000
    assert_refused_snapshot(path, "declare 400,000,000 bytes, more than the file's")


def test_tensor_shapes_are_checked_before_allocation(tmp_path, no_allocation):
    net = tiny_net()
    layer = net.model.map_layer0
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape[0], layer.weight.shape[1] + 1))
    assert_refused_snapshot(valid_snapshot(tmp_path, net), "do not fit EDMPrecond", "'model.map_layer0.weight' has shape")


def test_huge_byte_string_length_in_the_pickle(tmp_path):
    path = tmp_path / "bytes.pkl"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc")  # BINBYTES8 claiming 4 EiB
    assert_refused_snapshot(path, "not a readable EDM snapshot")


def test_record_fields_of_the_wrong_type(tmp_path):
    from edm_pickle import MODULE_SRC_THAT_MUST_NOT_RUN, _Persistent

    meta = dict(type=torch.zeros(30, 30), version=True, module_src=MODULE_SRC_THAT_MUST_NOT_RUN, class_name="EDMPrecond", state={})
    path = write_records(tmp_path / "meta.pkl", {"ema": _Persistent(meta)})
    assert_refused_snapshot(path, "unsupported persistent record (type=tensor[30, 30], version=True)")


def test_record_created_without_its_reconstructor(tmp_path):
    # NEWOBJ on the name of EDM's reconstructor, then BUILD {"class_name": ["x"], "state": {}}: a record that
    # skipped every check of its fields.
    path = tmp_path / "newobj.pkl"
    path.write_bytes(b"\x80\x04ctorch_utils.persistence\n_reconstruct_persistent_obj\n)\x81}("
                     b"X\x0a\x00\x00\x00class_name]X\x01\x00\x00\x00xaX\x05\x00\x00\x00state}ub.")
    assert_refused_snapshot(path, "not a readable EDM snapshot")


def test_record_fields_overwritten_after_construction(tmp_path):
    from edm_pickle import _Persistent, fake_torch_utils

    class Overwritten(_Persistent):
        def __reduce__(self):
            fn, args = super().__reduce__()
            return fn, args, {"class_name": ["EDMPrecond"], "state": 3}

    record = Overwritten(dict(type="class", version=6, module_src="", class_name="EDMPrecond", state={}))
    path = tmp_path / "overwritten.pkl"
    with fake_torch_utils():
        path.write_bytes(pickle.dumps({"ema": record}, protocol=4))
    assert_refused_snapshot(path, "whose fields are overwritten after construction")


class _ShadowedOrderedDict:
    """Pickles as an OrderedDict with instance attributes ``get`` and ``items`` (BUILD after SETITEMS)."""

    def __init__(self, pairs):
        self.pairs = dict(pairs)

    def __reduce__(self):
        import collections

        return collections.OrderedDict, (), {"get": 3, "items": 3}, None, iter(self.pairs.items())


def test_dicts_whose_methods_are_shadowed(tmp_path, no_allocation):
    kwargs = _ShadowedOrderedDict(dict(BASE, **TINY))
    path = crafted(tmp_path, kwargs, modules=_ShadowedOrderedDict({}), parameters=_ShadowedOrderedDict({}))
    assert_refused_snapshot(path, "do not fit EDMPrecond", "missing")


def test_container_without_state(tmp_path, no_allocation):
    from edm_pickle import _Container

    path = crafted(tmp_path, modules={"model": _Container(torch.nn.ModuleDict, None)})
    assert_refused_snapshot(path, "do not fit EDMPrecond", "missing")


# --- the conversion cache ---------------------------------------------------------------------------------


def cached_snapshot(tmp_path):
    path = valid_snapshot(tmp_path)
    reference = denoise(load_edm(path))
    cache = path.with_name(path.name + CACHE_SUFFIX)
    assert cache.is_file()
    return path, cache, reference


def reload_with_warning(path, *patterns):
    snapshot_bytes = path.read_bytes()
    with pytest.warns(CacheWarning) as record:
        net = load_edm(path)
    message = str([w for w in record if issubclass(w.category, CacheWarning)][0].message)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    assert path.read_bytes() == snapshot_bytes
    return net


def assert_cache_is_good_again(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        load_edm(path)


def test_valid_cache_is_used_without_warning(tmp_path, monkeypatch):
    path, cache, reference = cached_snapshot(tmp_path)
    metadata = loader._read_safetensors(open(cache, "rb"), cache, "cache")[0]
    assert len(metadata["tensors_sha256"]) == 64
    monkeypatch.setattr(loader, "read_snapshot", lambda *a: pytest.fail("the snapshot was unpickled despite a valid cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert torch.equal(denoise(load_edm(path)), reference)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header_only"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    path, cache, reference = cached_snapshot(tmp_path)
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b"",
                       "header_only": data[:8]}[damage])
    net = reload_with_warning(path, "ignored the conversion cache", "rebuilding it from the snapshot")
    assert torch.equal(denoise(net), reference)
    assert_cache_is_good_again(path)


def _rewrite_cache(cache, tensors=None, **metadata_changes):
    from safetensors.torch import load_file, save_file

    old = loader._read_safetensors(open(cache, "rb"), cache, "cache")[0]
    tensors = tensors if tensors is not None else load_file(str(cache))
    save_file(tensors, str(cache), metadata={**old, **metadata_changes})
    return tensors


def test_cache_with_edited_weights_is_rebuilt(tmp_path):
    from safetensors.torch import load_file

    path, cache, reference = cached_snapshot(tmp_path)
    tensors = load_file(str(cache))
    tensors["model.map_layer0.weight"] = tensors["model.map_layer0.weight"] + 1  # metadata (and hash) kept
    _rewrite_cache(cache, tensors)
    net = reload_with_warning(path, "do not match its tensors_sha256")
    assert torch.equal(denoise(net), reference)
    assert_cache_is_good_again(path)


def test_cache_without_a_content_hash_is_rebuilt(tmp_path):
    path, cache, reference = cached_snapshot(tmp_path)
    from safetensors.torch import load_file, save_file

    metadata = loader._read_safetensors(open(cache, "rb"), cache, "cache")[0]
    del metadata["tensors_sha256"]
    save_file(load_file(str(cache)), str(cache), metadata=metadata)
    net = reload_with_warning(path, "carries no tensors_sha256")
    assert torch.equal(denoise(net), reference)


def test_cache_metadata_asking_for_a_huge_network(tmp_path, monkeypatch):
    # A crafted cache that names the right snapshot hash and re-hashes its tensors: still refused by the limits.
    path, cache, reference = cached_snapshot(tmp_path)
    kwargs = json.loads(loader._read_safetensors(open(cache, "rb"), cache, "cache")[0]["init_kwargs"])
    tensors = _rewrite_cache(cache, init_kwargs=json.dumps(dict(kwargs, model_channels=4096)))
    _rewrite_cache(cache, tensors, tensors_sha256=loader._tensors_sha256(tensors))
    real_build = loader._build
    built = []
    monkeypatch.setattr(loader, "_build", lambda *a: built.append(a[1]) or real_build(*a))
    net = reload_with_warning(path, "model_channels=4096 is outside the allowed range")
    assert [k["model_channels"] for k in built] == [16]  # only the snapshot's own network was built
    assert torch.equal(denoise(net), reference)


def test_cache_metadata_that_is_a_json_bomb(tmp_path):
    path, cache, reference = cached_snapshot(tmp_path)
    _rewrite_cache(cache, init_kwargs="[" * 100_000 + "]" * 100_000)
    net = reload_with_warning(path, "init_kwargs metadata is not readable JSON")
    assert torch.equal(denoise(net), reference)


def test_cache_header_claiming_a_huge_length(tmp_path):
    path, cache, reference = cached_snapshot(tmp_path)
    cache.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    net = reload_with_warning(path, "its header claims")
    assert torch.equal(denoise(net), reference)


def test_cache_path_that_is_a_directory_is_left_alone(tmp_path):
    path = valid_snapshot(tmp_path)
    cache = path.with_name(path.name + CACHE_SUFFIX)
    cache.mkdir()
    (cache / "keep.txt").write_text("mine")
    net = reload_with_warning(path, "is not a regular file")
    assert torch.equal(denoise(net), denoise(tiny_net()))
    assert cache.is_dir() and (cache / "keep.txt").read_text() == "mine"


def test_unwritable_folder_uses_the_converted_network(tmp_path, monkeypatch):
    # What creating the cache's temporary file raises in a read-only folder for a non-root user (root, which
    # runs these tests in CI containers, may write anywhere; the real chmod case is the next test).
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    path = valid_snapshot(tmp_path)
    before = files_in(tmp_path)
    net = reload_with_warning(path, "could not write the conversion cache", "PermissionError: Permission denied",
                              "using the converted network without caching")
    assert torch.equal(denoise(net), denoise(tiny_net()))
    assert files_in(tmp_path) == before


def test_cache_write_failing_inside_safetensors(tmp_path, monkeypatch):
    # safetensors reports its own I/O errors (disk full ...) as SafetensorError, not OSError.
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    path = valid_snapshot(tmp_path)
    before = files_in(tmp_path)
    net = reload_with_warning(path, "could not write the conversion cache", "No space left on device")
    assert torch.equal(denoise(net), denoise(tiny_net()))
    assert files_in(tmp_path) == before  # the temporary file is gone too


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a read-only folder")
def test_snapshot_in_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = valid_snapshot(folder)
    before = files_in(folder)
    folder.chmod(0o555)
    try:
        net = reload_with_warning(path, "using the converted network without caching")
    finally:
        folder.chmod(0o755)
    assert torch.equal(denoise(net), denoise(tiny_net()))
    assert files_in(folder) == before


# --- files that are not regular files ---------------------------------------------------------------------


def test_directory_as_snapshot(tmp_path):
    folder = tmp_path / "net.pkl"
    folder.mkdir()
    refused(lambda: load_edm(folder), str(folder), "is a directory, not a regular file")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(f"*{CACHE_SUFFIX}"))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_as_snapshot():
    out = run_isolated(
        "from bdia.networks.loader import load_edm, SnapshotError\n"
        "try:\n    load_edm('/dev/zero', cache=False)\nexcept SnapshotError as e:\n    print(e)\n"
    )
    assert out == "EDM snapshot /dev/zero is a character device, not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_as_snapshot_and_in_the_hashing_helpers(tmp_path):
    fifo = tmp_path / "net.pkl"
    os.mkfifo(fifo)
    out = run_isolated(
        "import sys\n"
        "from bdia.networks.loader import load_edm, SnapshotError\n"
        "from bdia import download\n"
        f"path = {str(fifo)!r}\n"
        "try:\n    load_edm(path)\nexcept SnapshotError as e:\n    print(e)\n"
        "try:\n    download._sha256_of(path)\nexcept download.NotARegularFileError as e:\n    print(e)\n"
        "import pathlib\nprint(download._verify(pathlib.Path(path), None, '0' * 64))\n"
    )
    lines = out.splitlines()
    assert lines[0] == f"EDM snapshot {fifo} is a FIFO (named pipe), not a regular file"
    assert lines[1] == f"file {fifo} is a FIFO (named pipe), not a regular file"
    assert lines[2] == "it is a FIFO (named pipe), not a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pkl"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_download_hashing_refuses_devices_and_directories(tmp_path):
    refused(lambda: download._sha256_of("/dev/zero"), "/dev/zero is a character device", exc=download.NotARegularFileError)
    refused(lambda: download._sha256_of(tmp_path), "is a directory", exc=download.NotARegularFileError)


def test_download_destination_that_is_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "net.pkl"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(download.AssetUnavailableError, match="is a directory, not a regular file"):
        download.fetch_file("https://example.invalid/net.pkl", dest, sha256="0" * 64)
    assert (dest / "keep.txt").read_text() == "mine"


# --- the digits network (model.path= a safetensors file) ----------------------------------------------------


def digits_file(path, init_kwargs=None, tensors=None, **metadata):
    from safetensors.torch import save_file

    kwargs = dict(img_resolution=16, img_channels=1, label_dim=0, **TINY) if init_kwargs is None else init_kwargs
    save_file(tensors or {"x": torch.zeros(1)}, str(path),
              metadata={"class_name": "EDMPrecond", "init_kwargs": json.dumps(kwargs), **metadata})
    return path


def assert_refused_digits(path, *patterns):
    before = files_in(path.parent)
    refused(lambda: digits_network(str(path)), "model.path", *patterns, exc=ValueError)
    assert files_in(path.parent) == before


def test_tiny_digits_file_asking_for_a_huge_network(tmp_path, no_allocation):
    path = digits_file(tmp_path / "net.safetensors", dict(img_resolution=16, img_channels=1, model_channels=4096,
                                                          channel_mult=[4, 4, 4, 4], num_blocks=8))
    assert path.stat().st_size < 600
    assert_refused_digits(path, "model_channels=4096 is outside the allowed range")


def test_digits_file_whose_tensors_do_not_fit(tmp_path, no_allocation):
    assert_refused_digits(digits_file(tmp_path / "net.safetensors"), "do not fit EDMPrecond", "missing")


def test_digits_file_of_another_class(tmp_path, no_allocation):
    path = digits_file(tmp_path / "net.safetensors", class_name="iDDPMPrecond")
    assert_refused_digits(path, "holds a 'iDDPMPrecond', expected one of ['EDMPrecond']")


def test_digits_file_with_a_huge_header_length(tmp_path, no_allocation):
    path = tmp_path / "net.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}" + b" " * 450)
    assert_refused_digits(path, "its header claims 1,099,511,627,776 bytes")


def test_digits_file_with_nested_arguments(tmp_path, no_allocation):
    deep = 1
    for _ in range(10):
        deep = [deep]
    path = digits_file(tmp_path / "net.safetensors", dict(img_resolution=16, img_channels=1, channel_mult=deep))
    assert_refused_digits(path, "nested deeper than 4 levels")


def test_digits_file_that_is_a_fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "net.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(download.AssetUnavailableError, match="not a regular file"):
        digits_network(str(fifo))


def test_digits_network_written_by_train_still_loads(tmp_path):
    from bdia.apps.train import TrainConfig, build_network, load_network, save_network

    config = TrainConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    net = build_network(config, 16, 1).eval()
    path = save_network(net, tmp_path / "net.safetensors", config)
    loaded = digits_network(str(path))
    assert loaded.init_kwargs == net.init_kwargs
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), load_network(path).state_dict().values()))


# --- what must keep holding -------------------------------------------------------------------------------


def test_no_code_from_a_refused_snapshot_runs(tmp_path, capfd):
    path = crafted(tmp_path, dict(BASE, **dict(TINY, model_channels=4096)))
    assert b"SECURITY: the module_src" in path.read_bytes()
    with pytest.raises(SnapshotError):
        load_edm(path)
    assert "pwned" not in capfd.readouterr().out


def test_every_refusal_is_one_line_through_the_app_helper(tmp_path):
    loop = [1]
    loop.append(loop)
    for path in (crafted(tmp_path, dict(BASE, **dict(TINY, channel_mult=loop)), name="a.pkl"),
                 crafted(tmp_path, modules=[1], name="b.pkl"),
                 write_records(tmp_path / "c.pkl", {1: 2, "x": 3})):
        with pytest.raises(SnapshotError) as info:
            load_edm(path)
        assert f"error: {one_line(info.value)}" == f"error: {info.value}"


# --- the limits admit every published architecture ---------------------------------------------------------


def _registry_kwargs(ckpt):
    """Constructor arguments of a published snapshot, as EDM's train.py sets them for its architecture."""
    kwargs = dict(img_resolution=ckpt.resolution, img_channels=ckpt.channels, label_dim=ckpt.label_dim)
    if ckpt.architecture == "adm":
        return dict(kwargs, model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                    attn_resolutions=[32, 16, 8], dropout=0.1)
    song = dict(model_type="SongUNet", model_channels=128, num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9,
                channel_mult=[2, 2, 2] if ckpt.resolution == 32 else [1, 2, 2, 2], encoder_type="standard",
                decoder_type="standard")
    if ckpt.architecture == "ddpmpp":
        song.update(embedding_type="positional", channel_mult_noise=1, resample_filter=[1, 1])
    else:
        song.update(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
    return dict(kwargs, **song)


def test_every_published_architecture_is_within_the_limits():
    import math

    from bdia.networks.registry import CHECKPOINTS

    counts, planned = {}, {}
    for name, ckpt in CHECKPOINTS.items():
        key = json.dumps([ckpt.preconditioner, _registry_kwargs(ckpt)])  # FFHQ and AFHQv2 share architectures
        if key not in planned:
            shapes = loader.plan_network(ckpt.preconditioner, _registry_kwargs(ckpt))
            assert len(shapes) <= loader.MAX_TENSORS / 10
            planned[key] = sum(math.prod(s) for s in shapes.values())
        counts[name] = planned[key]
    largest = max(counts.values())
    assert 2.9e8 < largest == counts["baseline-imagenet-64x64-cond-adm"] < 3.0e8  # ADM: ~296M parameters
    assert largest * 6 < loader.MAX_PARAMETERS  # a generous margin, not a tight fit


def test_every_constructor_argument_name_has_a_rule():
    import inspect

    from bdia.networks import DhariwalUNet, SongUNet, VEPrecond, VPPrecond

    ruled = (set(loader._INT_ARGS) | set(loader._INT_LIST_ARGS) | set(loader._NUMBER_LIST_ARGS) | set(loader._NUMBER_ARGS)
             | loader._BOOL_ARGS | set(loader._CHOICE_ARGS))
    names = set()
    for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, SongUNet, DhariwalUNet):
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"self"}
    # in_channels / out_channels of the U-Nets are set by the preconditioner, never recorded for it
    assert names - {"in_channels", "out_channels"} == ruled


def test_compressed_storage_blob_is_refused_before_it_expands(tmp_path):
    # A nested torch.save archive whose data entry is deflated: 4 MB of zeros in a few KB of snapshot.
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save(torch.zeros(1_000_000).untyped_storage(), buf)
    archive = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w") as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)

    class Storage:  # pickles as torch.storage._load_from_bytes(<deflated archive>)
        def __reduce__(self):
            return torch.storage._load_from_bytes, (deflated.getvalue(),)

    path = tmp_path / "deflated.pkl"
    path.write_bytes(pickle.dumps({"ema": Storage()}, protocol=4))
    assert path.stat().st_size < 50_000
    assert_refused_snapshot(path, "is compressed", "refused: it could expand")


# --- values nested too deeply for Python's recursion ------------------------------------------------------------


@pytest.mark.parametrize("where, expected", [("argument key", "nested too deeply"),
                                             ("class name", "non-string class_name")])
def test_a_100000_deep_tuple_is_refused_in_one_line(tmp_path, no_allocation, where, expected):
    """pickle builds nested tuples without recursion; repr / hash / == of one recurse. The refusal must not
    end in a RecursionError while it is being formatted."""
    if where == "argument key":
        path = write_records(tmp_path / "deep.pkl", {"ema": persistent("EDMPrecond", {**BASE, **TINY, "PLACEHOLDERKEY": 1}),
                                                    "loss_fn": None})
    else:
        path = write_records(tmp_path / "deep.pkl", {"ema": persistent("PLACEHOLDERKEY", dict(BASE, **TINY)),
                                                    "loss_fn": None})
    data = path.read_bytes()
    needle = b"\x8c\x0ePLACEHOLDERKEY"  # SHORT_BINUNICODE of the placeholder, replaced by () then TUPLE1 x 100000
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, b")" + b"\x85" * 100_000))
    assert_refused_snapshot(path, expected)
