"""bdia.logger: NullLogger, WandbLogger (offline / disabled) and the logger group (configs/loggers/logger/).

The suite runs with WANDB_MODE=disabled (conftest); tests that need a real offline run set WANDB_MODE=offline
themselves and point every wandb folder (WANDB_DIR, cache, config, data/staging) into tmp_path. An offline run
is verified by reading back the run's transaction log (``run-<id>.wandb``: wandb's LevelDB-style record log
of protobuf ``Record``s); wandb 0.31 writes no ``wandb-summary.json`` / ``config.yaml`` for offline runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdia.apps.cli import app_config_dir
from bdia.logger import NullLogger, WandbLogger, flatten_metrics

CONFIGS = app_config_dir("sample")  # an app whose config search path has configs/loggers/
LOGGER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loggers" / "logger"
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------- helpers


def _wandb_env(monkeypatch, tmp_path: Path, mode: str | None = "offline") -> None:
    """Keep every wandb folder inside tmp_path, make wandb quiet, and set (or unset) WANDB_MODE."""
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data")]:
        monkeypatch.setenv(var, str(tmp_path / "home" / sub))


@pytest.fixture
def wandb_teardown():
    """Shut wandb's service process down and drop its process-wide settings after the test."""
    yield
    import wandb

    wandb.teardown()


def _read_records(path: Path) -> list:
    """Parse a ``.wandb`` transaction log into ``wandb_internal_pb2.Record`` messages.

    Format (wandb's LevelDB-log variant): a 7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2, LE) | type (1)`` + payload; type 1 = full record, 2/3/4 = first /
    middle / last piece of a record that spans blocks; a block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            records.append(pieces + payload)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def _items(updates) -> dict:
    """``{"a/b": value}`` from a repeated ``key`` / ``nested_key`` + ``value_json`` protobuf field."""
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}


def _offline_run(run_dir: Path) -> tuple[Path, dict]:
    """The single offline run folder under ``run_dir/wandb`` and its records grouped by type."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (log_file,) = runs[0].glob("run-*.wandb")
    grouped: dict[str, list] = {}
    for record in _read_records(log_file):
        grouped.setdefault(record.WhichOneof("record_type"), []).append(record)
    return runs[0], grouped


def _png(path: Path) -> Path:
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(path)
    return path


# ------------------------------------------------------------------------------------------------------ tests


def test_flatten_metrics_joins_nested_keys_with_slash():
    assert flatten_metrics({"nfe": 35, "fid": {"50k": 2.1, "ref": {"hash": "ab"}}}) == {
        "nfe": 35, "fid/50k": 2.1, "fid/ref/hash": "ab"}


def test_null_logger_is_inert(tmp_path):
    logger = NullLogger()
    with logger as same:
        assert same is logger
        logger.start({"a": 1}, run_dir=str(tmp_path), name="r", group="g")
        logger.log_metrics({"fid": {"50k": 1.0}})
        logger.log_image("grid", str(tmp_path / "missing.png"))
        logger.log_table("t", ["a"], [[1]])
    logger.finish()
    logger.finish()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_records_config_metrics_image_table(tmp_path, monkeypatch, caplog, wandb_teardown):
    _wandb_env(monkeypatch, tmp_path, mode="offline")
    caplog.set_level(logging.INFO, logger="bdia.logger")
    run_dir = tmp_path / "run_a"
    grid = _png(tmp_path / "grid.png")
    config = {"solver": {"name": "bdia_edm", "gamma": 0.5, "num_steps": 18}, "seeds": "0-63"}

    t0 = time.perf_counter()
    logger = WandbLogger(mode="offline", tags=["test"])  # dir=None: the run_dir
    logger.start(config, run_dir=str(run_dir), name="bdia_edm-g0.5", group="table2")
    assert logger.mode == "offline" and logger.run is not None
    logger.log_metrics({"nfe": np.int64(35), "fid": {"50k": np.float32(2.5)}, "ref_path": "/x/ref.npz",
                        "skipped": None})
    logger.log_image("grid", str(grid))
    logger.log_image("missing", str(tmp_path / "nope.png"))  # a warning, not an exception
    logger.log_table("per_seed", ["seed", "nfe"], [[0, np.int64(35)], [1, 35]])
    logger.finish()
    logger.finish()  # idempotent
    logger.log_metrics({"late": 1.0})  # after finish: ignored
    elapsed = time.perf_counter() - t0
    assert elapsed < 45, f"offline run took {elapsed:.1f} s"  # no network wait; generous for busy CPUs

    assert any("nope.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    run_folder, records = _offline_run(run_dir)
    assert logger.sync_dir == run_folder and logger.sync_command == f"wandb sync {run_folder}"
    assert any(logger.sync_command in r.getMessage() for r in caplog.records)

    (run,) = [r.run for r in records["run"]]
    assert (run.project, run.run_group, run.display_name, run.job_type) == ("bdia", "table2", "bdia_edm-g0.5",
                                                                          "sample")
    assert list(run.tags) == ["test"]
    logged_config = _items(run.config.update)
    assert logged_config["solver"] == config["solver"] and logged_config["seeds"] == "0-63"

    history = [_items(h.history.item) for h in records["history"]]
    assert history[0]["nfe"] == 35 and history[0]["fid/50k"] == 2.5 and "ref_path" not in history[0]
    summary: dict = {}
    for s in records["summary"]:
        summary.update(_items(s.summary.update))
    assert summary["fid/50k"] == 2.5 and summary["ref_path"] == "/x/ref.npz" and "skipped" not in summary
    assert "late" not in summary
    assert records["exit"][0].exit.exit_code == 0

    # The grid and the table are copied into the run's files (what `wandb sync` uploads).
    (image,) = (run_folder / "files" / "media" / "images").glob("grid_*.png")
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(grid)))
    (table_file,) = (run_folder / "files" / "media" / "table").glob("per_seed_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["seed", "nfe"] and table["data"] == [[0, 35], [1, 35]]
    assert summary["per_seed/_type"] == "table-file" and summary["grid/_type"] == "image-file"

    # A second run of the same experiment (a sweep member) in the same process: its own folder, same group;
    # as a context manager, an exception in the block marks the run failed and propagates.
    run_dir_b = tmp_path / "run_b"
    second = WandbLogger()
    second.start(config, run_dir=str(run_dir_b), name="bdia_edm-g0.9", group="table2")
    with pytest.raises(RuntimeError, match="sampling broke"):
        with second:
            second.log_metrics({"nfe": 35})
            raise RuntimeError("sampling broke")
    assert second.run is None
    _, records_b = _offline_run(run_dir_b)
    run_b = records_b["run"][0].run
    assert run_b.run_group == "table2" and run_b.display_name == "bdia_edm-g0.9"
    assert records_b["exit"][0].exit.exit_code == 1


def test_wandb_env_mode_disabled_wins_and_writes_nothing(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path, mode="disabled")
    for logger in (WandbLogger(mode="offline"), WandbLogger(mode="online")):
        logger.start({"a": 1}, run_dir=str(tmp_path / "run"), name="r", group="g")
        assert logger.mode == "disabled" and logger.run is None and logger.sync_command is None
        logger.log_metrics({"x": 1.0})
        logger.log_image("grid", str(tmp_path / "missing.png"))
        logger.log_table("t", ["a"], [[1]])
        logger.finish()
        logger.finish()
    assert not (tmp_path / "run").exists() and not (tmp_path / "home").exists()

    monkeypatch.delenv("WANDB_MODE")
    logger = WandbLogger(mode="disabled")
    logger.start({"a": 1}, run_dir=str(tmp_path / "run"), name="r")
    assert logger.mode == "disabled" and not (tmp_path / "run").exists()
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert WandbLogger(mode="online").resolve_mode() == "disabled"


def test_wandb_mode_is_validated():
    assert WandbLogger(mode="dryrun").configured_mode == "offline"  # wandb's legacy alias
    with pytest.raises(ValueError, match="not a W&B mode"):
        WandbLogger(mode="offlien")


def test_wandb_failed_start_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog, wandb_teardown):
    _wandb_env(monkeypatch, tmp_path, mode="offline")
    logger = WandbLogger(settings={"not_a_wandb_setting": 1})
    with caplog.at_level(logging.WARNING, logger="bdia.logger"):
        logger.start({"a": 1}, run_dir=str(tmp_path / "run"), name="r", group="g")
    assert logger.run is None
    assert any("start failed" in r.getMessage() for r in caplog.records)
    logger.log_metrics({"x": 1.0})
    logger.log_image("grid", str(_png(tmp_path / "g.png")))
    logger.log_table("t", ["a"], [[1]])
    logger.finish()
    logger.finish()


def _silent_server() -> tuple[socket.socket, list]:
    """A local TCP server that accepts connections and never answers (a hung network); records accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server, accepted


def test_wandb_offline_never_touches_the_network(tmp_path):
    """Offline with WANDB_MODE unset (the mode comes from the config): the whole process, exit included,
    opens no connection to the W&B server (here a local server that hangs) and ends in seconds."""
    server, accepted = _silent_server()
    # The import time (torch, seconds on a busy machine) is reported by the child and not counted below.
    script = textwrap.dedent(f"""
        import time
        started = time.perf_counter()
        from bdia.logger import WandbLogger
        print("import-seconds", time.perf_counter() - started, flush=True)
        logger = WandbLogger(mode="offline")
        logger.start({{"a": 1}}, run_dir={str(tmp_path / "run")!r}, name="r", group="g")
        assert logger.run is not None
        logger.log_metrics({{"x": 1.0}})
        logger.log_table("t", ["a"], [[1]])
        logger.finish()
    """)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WANDB_", "HTTP_PROXY",
                                                                            "HTTPS_PROXY", "ALL_PROXY"))}
    env.update(WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}", WANDB_SILENT="true",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_CONFIG_DIR=str(tmp_path / "config"),
               WANDB_DATA_DIR=str(tmp_path / "data"))
    t0 = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
    finally:
        elapsed = time.perf_counter() - t0
        server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert accepted == [], "an offline run connected to the W&B server"
    # wandb 0.31's analytics probe, were it to run, would also stall the exit by its 10 s HTTP timeout.
    import_seconds = float(result.stdout.split("import-seconds", 1)[1].split()[0])
    assert elapsed - import_seconds < 20, f"offline run + interpreter exit took {elapsed - import_seconds:.1f} s"
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_none_and_disabled_never_import_wandb(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import hydra.utils
        from omegaconf import OmegaConf
        logger = hydra.utils.instantiate(OmegaConf.load({str(LOGGER_CONFIGS / "none.yaml")!r}))
        logger.start({{"a": 1}}, run_dir={str(tmp_path)!r}, name="r", group="g")
        logger.log_metrics({{"x": 1.0}}); logger.finish()
        logger = hydra.utils.instantiate(OmegaConf.load({str(LOGGER_CONFIGS / "wandb.yaml")!r}))
        logger.start({{"a": 1}}, run_dir={str(tmp_path)!r}, name="r", group="g")  # WANDB_MODE=disabled
        logger.log_metrics({{"x": 1.0}}); logger.finish()
        assert "wandb" not in sys.modules, "wandb was imported"
    """)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["none", "wandb"])
def test_logger_configs_compose_and_instantiate(option):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+logger={option}"])  # the logger group alone, whatever sample.yaml holds
        logger = instantiate(cfg.logger)
        if option == "none":
            assert isinstance(logger, NullLogger)
            return
        assert isinstance(logger, WandbLogger)
        assert (logger.project, logger.entity, logger.configured_mode, logger.dir) == ("bdia", None, "offline",
                                                                                       None)
        assert logger.tags == [] and logger.settings == {} and type(logger.settings) is dict
        online = instantiate(compose(overrides=["+logger=wandb", "logger.mode=online", "logger.tags=[a,b]",
                                                "+logger.settings.console=off"]).logger)
        assert online.configured_mode == "online" and online.tags == ["a", "b"]
        assert online.settings == {"console": "off"}


# ------------------------------------------------------------------------------------------------------ the apps


def _offline_files(run_dir: Path) -> Path:
    """The ``files`` folder of the single offline W&B run under ``run_dir/wandb``."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0] / "files"


def _table(files: Path, key: str) -> dict:
    (table_file,) = (files / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(table_file.read_text())


def test_sample_app_logs_to_wandb_offline_into_a_new_run_folder(tmp_path, monkeypatch, wandb_teardown):
    """W&B writes its files into the run folder only once the run owns it: a new folder is not mistaken for a
    foreign one, and a rerun resumes it."""
    from app_helpers import FAST, TINY_GMM, compose, hydra_configs

    from bdia.apps.sample import sample_from_config

    _wandb_env(monkeypatch, tmp_path, mode=None)
    out = tmp_path / "run"
    with hydra_configs():
        cfg = compose("experiment=digits_demo", "logger=wandb", *FAST, *TINY_GMM, "metrics=none", f"out_dir={out}")
    assert sample_from_config(cfg)["num_sampled"] == 2
    files = _offline_files(out)
    assert list((files / "media" / "images").glob("grid_*.png"))
    assert _table(files, "summary")["columns"][:3] == ["solver", "gamma", "num_steps"]
    assert sample_from_config(cfg)["num_resumed"] == 2  # the folder, wandb/ included, is still the run's own


def test_text2image_logs_prompts_images_and_clip_scores_to_wandb_offline(tmp_path, monkeypatch, tiny_sd_dir,
                                                                         wandb_teardown):
    from app_helpers import cli

    from bdia.testing import build_tiny_clip

    _wandb_env(monkeypatch, tmp_path, mode=None)
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    code = cli(monkeypatch, tmp_path, f"model.path={tiny_sd_dir}", "seeds=0-1", "solver.num_steps=2", "device=cpu",
               "progress=false", "prompts=[a red fox,a blue boat]", "metrics=clip", f"metrics.clip.path={clip}",
               "metrics.clip.device=cpu", "logger=wandb", f"out_dir={out}",
               script=Path(__file__).resolve().parents[2] / "scripts" / "text2image.py")
    assert code is None
    files = _offline_files(out)
    table = _table(files, "images")
    assert table["columns"] == ["prompt", "seed", "image", "clip_score"]
    assert [row[:2] for row in table["data"]] == [["a red fox", 0], ["a red fox", 1], ["a blue boat", 0],
                                                  ["a blue boat", 1]]
    per_image = json.loads((out / "metrics.json").read_text())["evaluation"]["clip"]["per_image"]
    assert [row[3] for row in table["data"]] == pytest.approx(per_image)
    assert [Path(row[2]).name for row in table["data"]] == ["p00000_s000000.png", "p00000_s000001.png",
                                                            "p00001_s000000.png", "p00001_s000001.png"]
    # The images themselves, as media beside the table (the grid and the 4 images, each stored once).
    assert len(list((files / "media" / "images").rglob("images_images_*.png"))) == 4
    assert list((files / "media" / "images").glob("grid_*.png"))


def test_edit_logs_each_methods_figure_and_the_cost_table_to_wandb_offline(tmp_path, monkeypatch, tiny_sd_dir,
                                                                           wandb_teardown):
    from app_helpers import cli

    _wandb_env(monkeypatch, tmp_path, mode=None)
    out = tmp_path / "edit"
    code = cli(monkeypatch, tmp_path, "model=tiny-sd", f"model.path={tiny_sd_dir}", "methods=[bdia,ddim]",
               "num_steps=3", "image_size=32", "logger=wandb", f"out_dir={out}",
               script=Path(__file__).resolve().parents[2] / "scripts" / "edit.py")
    assert code is None
    files = _offline_files(out)
    table = _table(files, "methods")
    assert [row[0] for row in table["data"]] == ["bdia", "ddim"] and table["columns"][1] == "nfe_inversion_and_reconstruction"
    metrics = json.loads((out / "metrics.json").read_text())
    assert table["data"][0][5] == pytest.approx(metrics["methods"]["bdia"]["latent"]["relative_error"])
    figures = {str(p.relative_to(files / "media" / "images")).split("_")[0] for p in (files / "media" / "images").rglob("*.png")}
    assert {"bdia/figure", "ddim/figure", "edit"} <= figures, figures


def test_a_disabled_logger_says_what_disabled_it(monkeypatch, caplog, tmp_path):
    """`make ... logger=wandb` under an inherited WANDB_MODE=disabled logs nothing: the warning names the
    variable, so the user knows what to unset."""
    from bdia.logger import WandbLogger

    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level("WARNING", logger="bdia.logger"):
        WandbLogger().start({}, run_dir=tmp_path, name="x")
    assert "WANDB_MODE=disabled in the environment" in caplog.text
    caplog.clear()
    monkeypatch.delenv("WANDB_MODE")
    with caplog.at_level("WARNING", logger="bdia.logger"):
        WandbLogger(mode="disabled").start({}, run_dir=tmp_path, name="x")
    assert "logger.mode=disabled" in caplog.text and not list(tmp_path.iterdir())
