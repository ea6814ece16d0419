"""Image sources, reconstruction metrics, the EDM seed-block protocol, and scripts/evaluate.py (configs, merging
into metrics.json, sweeps, the logger contract, one-line errors)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdia.apps.cli import app_config_dir
from bdia.metrics import (
    FID,
    DigitsFD,
    DigitsFeatures,
    Reconstruction,
    digits_uint8,
    evaluate_runs,
    find_runs,
    flatten_numbers,
    latent_metrics,
    merge_metrics_json,
    open_images,
    pixel_metrics,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = app_config_dir("evaluate")  # configs/evaluate/ (its search path: bdia.apps.cli.APP_CONFIGS)


def _run_folder(folder: Path, images: np.ndarray, seeds=None, metrics=None) -> Path:
    folder.mkdir(parents=True)
    seeds = np.arange(len(images)) if seeds is None else np.asarray(seeds)
    np.savez(folder / "images.npz", images=images, seeds=seeds)
    (folder / "metrics.json").write_text(json.dumps(metrics or {"solver": "bdia_edm", "nfe": 35}))
    # a finished run's marker (bdia.runfolder): evaluate writes metrics.json only into finished bdia run folders
    (folder / ".bdia-run.json").write_text(json.dumps({"app": "sample", "format": 2, "state": "complete"}))
    return folder


# --------------------------------------------------------------------------------------------------
# Image sources.


def test_open_images_from_every_kind_of_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)
    gray = images[:, :1]
    run = _run_folder(tmp_path / "run", images, seeds=[10, 11, 12, 13, 14])
    (tmp_path / "pngs").mkdir()
    for seed, image in zip([3, 4, 5, 6, 7], gray):
        Image.fromarray(image[0]).save(tmp_path / "pngs" / f"{seed:06d}.png")
    np.savez(tmp_path / "nhwc.npz", arr_0=images.transpose(0, 2, 3, 1))

    from_run = open_images(run)
    assert np.array_equal(from_run.all().numpy(), images) and from_run.seeds.tolist() == [10, 11, 12, 13, 14]
    from_pngs = open_images(tmp_path / "pngs")
    assert np.array_equal(from_pngs.all().numpy(), gray) and from_pngs.seeds.tolist() == [3, 4, 5, 6, 7]
    assert np.array_equal(open_images(tmp_path / "nhwc.npz").all().numpy(), images)
    assert np.array_equal(open_images(torch.from_numpy(images)).batch([4, 0]).numpy(), images[[4, 0]])
    assert open_images(tmp_path / "pngs").subset([1, 2]).seeds.tolist() == [4, 5]

    with pytest.raises(ValueError, match="no such file"):
        open_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="uint8"):
        open_images(images.astype(np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        open_images(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Reconstruction.


def test_reconstruction_metrics_closed_forms():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1  # image 0: constant error 0.1 -> MSE 0.01, PSNR 10 log10(4 / 0.01); image 1 exact
    y[0, 0, 0, 0] = -0.5
    out = pixel_metrics(x, y)
    mse0 = (47 * 0.01 + 0.25) / 48
    assert out["mse_per_image"] == pytest.approx([mse0, 0.0])
    assert out["mse"] == pytest.approx(mse0 / 2)
    assert out["psnr_per_image"][0] == pytest.approx(10 * math.log10(4 / mse0)) and out["psnr_per_image"][1] == math.inf
    assert out["max_abs_error"] == pytest.approx(0.5) and out["data_range"] == 2.0
    latent = latent_metrics(torch.ones(3, 4), torch.ones(3, 4) * 1.01, per_image=False)
    assert "psnr" not in latent and latent["relative_error"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_metrics(torch.zeros(1, 2), torch.zeros(1, 3))


def test_reconstruction_metric_matches_images_by_seed(tmp_path):
    images = np.random.default_rng(1).integers(0, 250, (4, 1, 8, 8), dtype=np.uint8)
    ref = _run_folder(tmp_path / "original", images, seeds=[0, 1, 2, 3])
    regenerated = images[[2, 0]].copy()
    regenerated[0, 0, 0, 0] += 3
    out = Reconstruction(reference=str(ref))(open_images(regenerated, seeds=[2, 0]))
    assert out["max_abs_error"] == 3.0 and out["mse"] == pytest.approx(9 / 64 / 2)
    assert out["data_range"] == 255.0


# --------------------------------------------------------------------------------------------------
# EDM protocol: FID per seed block, minimum over blocks (a digits extractor stands in for Inception).


def test_edm_protocol_reports_every_seed_block_and_the_minimum(tmp_path):
    train, _ = digits_uint8("train")
    images = train[:90]
    fid = FID(ref="digits-test", protocol="edm", num_images=30, seed_blocks=["0-29", "30-59", "60-89"],
              device="cpu", progress=False)
    fid._extractor = DigitsFeatures()
    seeds = np.random.default_rng(0).permutation(90)  # blocks are chosen by seed, not by position
    out = fid(open_images(images, seeds=seeds))
    assert set(out["fid_blocks"]) == {"0-29", "30-59", "60-89"}
    assert out["fid"] == min(out["fid_blocks"].values()) and out["num_images"] == 30

    single = FID(ref="digits-test", device="cpu", progress=False)
    single._extractor = fid._extractor
    block = single(images[np.isin(seeds, np.arange(30, 60))])
    # 30 images in 64-D: singular covariances, good to ~1e-6 (see test_frechet_distance_singular_covariances_stay_real)
    assert out["fid_blocks"]["30-59"] == pytest.approx(block["fid"], rel=1e-5)

    with pytest.raises(ValueError, match="needs all 30 images with seeds 0-29; found 29"):
        fid(open_images(images[:80], seeds=seeds[:80]))
    with pytest.raises(ValueError, match="exactly num_images"):
        FID(protocol="edm", num_images=50_000, seed_blocks=["0-9"], device="cpu")
    with pytest.raises(ValueError, match="backend"):
        FID(backend="tensorflow", device="cpu")


# --------------------------------------------------------------------------------------------------
# Evaluating runs.


def test_merge_keeps_the_run_numbers_and_other_metrics(tmp_path):
    run = _run_folder(tmp_path / "run", np.zeros((2, 1, 16, 16), np.uint8))
    merge_metrics_json(run, {"digits": {"fd": 1.0}})
    merge_metrics_json(run, {"clip": {"clip_score": 30.0, "x": math.inf}})
    merge_metrics_json(run, {"digits": {"fd": 2.0}})
    data = json.loads((run / "metrics.json").read_text())
    assert data["nfe"] == 35 and data["evaluation"] == {"digits": {"fd": 2.0}, "clip": {"clip_score": 30.0, "x": "inf"}}
    assert flatten_numbers({"digits": {"fd": 2.0, "ref": {"n": 5}, "label": "x", "list": [1]}}) == {
        "evaluation/digits/fd": 2.0, "evaluation/digits/ref/n": 5}
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # no temporary file left behind


class RecordingLogger:
    def __init__(self):
        self.calls = []

    def start(self, config, run_dir, name, group):
        self.calls.append(("start", Path(run_dir).name, name, group))

    def log_metrics(self, metrics):
        self.calls.append(("log", metrics))

    def finish(self):
        self.calls.append(("finish",))


def test_sweep_evaluates_every_run_and_logs_each(tmp_path):
    train, labels = digits_uint8("train")
    sweep = tmp_path / "sweep"
    _run_folder(sweep / "gamma=0.5", train[:100])
    _run_folder(sweep / "gamma=1.0", train[labels == 3][:100])
    (sweep / "notes").mkdir()
    unfinished = _run_folder(sweep / "gamma=2.0", train[:10])
    (unfinished / "metrics.json").unlink()  # sample_run writes metrics.json last: no metrics.json = unfinished
    assert [p.name for p in find_runs(sweep)] == ["gamma=0.5", "gamma=1.0"]
    with pytest.raises(ValueError, match="unfinished"):
        find_runs(unfinished)
    logger = RecordingLogger()
    results = evaluate_runs(sweep, {"digits": DigitsFD(kid_subsets=3, real_floor=False)}, logger=logger, config={"a": 1})
    assert len(results) == 2 and not (unfinished / "metrics.json").exists()
    starts = [c for c in logger.calls if c[0] == "start"]
    assert starts == [("start", "gamma=0.5", "gamma=0.5", "sweep"), ("start", "gamma=1.0", "gamma=1.0", "sweep")]
    logged = [c[1] for c in logger.calls if c[0] == "log"]
    assert "evaluation/digits/fd" in logged[0] and "evaluation/digits/kid" in logged[0]
    fd_threes = json.loads((sweep / "gamma=1.0" / "metrics.json").read_text())["evaluation"]["digits"]["fd"]
    fd_mixed = json.loads((sweep / "gamma=0.5" / "metrics.json").read_text())["evaluation"]["digits"]["fd"]
    assert fd_mixed < fd_threes  # one class only is far from the held-out digits
    with pytest.raises(ValueError, match="no finished run folders"):
        find_runs(sweep / "notes")


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


@pytest.mark.parametrize("choice", ["digits", "fid", "fid_edm", "clip", "reconstruction", "none", "[digits,clip]"])
def test_every_metrics_config_composes_and_keys_are_argument_names(choice):
    import inspect

    from hydra.utils import get_class

    cfg = _compose([f"metrics={choice}", "run_dir=/tmp/x"])
    for name, spec in cfg.metrics.items():
        cls = get_class(spec["_target_"])
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert set(spec) - {"_target_"} <= params, (name, set(spec) - {"_target_"} - params)
    if choice == "fid_edm":
        assert cfg.metrics.fid.protocol == "edm" and cfg.metrics.fid.backend == "clean_fid"


def test_evaluate_app_in_process_with_the_null_logger(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import evaluate as app
    finally:
        sys.path.pop(0)
    train, _ = digits_uint8("train")
    run = _run_folder(tmp_path / "run", train[:64])
    cfg = _compose([f"run_dir={run}", "metrics.digits.kid_subsets=3", "metrics.digits.real_floor=false", "logger=none"])
    results = app.evaluate_from_config(cfg)
    assert results[str(run)]["digits"]["num_images"] == 64
    assert json.loads((run / "metrics.json").read_text())["evaluation"]["digits"]["num_images"] == 64
    with pytest.raises(ValueError, match="no metrics selected"):
        app.evaluate_from_config(_compose([f"run_dir={run}", "metrics=none"]))


def test_evaluate_bad_metric_option_is_reported_as_the_metrics_own_message(tmp_path):
    from bdia.apps.cli import one_line

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import evaluate as app
    finally:
        sys.path.pop(0)
    run = _run_folder(tmp_path / "run", np.zeros((3, 1, 16, 16), np.uint8))
    with pytest.raises(ValueError) as info:  # the metric's own exception, not Hydra's wrapper (bdia.configs)
        app.evaluate_from_config(_compose([f"run_dir={run}", "metrics.digits.fd_method=magic"]))
    assert one_line(info.value) == "fd_method must be 'eigh' or 'sqrtm', got 'magic'"


def test_evaluate_cli_bad_input_is_one_line_and_exit_1(tmp_path):
    args, message = ["run_dir=/definitely/not/here"], "error: run_dir=/definitely/not/here: no such directory"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_fid_ref_script_writes_a_reference_the_metric_reads_and_reuses_it(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fid_ref
    finally:
        sys.path.pop(0)
    from hydra import compose, initialize_config_dir

    out = tmp_path / "digits-test.npz"
    with initialize_config_dir(config_dir=str(app_config_dir("fid_ref")), version_base="1.3"):
        cfg = compose(config_name="fid_ref", overrides=["source=digits-test", "features=digits", "save_features=true",
                                                         f"out={out}", "progress=false", "device=cpu"])
    first = fid_ref.compute(cfg)
    assert first["num_images"] == 597 and not first.get("reused")
    second = fid_ref.compute(cfg)
    assert second["reused"] and second["sha256"] == first["sha256"]

    train, _ = digits_uint8("train")
    on_the_fly = DigitsFD(kid_subsets=3, real_floor=False)(train[:100])
    from_file = DigitsFD(ref=str(out), kid_subsets=3, real_floor=False)(train[:100])
    assert from_file["fd"] == pytest.approx(on_the_fly["fd"], rel=1e-9)  # other batches: float32 round-off
    assert from_file["kid"] == pytest.approx(on_the_fly["kid"], rel=1e-6)
    assert from_file["reference"]["sha256"] == first["sha256"] and from_file["reference"]["num_images"] == 597
