"""The sampler study (benchmarks/sampler_study.py, `make samplers`) at smoke size: it runs end to end on its three
problems, NFE is the counted one and within budget, the references are independent of the solvers they judge,
every invertible candidate round-trips in float64, and the recommendation follows the stated rule. No timing
thresholds, no golden numbers."""

import csv
import math

import pytest
import torch
from app_helpers import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("benchmarks/sampler_study.py")


@pytest.fixture(scope="module")
def smoke(study, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("samplers")
    candidates = tuple(c for c in study.CANDIDATES if c.label in ("dpmpp_2m", "bdia_ddim γ=obelm_mix", "rex euler"))
    result = study.run(num_seeds=6, sharp_seeds=8, nfe_targets=(5, 9), extra_nfe=(), out_dir=out_dir,
                       reference_steps=12, check_seeds=4, candidates=candidates, check_seed=None, workers=1,
                       quick=True, progress=False)
    return out_dir, result, candidates


def test_smoke_study_writes_its_outputs(study, smoke):
    out_dir, result, candidates = smoke
    rows = result["rows"]
    assert len(rows) == len(candidates) * 2 * len(study.PROBLEMS)
    with open(out_dir / "samplers.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == set(study.CSV_FIELDS)
    text = (out_dir / "samplers.md").read_text()
    assert "make samplers" in text and "wall time" in text and "| dpmpp_2m |" in text and "quick mode" in text
    assert "Recommended invertible sampler" in text and "BELM issue 13" in text
    assert (out_dir / "samplers.png").stat().st_size > 10_000
    for r in rows:
        assert math.isfinite(r["rms_error"]) and r["rms_error"] > 0 and r["q50"] <= r["q99"] <= r["max"]
        assert 0 <= r["flips"] <= (8 if r["problem"] == "sharp64" else 6)
        assert math.isfinite(r["fd"]) == (r["problem"] != "sharp64")  # FD only on the 16x16 problems


def test_nfe_is_the_counted_one_and_within_budget(smoke):
    for r in smoke[1]["rows"]:
        assert r["nfe"] <= r["nfe_target"]
    rex = {r["nfe_target"]: (r["num_steps"], r["nfe"]) for r in smoke[1]["rows"] if r["label"] == "rex euler"}
    assert rex == {5: (3, 5), 9: (5, 9)}  # 2 (N - 1) + 1


def test_every_invertible_candidate_round_trips_in_float64(smoke):
    trips = [t for t in smoke[1]["roundtrips"] if t["dtype"] == "float64"]
    assert len(trips) == 2 * 2  # two invertible candidates, on mixture and digits
    for t in trips:
        assert t["noise_error"] <= 1e-8 and t["regen_error"] <= 1e-10, t
        assert t["nfe_sample"] <= 25 and t["nfe_invert"] <= t["nfe_sample"] + 1


def test_reference_velocity_is_bdias_ode_and_its_solution_is_accurate(study):
    den = study.make_denoiser("sharp64")
    noise = study.seed_noise(range(3), (1, 8, 8), study.SIGMA_MAX)
    study.check_velocity(study.MixtureVelocity(den), den, noise)
    fine, _ = study.solve_reference(den, noise, 1e-10)
    loose, _ = study.solve_reference(den, noise, 1e-6)
    assert (fine - loose).abs().max() < 1e-4
    # it is the ODE bdia's solvers solve: UniPC-3 with many steps lands on it
    x = study.bdia.sample(den, noise, study.bdia.karras_sigmas(400), solver="unipc", order=3)
    assert (x - fine).abs().max() < 1e-3


def test_choose_invertible_follows_the_rule(study):
    C = study.Candidate
    rows = []
    for problem in study.GOAL_PROBLEMS:
        for t in study.GOAL_NFE:
            for label, inv, err in (("fast", False, 1.0), ("a", True, 1.1), ("b", True, 0.9 if t == 5 else 1.5)):
                rows.append({"problem": problem, "label": label, "invertible": inv, "nfe_target": t, "nfe": t,
                             "rms_error": err})
    chosen, table = study.choose_invertible(rows, (C("fast", "ddim"), C("a", "rex", (), True), C("b", "rex", (), True)))
    assert chosen == "a"  # geo. mean 1.1 beats b's (0.9 * 1.5^4)^(1/5) ~ 1.36, though b wins at NFE 5
    assert table["a"]["max_ratio"] == pytest.approx(1.1) and table["b"]["max_ratio"] == pytest.approx(1.5)


def test_flip_analysis_changes_one_thing_at_a_time(smoke, study):
    (result,) = smoke[1]["flips"]
    variants = {(r["label"], r["variant"]) for r in result["rows"]}
    assert ("bdia_ddim γ=obelm", "exact first step") in variants and ("bdia_ddim γ=obelm", "gamma capped at 1") in variants
    assert ("dpmpp_2m", "exact first step") not in variants  # not a two-state solver
    assert all(0 <= r[f"flips_{n}"] <= 8 for r in result["rows"] for n in study.FLIP_NFE)
    assert 0 <= result["margin_all_median"] <= 1
    capped = study._capped_obelm(study.bdia.karras_sigmas(15))
    assert max(capped) <= 1 and max(study.bdia.gamma_schedule("obelm", study.bdia.karras_sigmas(15), "bdia_ddim")) > 1
    assert torch.is_tensor(smoke[1]["rows"][0]["rms_error"]) is False
