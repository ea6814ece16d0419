"""Sharded evaluation: two torchrun CPU processes (gloo) give the statistics, FD and KID of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdia.metrics import DigitsFD, digits_uint8
from bdia.metrics.evaluate import evaluate_run

REPO = Path(__file__).resolve().parents[2]


def _make_run(folder: Path, count: int = 151) -> Path:
    images, _ = digits_uint8("train")
    folder.mkdir(parents=True)
    np.savez(folder / "images.npz", images=images[:count], seeds=np.arange(count, dtype=np.int64))
    (folder / "metrics.json").write_text(json.dumps({"solver": "test", "num_images": count}))
    # a finished run's marker (bdia.runfolder): evaluate writes metrics.json only into finished bdia run folders
    (folder / ".bdia-run.json").write_text(json.dumps({"app": "sample", "format": 2, "state": "complete"}))
    return folder


def test_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    run = _make_run(tmp_path / "run")  # odd count: the two shards differ in size
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "scripts" / "evaluate.py"), f"run_dir={run}", "metrics.digits.kid_subsets=10",
               "metrics.digits.batch_size=32", "metrics.digits.real_floor=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("evaluate: ") == 1, result.stdout  # rank 0 alone prints its summary (and writes)
    assert result.stdout.count("written to") == 1, result.stdout
    distributed = json.loads((run / "metrics.json").read_text())["evaluation"]["digits"]
    assert json.loads((run / "metrics.json").read_text())["solver"] == "test"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun ranks' setting (OMP_NUM_THREADS=1 above)
    try:
        single = evaluate_run(run, {"digits": DigitsFD(kid_subsets=10, batch_size=32, real_floor=False)}, write=False)
    finally:
        torch.set_num_threads(threads)
    single = single["digits"]
    assert distributed["num_images"] == single["num_images"] == 151
    # The ranks run the classifier on other batches (76 + 75 rows) than one process (151 rows); float32
    # convolutions may round a row differently with the batch shape or the CPU's kernels (a few ulps, ~1e-7
    # relative), which FD and KID inherit. A wrong reduction (a shard lost or counted twice) moves them by
    # percents. The reduction itself is checked exactly in the next test.
    for key in ("fd", "kid", "kid_std"):
        assert distributed[key] == pytest.approx(single[key], rel=1e-5, abs=1e-9), key


def test_torchrun_reference_statistics_equal_one_process(tmp_path):
    """scripts/fid_ref.py on two gloo ranks: n, mu, sigma (float64 all-reduce) and the gathered features in
    image order equal a one-process computation."""
    from bdia.metrics import DigitsFeatures
    from bdia.metrics.features import feature_statistics
    from bdia.metrics.frechet import FeatureStats

    run = _make_run(tmp_path / "run", count=97)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "BDIA_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "ref.npz"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "scripts" / "fid_ref.py"), f"source={run}", "features=digits", "save_features=true",
               f"out={out}", "batch_size=16", "progress=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    stats, features = feature_statistics(run, DigitsFeatures(), batch_size=16, return_features=True)
    with np.load(out) as data:
        assert int(data["num_images"]) == stats.n == 97
        # The float64 all-reduce of the ranks' sums equals one float64 pass over the very features the ranks
        # computed (gathered in image order): exact up to float64 summation order.
        exact = FeatureStats(data["features"].shape[1]).update(torch.from_numpy(data["features"]))
        np.testing.assert_allclose(data["mu"], exact.mu, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(data["sigma"], exact.sigma, rtol=1e-10, atol=1e-12)
        # Against one process computing its own features: float32 features agree to a few ulps (batch shapes
        # and CPU kernels may differ, see above), so the statistics do too.
        np.testing.assert_allclose(data["features"], features.numpy(), rtol=1e-5, atol=1e-5)
        scale = np.abs(stats.sigma).max()
        np.testing.assert_allclose(data["mu"], stats.mu, rtol=1e-5, atol=1e-6 * np.abs(stats.mu).max())
        np.testing.assert_allclose(data["sigma"], stats.sigma, rtol=1e-5, atol=1e-6 * scale)
    card = json.loads((tmp_path / "ref.npz.json").read_text())
    assert card["num_images"] == 97 and len(card["sha256"]) == 64
