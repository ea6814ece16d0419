"""benchmarks/bench_gpu.py: the tiny mode end to end on the CPU, in a fresh interpreter that refuses every
optional dependency (the script must run with PyTorch, the standard library and the bdia source tree only),
and its one-line refusals. The real benchmark needs a GPU; its results (results/bench/gpu.*) are not checked here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"

OPTIONS = ("float32", "tf32", "bf16", "fp16", "bf16+channels_last")
SOLVERS = ("edm", "bdia_edm", "bdia_ddim")
NETWORKS = {"cifar10-ddpmpp": ("SongUNet", 0), "imagenet-adm": ("DhariwalUNet", 1000)}
TINY_BATCHES = [1, 2, 4]

#: Runs the script given as argv[1] with the remaining arguments, refusing the heavy optional packages.
BLOCKER = r"""
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = {"scipy", "diffusers", "transformers", "hydra", "omegaconf", "wandb", "sklearn", "PIL", "matplotlib", "tqdm",
           "safetensors", "torch_fidelity", "cleanfid", "lpips", "torchvision", "huggingface_hub"}
class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # A spec without an origin (so importlib.util.find_spec probes, e.g. torch._dynamo's, see nothing to inspect)
    # whose loading fails as a missing package does.
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.partition(".")[0] in BLOCKED else None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"test blocker: import of {spec.name!r} refused", name=spec.name)
    def exec_module(self, module):
        raise AssertionError("unreachable")
assert not BLOCKED & {m.partition(".")[0] for m in sys.modules}, "already imported at start-up"
sys.meta_path.insert(0, Refuse())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(*args, cwd, timeout=300, blocker=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script puts the repository root on sys.path itself
    command = [sys.executable, "-c", BLOCKER, str(SCRIPT), *args] if blocker else [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def finite_nonnegative(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    proc = run_script("--tiny", "--device", "cpu", "--out", str(out / "results"), "--quiet", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "results", proc


def test_tiny_writes_both_files_outside_the_repository(tiny_run):
    out, proc = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md"]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'}")
    assert "blocker" not in proc.stderr


def test_tiny_json_has_every_cell_with_sane_numbers(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / "gpu.json").read_text())
    settings, machine = result["settings"], result["machine"]
    assert settings["tiny"] is True and settings["device"] == "cpu"
    assert settings["options"] == list(OPTIONS) and settings["solvers"] == list(SOLVERS)
    assert settings["repeats"] == 3 and settings["nfe"] == {s: 3 for s in SOLVERS}
    assert machine["torch"] == torch.__version__ and machine["gpu"] is None
    assert finite_positive(result["wall_s"])

    assert set(result["networks"]) == set(NETWORKS)
    for key, (architecture, label_dim) in NETWORKS.items():
        net = result["networks"][key]
        assert net["architecture"] == architecture and net["label_dim"] == label_dim
        assert net["preconditioner"] == "EDMPrecond" and net["constructor_kwargs"]["use_fp16"] is False
        assert net["batch_sizes"] == TINY_BATCHES and net["auto_batch"] == 4 and net["auto_batch_uncapped"] >= 4
        assert finite_positive(net["parameters"]) and finite_positive(net["flops_per_image_nfe"])

    rows = result["rows"]
    cells = [(r["network"], r["option"], r["batch"], r["solver"]) for r in rows]
    expected = [(n, o, b, s) for n in NETWORKS for o in OPTIONS for b in TINY_BATCHES for s in SOLVERS]
    assert sorted(cells) == sorted(expected)  # each cell exactly once
    for r in rows:
        if r["status"] != "ok":  # a reduced precision may fail (an unsupported op): then skipped, with the reason
            assert r["option"] not in ("float32", "tf32") and r["status"] == "skipped" and r["reason"], r
            continue
        assert r["nfe"] == 3 and len(r["times_ms"]) == r["repeats"] == 3
        assert all(finite_positive(t) for t in r["times_ms"])
        for key in ("median_ms", "ms_per_nfe", "images_per_s", "images_per_s_at_recommended_nfe", "tflops"):
            assert finite_positive(r[key]), (key, r)
        assert r["peak_memory_bytes"] is None  # CUDA only
        assert math.isclose(r["images_per_s"], r["batch"] / (r["median_ms"] / 1e3))
        for key in ("max_abs_diff_float", "max_abs_diff_uint8", "frac_uint8_pixels_differing",
                    "rerun_max_abs_diff_float"):
            assert finite_nonnegative(r[key]), (key, r)
        if r["option"] == "float32":  # against itself (last repeat vs first): deterministic on a CPU
            assert r["max_abs_diff_float"] == r["max_abs_diff_uint8"] == r["rerun_max_abs_diff_float"] == 0
            assert r["frac_uint8_pixels_differing"] == 0
    assert all(r["status"] == "ok" for r in rows if r["option"] in ("float32", "tf32"))

    accuracy = result["accuracy"]
    assert sorted((r["network"], r["option"], r["solver"]) for r in accuracy) == sorted(
        (n, o, s) for n in NETWORKS for o in OPTIONS for s in SOLVERS)
    for r in accuracy:
        if r["status"] != "ok":
            assert r["option"] not in ("float32", "tf32") and r["reason"], r
            continue
        assert r["nfe"] == 7 and r["batch"] == 2
        assert finite_nonnegative(r["max_abs_diff_float"]) and finite_nonnegative(r["max_abs_diff_uint8"])
        if r["option"] in ("float32", "tf32"):  # tf32 is float32 on a CPU
            assert r["max_abs_diff_float"] == r["max_abs_diff_uint8"] == 0, r
        if r["option"] == "bf16":  # a real change of precision shows
            assert r["max_abs_diff_float"] > 0, r


def test_tiny_markdown_has_every_table(tiny_run):
    out, _ = tiny_run
    md = (out / "gpu.md").read_text()
    assert "**Tiny mode**" in md and "Run it: `python benchmarks/bench_gpu.py` on one CUDA GPU" in md
    for heading in ("## Networks", "## Summary", "## Accuracy against float32", "## cifar10-ddpmpp: every timing cell",
                    "## imagenet-adm: every timing cell"):
        assert heading in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    for network in NETWORKS:
        for option in OPTIONS:
            for solver in SOLVERS:
                for batch in TINY_BATCHES:
                    label = f"{batch} (auto)" if batch == TINY_BATCHES[-1] else str(batch)
                    assert any(line.startswith(f"| {option} | {label} | {solver} |") for line in table_rows)
                assert any(line.startswith(f"| {network} | {option} | {solver} |") for line in table_rows)
    assert "nan" not in md.lower()


def test_device_cuda_is_refused_in_one_line_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = run_script("--device", "cuda", "--tiny", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CUDA is not available"), proc.stderr
    assert not (tmp_path / "out").exists()


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "needs a CUDA GPU"),  # no GPU here (skipped otherwise): one line pointing at --tiny
        (["--tiny"], "--tiny needs --out DIR"),
        (["--tiny", "--out", "X", "--repeats", "0"], "--repeats must be in 1..100"),
        (["--tiny", "--out", "X", "--options", "float32,int8"], "unknown option 'int8'"),
        (["--tiny", "--out", "X", "--batch-sizes", "2,big"], "'big' is neither a positive integer nor 'auto'"),
        (["--tiny", "--out", "X", "--num-steps", "1"], "--num-steps must be in 2..1000"),
        (["--tiny", "--out", "X", "--device", "nonsense"], "--device 'nonsense' is not a device"),
        (["--tiny", "--out", "X", "--bogus"], "unrecognized arguments: --bogus"),
        (["--device", "cpu"], "the full benchmark needs a CUDA GPU"),
    ],
)
def test_mistakes_end_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    if not argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    module = _load_script()
    assert module.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and message in lines[0], captured.err
    if not argv:
        assert "--tiny" in lines[0]
    assert not (tmp_path / "X").exists()


def test_unwritable_out_is_refused_before_running(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    module = _load_script()
    assert module.main(["--tiny", "--out", str(blocker / "sub")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {blocker / 'sub'}: cannot write there")


@pytest.mark.gpu
def test_tiny_on_cuda(tmp_path):
    """The CUDA path (events, peak memory, strict float32) on tiny networks: every option must run there."""
    proc = run_script("--tiny", "--device", "cuda", "--out", str(tmp_path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["machine"]["gpu"] and result["settings"]["strict_float32"] is True
    assert all(r["status"] == "ok" for r in result["rows"] + result["accuracy"]), [
        (r["option"], r["reason"]) for r in result["rows"] + result["accuracy"] if r["status"] != "ok"][:5]
    ok = result["rows"]
    assert all(finite_positive(r["peak_memory_bytes"]) for r in ok)
    assert all(r["rerun_max_abs_diff_float"] == 0 for r in ok if r["option"] == "float32")
