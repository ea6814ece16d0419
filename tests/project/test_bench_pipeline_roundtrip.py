"""benchmarks/bench_pipeline_roundtrip.py in its smallest mode: the README's pipeline round-trip numbers come from
it; float64 stays at round-off, float32 does not."""

from __future__ import annotations

import json

from app_helpers import load_script


def test_pipeline_round_trip_benchmark_writes_its_table(tmp_path, one_thread, tiny_sd_dir):
    main = load_script("benchmarks/bench_pipeline_roundtrip.py").main
    assert main(["--steps", "4", "--gammas", "1", "--guidance", "3", "--model", str(tiny_sd_dir),
                 "--out-dir", str(tmp_path)]) == 0
    rows = {r["dtype"]: r["relative_error"] for r in json.loads((tmp_path / "pipeline_roundtrip.json").read_text())["rows"]}
    assert rows["float64"] < 1e-9 < rows["float32"] < 1.0, rows
    text = (tmp_path / "pipeline_roundtrip.md").read_text()
    assert "| float32 | 4 | 1 | " in text and "| float64 | 4 | 1 | " in text and "guidance 3" in text
