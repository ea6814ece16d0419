"""Experiment loggers for sampling runs: ``logger=none`` (local files only) and ``logger=wandb``.

The app builds one logger from the ``logger`` config group and drives it through five calls::

    logger = hydra.utils.instantiate(cfg.logger)        # configs/loggers/logger/{none,wandb}.yaml
    logger.start(config, run_dir=out_dir, name=run_name, group=experiment_name)
    logger.log_metrics({"nfe": 35, "fid": {"50k": 2.1}})  # nested keys flattened: "fid/50k"
    logger.log_image("grid", out_dir + "/grid.png")
    logger.log_table("per_seed", ["seed", "nfe"], [[0, 35], [1, 35]])
    logger.finish()

or, equivalently, ``with logger: ...`` after ``start`` (``finish`` runs on leaving the block and marks the run
failed if the block raised).

Logging never ends a sampling run: every W&B failure (wandb cannot start, a bad setting, a missing image
file, a call after ``finish``) is reported as one warning on the ``bdia.logger`` logger and the method
returns. ``finish`` may be called any number of times.

**W&B modes.** ``WandbLogger`` is *offline by default*: wandb writes the whole run (config, metrics, media,
tables) to ``<run dir>/wandb/offline-run-<date>_<time>-<id>/`` and touches no network; upload it later from
any machine with access to W&B with ``wandb sync <that folder>`` (``finish`` logs the exact command; a
sweep: ``wandb sync <sweep dir>/*/wandb/offline-run-*``). ``finish`` returns once the run's files are
complete on disk (it shuts wandb's background service down when no other wandb run is active).
``mode="online"`` streams to the server (needs ``wandb login`` or ``WANDB_API_KEY``); ``mode="disabled"``
writes nothing and never imports wandb. The environment variable ``WANDB_MODE`` (and the legacy
``WANDB_DISABLED=true``) overrides the configured mode, so ``WANDB_MODE=disabled`` (the test suite's setting)
switches every run off.

``wandb`` is imported only inside ``WandbLogger.start`` when the resolved mode is online or offline, so
``logger=none`` and disabled runs never import it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .distributed import launch_rank

log = logging.getLogger(__name__)

__all__ = ["BaseLogger", "NullLogger", "WandbLogger", "flatten_metrics", "log_run", "logged_metrics", "run_name",
           "Table"]

# wandb's own mode names, and the legacy aliases it accepts for them.
_MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Flatten nested mappings into one level, joining keys with ``sep``.

    >>> flatten_metrics({"nfe": 35, "fid": {"50k": 2.1, "10k": 2.9}})
    {'nfe': 35, 'fid/50k': 2.1, 'fid/10k': 2.9}
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name, sep))
        else:
            flat[name] = value
    return flat


def _scalar(value: Any) -> Any:
    """A zero-dimensional numpy array / numpy scalar / tensor as a Python number; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return value


def _jsonable(value: Any) -> Any:
    """``value`` as something wandb's JSON encoder accepts (lists, numbers, strings); else ``str(value)``."""
    value = _scalar(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        try:
            return tolist()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool included


def _plain(value: Any) -> Any:
    """An OmegaConf container (if Hydra passed one) as plain Python; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _flush_wandb_service() -> None:
    """Make a finished run's files complete on disk before returning, by shutting wandb's service down.

    In wandb 0.31 ``run.finish()`` returns before the run's ``.wandb`` transaction log is written: the service
    (``wandb-core``) buffers it (flushing every 15 s) and closes the run's stream only after ``finish`` has
    sent a fire-and-forget "finish" message, so right after ``finish`` the file can still be its 7-byte header.
    ``wandb.teardown()`` waits for the service to close every stream and exit. It is skipped when another
    wandb run is still active in this process (teardown would end it); the service then flushes at exit. The
    next ``start`` launches a fresh service (~0.2 s).
    """
    try:
        import wandb
        from wandb.sdk import wandb_setup

        if getattr(wandb_setup.singleton(), "most_recent_active_run", True) is not None:
            return
        wandb.teardown()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - teardown may sys.exit() with the service's status
        log.warning("W&B: shutting wandb's service down failed (%s: %s)", type(e).__name__, e)


class BaseLogger:
    """The logger protocol, with every call a no-op; subclasses override what they record.

    Methods: ``start(config, run_dir, name, group=None)``, ``log_metrics(metrics, step=None)``,
    ``log_image(key, path, caption=None)``, ``log_table(key, columns, rows)``, ``finish(exit_code=None)``.
    A logger is also a context manager: ``with logger: ...`` calls ``finish`` on leaving the block (with
    ``exit_code=1`` if the block raised) and never swallows the exception.
    """

    def start(self, config: Mapping[str, Any], run_dir: str | os.PathLike, name: str,
              group: str | None = None) -> None:
        """Begin a run: record ``config`` (the resolved run config), ``name`` (run name) and ``group``
        (experiment name, so sweep runs share one group); ``run_dir`` is the run's output folder."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record a dict of metrics; nested dicts are flattened with ``/`` (``{"fid": {"50k": x}}`` →
        ``fid/50k``)."""

    def log_image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        """Record the image file at ``path`` (PNG) under ``key``."""

    def log_table(self, key: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                  image_columns: Sequence[str] = ()) -> None:
        """Record a table with the given column names and rows (one list of cells per row); the cells of
        ``image_columns`` are image file paths."""

    def finish(self, exit_code: int | None = None) -> None:
        """End the run (``exit_code`` non-zero marks it failed). Safe to call more than once."""

    def __enter__(self) -> BaseLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish(exit_code=1 if exc_type is not None else None)
        return False


class NullLogger(BaseLogger):
    """``logger=none``: records nothing. The run's local files (metrics.json, grid.png, ...) are its record."""

    def __repr__(self) -> str:
        return "NullLogger()"


class WandbLogger(BaseLogger):
    """``logger=wandb``: a Weights & Biases run per sampling run, offline unless asked otherwise.

    Args:
        project: W&B project.
        entity: W&B entity (user or team); ``None``: the account's default entity.
        mode: ``"offline"`` (default: the run is written to disk with no network access and uploaded later
            with ``wandb sync``), ``"online"`` (streams to the server; needs ``wandb login``) or
            ``"disabled"`` (nothing is written; wandb is not imported). ``WANDB_MODE`` in the environment
            overrides it, and so does ``WANDB_DISABLED=true`` (this class's rule: wandb 0.31 itself lets
            ``wandb.init(mode=...)`` win over ``WANDB_MODE``).
        dir: folder under which wandb creates ``wandb/<run folder>``; ``None``: the run's ``run_dir``, so the
            W&B files live beside the images and metrics.
        tags: run tags.
        job_type: W&B job type (the dashboard can group or filter on it).
        group: overrides the ``group`` that ``start`` receives (the experiment name) when not ``None``.
        name: overrides the ``name`` that ``start`` receives (the run name) when not ``None``.
        notes: free-text run notes.
        rank_zero_only: under torchrun / SLURM (``RANK`` / ``SLURM_PROCID`` set), only rank 0 logs; the
            other ranks behave like ``NullLogger``.
        settings: extra ``wandb.Settings`` fields, e.g. ``{"console": "off", "x_disable_stats": True}``.
            Default added here: ``reinit="create_new"``, so a run never attaches to (or finishes) another
            active wandb run in the same process (wandb's own default outside notebooks returns the
            previous run).

    After ``start``: ``run`` is the ``wandb`` run (``None`` when disabled or when wandb failed to start),
    ``mode`` the mode in effect, and for offline runs ``sync_dir`` / ``sync_command`` say how to upload.
    """

    def __init__(self, project: str = "bdia", entity: str | None = None, mode: str = "offline",
                 dir: str | os.PathLike | None = None, tags: Iterable[str] = (), job_type: str = "sample",
                 group: str | None = None, name: str | None = None, notes: str | None = None,
                 rank_zero_only: bool = True, settings: Mapping[str, Any] | None = None) -> None:
        self.configured_mode = self._check_mode(mode, "logger.mode")
        self.project = project
        self.entity = entity
        self.dir = dir
        self.tags = [str(tag) for tag in (_plain(tags) or ())]
        self.job_type = job_type
        self.group = group
        self.name = name
        self.notes = notes
        self.rank_zero_only = rank_zero_only
        self.settings = dict(_plain(settings) or {})
        self.mode: str | None = None  # the mode in effect, set by start()
        self.run = None
        self.sync_dir: Path | None = None
        self._started = False

    def __repr__(self) -> str:
        return (f"WandbLogger(project={self.project!r}, entity={self.entity!r}, "
                f"mode={self.configured_mode!r}, dir={self.dir!r})")

    @staticmethod
    def _check_mode(mode: str, source: str) -> str:
        mode = _MODE_ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
        if mode not in _MODES:
            raise ValueError(f"{source}={mode!r} is not a W&B mode; choose one of {', '.join(_MODES)}")
        return mode

    def resolve_mode(self) -> str:
        """The mode a run would use now: ``WANDB_DISABLED=true``, then ``WANDB_MODE``, then ``mode``."""
        if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
            return "disabled"
        env_mode = os.environ.get("WANDB_MODE", "").strip()
        if env_mode:
            try:
                return self._check_mode(env_mode, "WANDB_MODE")
            except ValueError as e:
                log.warning("%s; using logger.mode=%s", e, self.configured_mode)
        return self.configured_mode

    @property
    def sync_command(self) -> str | None:
        """``wandb sync <run folder>`` for an offline run that has started; ``None`` otherwise."""
        return f"wandb sync {self.sync_dir}" if self.sync_dir is not None else None

    def _warn(self, what: str, error: BaseException) -> None:
        log.warning("W&B: %s failed (%s: %s); the run goes on without it", what, type(error).__name__,
                    " ".join(str(error).split()))

    def start(self, config: Mapping[str, Any], run_dir: str | os.PathLike, name: str,
              group: str | None = None) -> None:
        """Start the W&B run (see the class docstring); on any failure, warn and log nothing further."""
        if self._started:
            log.warning("W&B: start() called twice on one WandbLogger; ignoring the second call")
            return
        self._started = True
        self.mode = self.resolve_mode()
        if self.mode == "disabled":
            if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
                source = "WANDB_DISABLED in the environment; unset it to log"
            elif os.environ.get("WANDB_MODE", "").strip():
                source = "WANDB_MODE=disabled in the environment; unset it (or set offline/online) to log"
            else:
                source = "logger.mode=disabled"
            log.warning("W&B: logging is off (%s); only local files are written", source)
            return
        if self.rank_zero_only and launch_rank() != 0:
            return
        try:
            import wandb

            wandb_dir = Path(self.dir if self.dir is not None else run_dir).expanduser().resolve()
            wandb_dir.mkdir(parents=True, exist_ok=True)
            if self.mode == "offline":
                # wandb 0.31 builds a process-wide analytics exporter from wandb.setup()'s settings, not from
                # init(mode=...): unless those say offline it POSTs to the W&B server at interpreter exit (a
                # 10 s stall on a network that hangs). This keeps an offline run off the network entirely.
                wandb.setup(settings=wandb.Settings(mode="offline"))
            settings = wandb.Settings(**{"reinit": "create_new", **self.settings})
            run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=self.mode,
                dir=str(wandb_dir),
                name=self.name if self.name is not None else name,
                group=self.group if self.group is not None else group,
                job_type=self.job_type,
                tags=self.tags or None,
                notes=self.notes,
                config=_jsonable(dict(_plain(config) or {})),
                settings=settings,
            )
            sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
            if self.mode == "offline" and sync_dir:
                self.sync_dir = Path(sync_dir)
            self.run = run
        except (Exception, SystemExit) as e:  # noqa: BLE001 - logging must never end a sampling run
            self.run = None
            self._warn("start", e)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numbers go to the run's history (charts) and summary; other values (strings, lists) to the summary
        only; ``None`` values are skipped."""
        if self.run is None:
            return
        try:
            flat = {key: _jsonable(value) for key, value in flatten_metrics(metrics).items()}
            history = {key: value for key, value in flat.items() if _is_number(value)}
            if history:
                self.run.log(history, step=step)
            summary = {key: value for key, value in flat.items() if value is not None}
            if summary:
                self.run.summary.update(summary)
        except Exception as e:  # noqa: BLE001
            self._warn("log_metrics", e)

    def log_image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        """Log the image file at ``path`` as ``wandb.Image`` (wandb copies it into the run's media)."""
        if self.run is None:
            return
        try:
            import wandb

            if not Path(path).is_file():
                raise FileNotFoundError(f"no image file {path}")
            self.run.log({key: wandb.Image(str(path), caption=caption)})
        except Exception as e:  # noqa: BLE001
            self._warn(f"log_image({key!r})", e)

    def log_table(self, key: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                  image_columns: Sequence[str] = ()) -> None:
        """Log a ``wandb.Table``; numpy / torch scalars in the cells become Python numbers. The cells of
        ``image_columns`` (image file paths) stay paths in the table, and the images themselves are logged
        beside it as ``<key>_images`` (one ``wandb.Image`` per row, captioned with the row's other cells):
        wandb 0.31 stores ``wandb.Image`` cells of a table as the bare word "Image", without the picture."""
        if self.run is None:
            return
        try:
            import wandb

            rows = [list(row) for row in rows]
            images = [i for i, c in enumerate(columns) if c in set(image_columns)]
            data = [[_jsonable(str(cell) if i in images else cell) for i, cell in enumerate(row)] for row in rows]
            if images:
                captions = [" | ".join(str(c) for j, c in enumerate(row) if j not in images) for row in rows]
                media = [wandb.Image(str(row[i]), caption=caption) for row, caption in zip(rows, captions) for i in images]
                self.run.log({f"{key}_images": media})
            self.run.log({key: wandb.Table(columns=[str(c) for c in columns], data=data)})
        except Exception as e:  # noqa: BLE001
            self._warn(f"log_table({key!r})", e)

    def finish(self, exit_code: int | None = None) -> None:
        """Finish the W&B run and wait until its files are on disk; for an offline run, log the ``wandb sync``
        command that uploads it."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except (Exception, SystemExit) as e:  # noqa: BLE001
            self._warn("finish", e)
        _flush_wandb_service()
        if self.sync_dir is not None:
            log.info("W&B offline run saved in %s; upload it later with: %s", self.sync_dir, self.sync_command)


# --------------------------------------------------------------------------------------------------
# What every app logs about a finished run.


class Table(NamedTuple):
    """A table for :func:`log_run`: ``rows`` of cells under ``columns``; ``image_columns`` hold file paths."""

    key: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    image_columns: Sequence[str] = ()


def logged_metrics(metrics: Mapping[str, Any]) -> dict:
    """The numbers worth a chart: scalars and nested scalar groups (mixture quality, evaluation, per-method
    errors), not lists."""
    out = {}
    for key, value in metrics.items():
        if key == "evaluation":
            out[key] = {name: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                        for name, values in value.items()}
        elif key == "sigmas":
            out[key] = {k: v for k, v in value.items() if k != "levels"}
        elif isinstance(value, Mapping):
            out[key] = {k: v for k, v in value.items() if not isinstance(v, (list, tuple))}
        elif not isinstance(value, (list, tuple)):
            out[key] = value
    return out


def run_name(out_dir) -> str:
    """A logger's run name: the Hydra job's overrides when there are any, else the run folder's name."""
    try:
        from hydra.core.hydra_config import HydraConfig  # only set inside a Hydra job

        if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
            return HydraConfig.get().job.override_dirname
    except Exception:  # no Hydra run (tests, API use)
        pass
    return Path(out_dir).name or "run"


def log_run(logger, config: Mapping[str, Any], run_dir, group: str | None, metrics: Mapping[str, Any],
            images: Mapping[str, Any] = (), tables: Sequence[Table] = ()) -> None:
    """Log a finished run: start ``logger`` (its files then go into the run folder, which the run owns by now),
    its metrics, ``images`` (key -> PNG path) and ``tables``, then finish it."""
    logger.start(config=config, run_dir=str(run_dir), name=run_name(run_dir), group=group or "default")
    try:
        logger.log_metrics(logged_metrics(metrics))
        for key, path in dict(images).items():
            logger.log_image(key, str(path))
        for table in tables:
            extra = {"image_columns": list(table.image_columns)} if table.image_columns else {}
            logger.log_table(table.key, list(table.columns), [list(row) for row in table.rows], **extra)
    except BaseException:
        logger.finish(exit_code=1)
        raise
    logger.finish()
