"""The BDIA-EDM solver study (benchmarks/solver_study.py) at smoke size: it runs end to end, NFE is the counted
one, every BDIA candidate round-trips exactly at gamma >= 0.9, and the default is chosen by the stated rule.
No timing thresholds, no golden numbers."""

import csv
import math

import pytest
from app_helpers import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("benchmarks/solver_study.py")


@pytest.fixture(scope="module")
def smoke(study, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("study")
    result = study.run(num_seeds=6, nfe_targets=(5, 9), out_dir=out_dir, reference_steps=20, check_seeds=4,
                       candidates=study.SMOKE_CANDIDATES, workers=1, progress=False)
    return out_dir, result


def test_smoke_study_writes_its_outputs(study, smoke):
    out_dir, result = smoke
    rows = result["rows"]
    assert len(rows) == len(study.SMOKE_CANDIDATES) * 2 * len(study.PROBLEMS)
    with open(out_dir / "solver_study.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == set(study.CSV_FIELDS)
    text = (out_dir / "solver_study.md").read_text()
    assert "make study" in text and "wall time" in text and "| edm |" in text
    assert (out_dir / "solver_study.png").stat().st_size > 10_000
    for r in rows:
        assert math.isfinite(r["rms_error"]) and r["rms_error"] > 0 and math.isfinite(r["fd"])


def test_nfe_is_the_counted_one_and_within_budget(study, smoke):
    for r in smoke[1]["rows"]:
        assert r["nfe"] <= r["nfe_target"]
    edm = {r["nfe_target"]: r["nfe"] for r in smoke[1]["rows"] if r["label"] == "edm"}
    assert edm == {5: 5, 9: 9}


def test_every_bdia_candidate_round_trips_at_gamma_09_and_1(study, smoke):
    trips = [t for t in smoke[1]["roundtrips"] if isinstance(t[1], float) and t[1] >= 0.9]
    assert len(trips) == 2 * sum(c.is_bdia for c in study.SMOKE_CANDIDATES)
    for label, gamma, noise_err, regen_err in trips:
        assert noise_err <= 1e-10 and regen_err <= 1e-10, (label, gamma, noise_err, regen_err)


def test_choose_default_follows_the_bar(study):
    def v(ratios):
        flat = list(ratios)
        return {"ratios": {}, "max_ratio": max(flat), "beats_everywhere": max(flat) < 1,
                "meets_bar": max(flat) <= study.RATIO_BAR, "score": math.exp(sum(map(math.log, flat)) / len(flat))}

    everywhere = {"a": v([0.9, 0.95]), "b": v([0.5, 1.2]), "c": v([0.99, 0.98])}
    assert study.choose_default(everywhere) == ("a", True)  # beats EDM everywhere wins over a lower score
    bar_only = {"b": v([0.5, 1.2]), "d": v([0.3, 2.0])}
    assert study.choose_default(bar_only) == ("b", True)
    none = {"d": v([0.3, 2.0]), "e": v([1.1, 2.5])}
    assert study.choose_default({k: {**x, "meets_bar": False} for k, x in none.items()}) == ("d", False)


def test_candidate_nfe_formula(study):
    heun = study._edm(0.5, "vp", "heun", 0.5)
    assert heun.nfe(5) == 2 * 5 - 1 + 4 and heun.steps_for(15) == 5
    assert study.Candidate("ddim").steps_for(9) == 9 and study.Candidate("edm").steps_for(9) == 5
