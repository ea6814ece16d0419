"""benchmarks/bench_gradients.py: one measured row in this process (tiny network), the report it writes, and (slow)
the whole tiny mode with its fresh process per row. The real numbers (results/bench/gradients.*) are not checked."""

from __future__ import annotations

import json

import pytest

from app_helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_gradients.py")


def _row(bench, method, num_steps):
    spec = dict(network="tiny", backprop=method, num_steps=num_steps, batch=2, threads=1, device="cpu",
                max_autograd_bytes=2**30, repeats=0)
    return bench.worker(spec)


def test_one_row_measures_memory_time_and_saved_bytes(bench, one_thread):
    reversible, autograd = _row(bench, "reversible", 4), _row(bench, "autograd", 4)
    for row in (reversible, autograd):
        assert row["nfe"] == 7 and row["total_s"] > 0 and row["sample_s"] > 0 and row["peak_bytes"] >= 0
        assert row["grad_norm"] > 0
    assert reversible["grad_norm"] == pytest.approx(autograd["grad_norm"], rel=1e-9)  # the same gradient
    state = 2 * 1 * 8 * 8 * 8  # one float64 state of the batch
    assert reversible["saved_bytes"] <= 3 * state < autograd["saved_bytes"]  # start + final pair vs every activation


def test_autograd_beyond_the_memory_cap_is_not_run_and_says_why(bench, one_thread):
    spec = dict(network="tiny", backprop="autograd", num_steps=4, batch=2, threads=1, device="cpu",
                max_autograd_bytes=1, repeats=0)
    row = bench.worker(spec)
    assert "peak_bytes" not in row and row["skipped"].startswith("would need")


def test_report_tables_plot_and_flatness(bench, tmp_path):
    rows = []
    for method, peaks in (("reversible", (100, 104)), ("checkpoint", (120, 300)), ("autograd", (400, None))):
        for n, peak in zip((10, 100), peaks):
            row = dict(network="digits", backprop=method, num_steps=n, nfe=2 * n - 1)
            if peak is None:
                row["skipped"] = "would need ~9.0 GiB (estimated; > --max-autograd-gib 4)"
            else:
                row.update(peak_bytes=peak * 2**20, saved_bytes=2**20, sample_s=1.0, forward_s=1.1, backward_s=2.0,
                           total_s=3.1)
            rows.append(row)
    result = dict(rows=rows, networks=["digits"], batch={"digits": 16}, repeats={"digits": 1}, device="cpu",
                  memory_measure="peak RSS", memory_measure_short="CPU peak RSS", time_measure="CPU time",
                  machine=dict(platform="test", torch="x", torch_threads=1), accuracy=[
                      dict(dtype="float64", gamma=0.5, num_steps=18, gradient_error=1e-15, recovery_error=1e-14,
                           predicted_error=1e-11, warned=False)],
                  accuracy_batch=4, accuracy_network="digits")
    assert bench.flatness(rows, "digits", "reversible") == pytest.approx(0.04)
    assert bench.flatness(rows, "digits", "autograd") is None
    bench.write_markdown(tmp_path / "g.md", result)
    text = (tmp_path / "g.md").read_text()
    assert "| autograd | 100 | 199 | not run: would need ~9.0 GiB" in text
    assert "| reversible | 10 | 19 | 100.0 | — | 1,024 | 1.00 | 1.10 | 2.00 | 3.10 | 2.00 |" in text
    assert "reversible +4 %, checkpoint +150 %" in text
    bench.write_plot(tmp_path / "g.png", result)
    assert (tmp_path / "g.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tiny_mode_end_to_end(tmp_path):
    import subprocess
    import sys

    from app_helpers import REPO, subprocess_env

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gradients.py"), "--tiny", "--out-dir",
                           str(tmp_path)], env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gradients.json").read_text())
    assert {r["backprop"] for r in result["rows"]} == {"reversible", "checkpoint", "autograd"}
    assert all("peak_bytes" in r for r in result["rows"]) and len(result["accuracy"]) == 8
    assert (tmp_path / "gradients.md").is_file() and (tmp_path / "gradients.png").is_file()
