"""What the Hydra shells in ``scripts/`` share: one-line errors, a command-line check before Hydra runs, and
the run-folder name resolver their configs use.

* :func:`preflight` — composes the command line's overrides before Hydra's own run, so that an unknown
  config name or a malformed override ends in one line listing the valid choices instead of Hydra's
  multi-line report.
* :func:`run_job` / :func:`run_command_line` — a script's entry point and job wrapper.
* :func:`one_line` / :data:`USER_ERRORS` — how user mistakes are reported: one line ``error: ...``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

from ..download import AssetUnavailableError
from ..networks.loader import SnapshotError

__all__ = ["preflight", "one_line", "USER_ERRORS", "CONFIG_DIR", "run_job", "run_command_line"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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

def one_line(error: BaseException | str) -> str:
    """A (possibly multi-line) message as one line: lines stripped and joined with `` | ``, runs of spaces
    collapsed."""
    text = str(error)
    return " | ".join(re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip())


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
