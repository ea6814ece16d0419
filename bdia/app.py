"""The sampling app behind ``scripts/sample.py``, as plain functions tests can call on a composed config.

* :func:`sample_from_config` — a composed ``configs/sample.yaml`` config → process group (torchrun / SLURM
  ranks, :mod:`bdia.distributed`) → denoiser (:func:`bdia.models.load_model`) → :func:`bdia.run.sample_run`
  → metrics of the run folder (``metrics=digits|fid|…``, :func:`bdia.metrics.evaluate.evaluate_run`) →
  experiment logger (``logger=none|wandb``, rank 0 only).
* :func:`preflight` — composes the command line's overrides before Hydra's own run, so that an unknown
  config name or a malformed override ends in one line listing the valid choices instead of Hydra's
  multi-line report.
* :func:`one_line` / :data:`USER_ERRORS` — how user mistakes are reported: one line ``error: ...``.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .configs import build_metrics, instantiate
from .distributed import init_distributed
from .download import AssetUnavailableError
from .logger import NullLogger, Table, log_run
from .metrics.evaluate import evaluate_run
from .models import load_model
from .networks.loader import SnapshotError
from .run import _validate_grid, sample_run
from .runfolder import check_out_dir

__all__ = ["sample_from_config", "preflight", "one_line", "USER_ERRORS", "CONFIG_DIR", "run_job", "run_command_line"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def run_name(override_dirname: str) -> str:
    """A run folder's name from Hydra's ``job.override_dirname``: the overrides, or ``defaults`` when there are
    none (so a run without overrides gets a folder of its own beside the others, not their parent)."""
    return str(override_dirname) or "defaults"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("bdia.run_name"):
        OmegaConf.register_new_resolver("bdia.run_name", run_name)


_register_resolvers()  # the app configs' out_dir uses ${bdia.run_name:...}

#: Exceptions that mean "the input is wrong or a file is missing", reported as one line without a traceback.
USER_ERRORS = (ValueError, AssetUnavailableError, SnapshotError, FloatingPointError)

#: Top-level config keys that are ``sample_run`` arguments.
_RUN_KEYS = [k for k in inspect.signature(sample_run).parameters if k not in ("denoiser", "solver", "gamma", "num_steps",
                                                                             "config", "model_info", "dist", "solver_kwargs")]


_GRID_KEYS = ("sigma_min", "sigma_max", "rho", "grid_nrow", "grid_scale", "grid_padding")


def one_line(error: BaseException | str) -> str:
    """A (possibly multi-line) message as one line: lines stripped and joined with `` | ``, runs of spaces
    collapsed."""
    text = str(error)
    return " | ".join(re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip())


# --------------------------------------------------------------------------------------------------
# The run.


def sample_from_config(cfg, choices: Mapping[str, Any] | None = None) -> dict | None:
    """Run ``scripts/sample.py`` for a composed config (``configs/sample.yaml``): join the process group the
    environment describes (``distributed``: auto | required | off), load the model, sample, and log on rank 0.

    ``choices``: the config group choices (Hydra's ``runtime.choices``), recorded in ``metrics.json`` and the
    logger's config. Returns ``sample_run``'s metrics on rank 0, ``None`` on the other ranks. Raises one of
    :data:`USER_ERRORS` for mistakes in the config and for missing files.
    """
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    ctx, device = init_distributed(config.get("device", "auto"), config.get("distributed", "auto"))
    solver = dict(config["solver"])
    solver_name = solver.pop("name")
    gamma = solver.pop("gamma", None)
    num_steps = solver.pop("num_steps")
    settings = {k: config[k] for k in _RUN_KEYS if k in config}
    settings["device"] = device
    choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra/")}

    check_out_dir(settings["out_dir"], "sample")  # cheap checks first: nothing is loaded for a refused run
    _validate_grid(**{k: settings[k] for k in _GRID_KEYS if k in settings})
    model_cfg = config.get("model")
    denoiser = load_model(model_cfg)
    model_info = {k: v for k, v in (model_cfg or {}).items() if not k.startswith("_")}
    model_info = {"config": choices.get("model"), "target": (model_cfg or {}).get("_target_"), **model_info}

    evaluators = build_metrics(cfg.get("metrics"))  # built before sampling: a bad metric option fails before any image is drawn

    out_dir = str(settings["out_dir"])
    metrics = sample_run(denoiser, solver=solver_name, gamma=gamma, num_steps=num_steps, **settings, **solver,
                         config={**config, "choices": choices}, model_info=model_info, dist=ctx)
    evaluation = None
    if evaluators:  # every rank: the metrics shard their images across ranks; rank 0 writes metrics.json
        evaluation = evaluate_run(out_dir, evaluators, write=True)
    if metrics is not None:
        if evaluation is not None:
            metrics["evaluation"] = evaluation
        # The logger starts once the run folder is the run's own (W&B writes its files into it).
        logger = instantiate(cfg.logger, "logger") if config.get("logger") else NullLogger()
        columns = ["solver", "gamma", "num_steps", "nfe", "num_images", "sampling_seconds", "images_per_second"]
        log_run(logger, {**config, "choices": choices}, out_dir, config.get("experiment_name"), metrics,
                images={"grid": Path(out_dir) / "grid.png"},
                tables=[Table("summary", columns, [[_cell(metrics.get(c)) for c in columns]])])
    return metrics


def _cell(value):
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


# --------------------------------------------------------------------------------------------------
# Checking the command line before Hydra runs.

def _missing_config_line(error) -> str:
    missing = getattr(error, "missing_cfg_file", None) or ""
    options = list(getattr(error, "options", None) or [])
    match = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", str(error))
    if match:
        group, name = match.groups()
    elif "/" in str(missing):
        group, name = str(missing).rsplit("/", 1)
    else:
        return one_line(str(error).split("Config search path:")[0])
    if options:
        return f"unknown {group} {name!r} ({group}={name}); choose one of: {', '.join(options)}"
    return one_line(str(error).split("Config search path:")[0])


def _group_options(config_dir: Path, group: str) -> list[str] | None:
    folder = config_dir / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def preflight(argv: Sequence[str], config_dir=CONFIG_DIR, config_name: str = "sample") -> str | None:
    """Check a ``scripts/sample.py`` command line (``sys.argv[1:]``) before Hydra runs it; return one line
    describing the first problem, or ``None``.

    Without sweeps the overrides are composed exactly as Hydra will (``hydra.compose``), which catches unknown
    config names (the line lists the valid ones), keys that do not exist and malformed values. With sweeps
    (``-m solver=edm,bdia_edm``) each named config group option is checked to exist. Command lines with other
    Hydra flags (``--cfg``, ``--help`` …) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException

    overrides = []
    for arg in argv:
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith("-"):  # --cfg, --help, --info ...: Hydra's own business
            return None
        overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        return f"cannot parse the command line: {one_line(e)}"
    config_dir = Path(config_dir)
    if any(o.is_sweep_override() for o in parsed):
        for o in parsed:
            group = o.key_or_group
            options = _group_options(config_dir, group) if "." not in group and not group.startswith("hydra") else None
            if options is None or o.is_delete():
                continue
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in options and value != "null":
                    return f"unknown {group} {value!r} ({group}={value}); choose one of: {', '.join(options)}"
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            compose(config_name, overrides=list(overrides))
    except MissingConfigException as e:
        return _missing_config_line(e)
    except Exception as e:
        message = str(e)
        cause = e.__cause__
        if cause is not None and str(cause) and str(cause) not in message:
            message = f"{message}\n{cause}"
        return one_line(message.split("Config search path:")[0])
    return None


# --------------------------------------------------------------------------------------------------
# What the Hydra shells in scripts/ share.


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_job(job, cfg):
    """Inside a ``@hydra.main`` function: ``job(cfg, choices=<the config-group choices>)``; a user mistake
    (:data:`USER_ERRORS`) or a file-system refusal (``OSError``: disk full, file-size limit, permissions) ends the
    process with one line ``error: ...`` (``HYDRA_FULL_ERROR=1``: the traceback)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return job(cfg, choices=dict(HydraConfig.get().runtime.choices))
    except USER_ERRORS as e:
        if _full_errors():
            raise
        sys.exit(f"error: {one_line(e)}")
    except OSError as e:  # a full disk, a file-size limit, a permission: the file system said no
        if _full_errors():
            raise
        sys.exit(f"error: cannot read or write a file: {one_line(e)}")
    except (MemoryError, RuntimeError) as e:
        if _full_errors() or not _out_of_memory(e):
            raise
        sys.exit(f"error: out of memory ({one_line(e)[:200]}); lower batch_size or network_batch")


def _out_of_memory(error: BaseException) -> bool:
    """CPU allocation failures (MemoryError, torch's "can't allocate memory") and CUDA's OutOfMemoryError."""
    import torch

    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error) or "out of memory" in str(error).lower())


def run_command_line(main, config_name: str) -> None:
    """A script's entry point: check ``sys.argv``'s overrides with :func:`preflight` (one-line errors), then
    let Hydra run ``main``."""
    problem = None if _full_errors() else preflight(sys.argv[1:], config_name=config_name)
    if problem:
        sys.exit(f"error: {problem}")
    main()
