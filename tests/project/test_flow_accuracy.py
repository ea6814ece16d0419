"""The flow accuracy study (benchmarks/flow_accuracy.py) at tiny size: its outputs exist and hold sane fields, the
measured NFE are the budgets', errors fall with NFE, and its reference is checked against an independent solver."""

import csv

import pytest
from app_helpers import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("benchmarks/flow_accuracy.py")


@pytest.fixture(scope="module")
def study_run(study, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("flow-accuracy")
    return out_dir, study.run(num_samples=16, nfe_targets=(10, 20, 50), out_dir=out_dir, seed=0)


def test_errors_fall_with_nfe_and_nfe_is_the_budgets(study, study_run):
    _, rows = study_run
    for grid in study.GRIDS:
        for config in study.SOLVER_CONFIGS:
            mine = [r for r in rows if r["grid"] == grid and r["label"] == config.label]
            assert [r["nfe_target"] for r in mine] == [10, 20, 50]
            assert all(r["nfe"] == config.nfe(r["num_steps"]) <= r["nfe_target"] for r in mine)
            errors = [r["rms_error"] for r in mine]
            assert errors[-1] < errors[0], (grid, config.label, errors)
    # the reference against an independent solver: flow Heun at NFE 49 lands close to it
    heun = next(r for r in rows if r["label"] == "flow Heun" and r["nfe_target"] == 50 and r["grid"] == "unshifted")
    assert heun["rms_error"] < 0.02


def test_outputs(study, study_run):
    out_dir, rows = study_run
    with open(out_dir / "accuracy.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 2 * len(study.SOLVER_CONFIGS) * 3 and tuple(table[0]) == study.CSV_FIELDS
    text = (out_dir / "accuracy.md").read_text()
    assert "benchmarks/flow_accuracy.py" in text and "| BDIA-flow γ=obelm |" in text and "## What it shows" in text
    assert "measured order" in text and "beats flow Euler" in text
    assert (out_dir / "accuracy.png").stat().st_size > 10_000
