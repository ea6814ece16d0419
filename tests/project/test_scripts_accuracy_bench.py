"""The accuracy study (benchmarks/solver_accuracy.py) and the overhead benchmark (benchmarks/bench_solvers.py) at tiny
size: their outputs exist and hold sane fields, and every solver's error against the reference ODE solution falls
with NFE. No timing thresholds."""

import csv
import json
import math

import pytest
from app_helpers import load_script
import torch



@pytest.fixture(scope="module")
def accuracy():
    return load_script("benchmarks/solver_accuracy.py")


@pytest.fixture(scope="module")
def accuracy_run(accuracy, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("accuracy")
    rows = accuracy.run(num_samples=16, nfe_targets=(10, 20, 50), out_dir=out_dir, seed=0, other_seeds=(1,), other_seeds_samples=8)
    return out_dir, rows


def test_accuracy_error_falls_with_nfe_for_every_solver(accuracy, accuracy_run):
    _, rows = accuracy_run
    for config in accuracy.SOLVER_CONFIGS:
        mine = [r for r in rows if r["label"] == config.label]
        assert [r["nfe_target"] for r in mine] == [10, 20, 50]
        errors = [r["rms_error"] for r in mine]
        assert all(later < earlier for earlier, later in zip(errors, errors[1:])), (config.label, errors)
    # An independent check of the reference: a second-order solver lands close to it at NFE about 50.
    edm_50 = next(r for r in rows if r["label"] == "edm" and r["nfe_target"] == 50)
    assert edm_50["rms_error"] < 0.05


def test_accuracy_measured_nfe_matches_budget(accuracy, accuracy_run):
    _, rows = accuracy_run
    for config in accuracy.SOLVER_CONFIGS:
        for r in (r for r in rows if r["label"] == config.label):
            assert r["nfe"] == config.nfe(r["num_steps"]) <= r["nfe_target"]
            assert config.nfe(r["num_steps"] + 1) > r["nfe_target"]  # the most steps that fit the budget


def test_accuracy_outputs(accuracy, accuracy_run):
    out_dir, rows = accuracy_run
    with open(out_dir / "solver_accuracy.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(accuracy.SOLVER_CONFIGS) * 3
    assert tuple(table[0]) == accuracy.CSV_FIELDS
    for row in table:
        assert int(row["nfe"]) > 0 and math.isfinite(float(row["rms_error"])) and float(row["max_abs_error"]) > 0
    text = (out_dir / "solver_accuracy.md").read_text()
    assert "benchmarks/solver_accuracy.py" in text and "| bdia_edm γ=0.5 |" in text
    assert "## What it shows" in text and "## Other problem seeds" in text and "seeds 1;" in text
    assert (out_dir / "solver_accuracy.png").stat().st_size > 10_000


def test_reference_velocity_is_the_solvers_ode(accuracy):
    denoiser, x_init = accuracy.make_problem(num_samples=4, seed=1)
    accuracy.check_velocity(accuracy.MixtureVelocity(denoiser), denoiser, x_init)  # raises on a mismatch


@pytest.fixture
def one_torch_thread():
    """As the bench's command line does by default: on a busy shared CPU, extra threads make the UNet erratic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_bench_outputs_at_tiny_size(tmp_path, one_torch_thread):
    bench = load_script("benchmarks/bench_solvers.py")
    report = bench.run(batch=1, steps=3, repeats=1, image_size=16, device="cpu", out_dir=tmp_path)
    saved = json.loads((tmp_path / "solver_overhead.json").read_text())
    assert saved["settings"]["num_steps"] == 3 and saved["machine"]["torch"] and saved["machine"]["device"] == "cpu"
    assert [(p["base"], p["bdia"]) for p in saved["pairs"]] == [("ddim", "bdia_ddim"), ("edm", "bdia_edm")]
    for pair in saved["pairs"]:
        assert pair["nfe_base"] == pair["nfe_bdia"] == (3 if pair["base"] == "ddim" else 5)
        positive = ("ratio_median", "cpu_time_ratio_median", "null_ratio_median", "expected_ratio", "ms_per_step_base")
        for key in positive:
            assert math.isfinite(pair[key]) and pair[key] > 0, key
        assert 0 < pair["outside_network_share_base"] < 1 and 0 < pair["outside_network_share_bdia"] < 1
        assert all(len(times) == 1 for times in pair["times_s"].values())
    assert saved["pairs"][0]["ratio_median"] == report["pairs"][0]["ratio_median"]
    text = (tmp_path / "solver_overhead.md").read_text()
    assert "bdia_ddim (0.5)" in text and "bdia_edm (0.5)" in text and "torch" in text


def test_roundtrip_bench_at_tiny_size(tmp_path, one_torch_thread):
    bench = load_script("benchmarks/bench_roundtrip.py")
    report = bench.run(batch=1, steps=[4], gammas=[0.5, 1.0], out_dir=tmp_path)
    rows = json.loads((tmp_path / "roundtrip.json").read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 and rows == report["rows"]  # 3 set-ups x 2 solvers x 2 gammas
    for row in rows:
        if row["setup"] == "analytic GMM" and row["dtype"] == "float64":
            assert row["inversion_error"] < 1e-12 and row["regeneration_error"] < 1e-12
        if row["dtype"] == "float32":  # the state's rounding shows, but the round trip still holds to ~1e-5
            assert 1e-9 < row["inversion_error"] < 1e-3
        assert row["predicted"] > 0
    text = (tmp_path / "roundtrip.md").read_text()
    assert "| analytic GMM | float32 | bdia_edm | 4 | 1.0 |" in text and (tmp_path / "roundtrip.png").is_file()
