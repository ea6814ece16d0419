"""Inverting a sampling run's records (bdia.metrics.inversion): with the run's own network batch a record goes back
to its seed's noise to round-off, whatever batch the run used, and regenerates itself; the CLI does it through
``scripts/evaluate.py <run folder> metrics=inversion``."""

from __future__ import annotations

import json

import pytest

from app_helpers import REPO, cli, write_tiny_edm
from bdia.apps.sample import sample_run
from bdia.metrics.inversion import invert_run_records
from bdia.models import edm_network

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def network_file(tmp_path_factory):
    return write_tiny_edm(tmp_path_factory.mktemp("net") / "cond.pkl", label_dim=10)


def _sample(network_file, out_dir, network_batch, solver="bdia_ddim", save_states=True, **kwargs):
    model_cfg = {"_target_": "bdia.models.edm_network", "name": None, "path": str(network_file)}
    return sample_run(edm_network(path=str(network_file)), solver=solver, num_steps=6, seeds="0-4", batch_size=2,
                      network_batch=network_batch, out_dir=out_dir, save_states=save_states, progress=False,
                      config={"model": model_cfg}, **kwargs)


@pytest.mark.parametrize("network_batch", [3, 8])
def test_records_invert_to_their_noise_with_the_runs_network_batch(network_file, tmp_path, network_batch):
    """Float32 network, float64 states: the round trip is exact up to the states' round-off when the network sees
    the rows it saw while sampling (3 per call, the last call padded; or 8 per call, one padded call)."""
    _sample(network_file, tmp_path / "run", network_batch, gamma=1.0)
    result = invert_run_records(tmp_path / "run", batch_size=4)  # another solver batch than sampling's (2)
    assert result["network_batch"] == result["run_network_batch"] == network_batch
    assert result["num_images"] == 5 and result["images_identical"] == 5
    # States of size ~80 at sigma_max: 1e-9 relative is ~1e5 float64 roundings, far below float32's 1e-7.
    assert result["noise_relative_error"] < 1e-9 and result["pair_relative_error"] < 1e-9, result
    assert result["noise_max_abs_error"] < 1e-7


def test_bdia_edm_records_and_a_seed_subset_invert_too(network_file, tmp_path):
    _sample(network_file, tmp_path / "run", 3, solver="bdia_edm", gamma=0.9)
    result = invert_run_records(tmp_path / "run", seeds="1,3")
    assert result["num_images"] == 2 and result["solver"] == "bdia_edm" and result["images_identical"] == 2
    assert result["noise_relative_error"] < 1e-9 and result["pair_relative_error"] < 1e-9, result
    states = invert_run_records(tmp_path / "run", seeds=[1], return_states=True)["states"]
    assert set(states) == {1} and states[1]["noise_pair"][0].shape == (3, 8, 8)


def test_runs_that_cannot_be_inverted_say_why(network_file, tmp_path):
    _sample(network_file, tmp_path / "edm", 3, solver="edm")
    with pytest.raises(ValueError, match="no exact inverse"):
        invert_run_records(tmp_path / "edm")
    _sample(network_file, tmp_path / "nostates", 3, save_states=False, gamma=1.0)
    with pytest.raises(ValueError, match="save_states=true"):
        invert_run_records(tmp_path / "nostates")
    with pytest.raises(ValueError, match="not in the run"):
        invert_run_records(tmp_path / "nostates", seeds="7")


def test_evaluate_inverts_a_runs_records_from_the_command_line(network_file, tmp_path, monkeypatch):
    run = tmp_path / "results" / "sample" / "x" / "solver=bdia_ddim,solver.gamma=1.0"  # a name as Hydra makes them
    _sample(network_file, run, 3, gamma=1.0)
    assert cli(monkeypatch, tmp_path, str(run.relative_to(tmp_path)), "metrics=inversion",
               script=REPO / "scripts" / "evaluate.py") is None
    inversion = json.loads((run / "metrics.json").read_text())["evaluation"]["inversion"]
    assert inversion["num_images"] == 5 and inversion["noise_relative_error"] < 1e-9
    assert inversion["network_batch"] == 3
