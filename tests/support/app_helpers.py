"""Helpers for the sampling-app tests: tiny networks on disk, config composition, the CLI run in-process."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from bdia.apps.cli import app_config_dir

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = app_config_dir("sample")  # configs/sample/; its shared groups: bdia.apps.cli.config_dirs(CONFIG_DIR)
SCRIPT = REPO / "scripts" / "sample.py"

# A few seconds on a CPU for every experiment file: tiny models, two seeds, two steps.
TINY_GMM = ["model.image_size=8", "model.num_components=40"]
FAST = ["seeds=0-1", "solver.num_steps=2", "network_batch=2", "progress=false"]


def write_tiny_edm(path, label_dim: int = 10, resolution: int = 8, seed: int = 0) -> Path:
    """A small EDMPrecond + DDPM++ network with random weights, pickled in NVIDIA's snapshot format."""
    from edm_pickle import write_edm_snapshot

    from bdia.networks import EDM_CLASSES, EDMPrecond

    g = torch.Generator().manual_seed(seed)
    net = EDMPrecond(resolution, 3, label_dim=label_dim, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[4], dropout=0.0, embedding_type="positional",
                     encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
    with torch.no_grad():
        for p in net.parameters():  # EDM zero-initialises output layers: make every weight matter
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return write_edm_snapshot(Path(path), net.eval(), set(EDM_CLASSES), lambda m: m.init_kwargs)


def write_tiny_digits_network(path) -> Path:
    """A small untrained network in scripts/train.py's format (what model=digits model.path=... reads)."""
    from bdia.apps.train import TrainConfig, build_network, save_network

    config = TrainConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    return save_network(build_network(config, 16, 1).eval(), Path(path), config)


@contextmanager
def hydra_configs(app: str = "sample"):
    """Hydra's compose API on ``app``'s configs (``configs/<app>/`` and its shared folders)."""
    from hydra.core.global_hydra import GlobalHydra

    from bdia.apps.cli import initialize_app

    GlobalHydra.instance().clear()
    with initialize_app(app):
        yield
    GlobalHydra.instance().clear()


def compose(*overrides, hydra: bool = False, app: str = "sample"):
    """``configs/<app>/<app>.yaml`` composed with ``overrides`` (inside :func:`hydra_configs` of that app)."""
    from hydra import compose as hydra_compose

    return hydra_compose(app, overrides=list(overrides), return_hydra_config=hydra)


def cli(monkeypatch, cwd, *args, script=SCRIPT) -> int | str | None:
    """Run ``scripts/sample.py args`` (or another Hydra shell, ``script``) in this process (much faster than a
    subprocess), from ``cwd``. Returns the exit code or message (``sys.exit``), ``None`` for success."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if e.code not in (0, None) else None
    finally:
        GlobalHydra.instance().clear()
        for handler in root.handlers:  # Hydra's job logging (a file in the run folder): put the old set back
            if handler not in saved[1]:
                handler.close()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    return None


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", **extra)
    return env


def run_script(cwd, *args, timeout=120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


class RecordingLogger:
    """A logger for tests: records the calls the app makes (the logger contract of bdia.logger)."""

    calls: list = []

    def __init__(self, **kwargs):
        RecordingLogger.calls.append(("init", kwargs))

    def start(self, config, run_dir, name, group=None):
        RecordingLogger.calls.append(("start", dict(config=config, run_dir=run_dir, name=name, group=group)))

    def log_metrics(self, metrics, step=None):
        RecordingLogger.calls.append(("log_metrics", dict(metrics)))

    def log_image(self, key, path, caption=None):
        RecordingLogger.calls.append(("log_image", (key, str(path), Path(path).is_file())))

    def log_table(self, key, columns, rows):
        RecordingLogger.calls.append(("log_table", (key, list(columns), [list(r) for r in rows])))

    def finish(self, exit_code=None):
        RecordingLogger.calls.append(("finish", exit_code))


def load_script(relative_path: str):
    """Import a script by path (scripts/ and benchmarks/ are not packages), once per test session."""
    import importlib.util

    path = REPO / relative_path
    name = f"_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
