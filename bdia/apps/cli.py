"""What the Hydra shells in ``scripts/`` share: their config folders, one-line errors, a command-line check
before Hydra runs, and the run-folder name resolver their configs use.

* :data:`APP_CONFIGS` / :func:`config_dirs` — each app's config search path: its own folder ``configs/<app>/``
  (the primary config ``<app>.yaml`` and the groups only it runs), then the shared folders whose groups it runs
  (``configs/shared``: the ``hydra/bdia`` default every app selects; ``loggers``, ``launchers``,
  ``*_metrics``, ``sd``). A Hydra search-path plugin registered on import adds them to Hydra's search path, so
  that composing, ``--help`` (which lists the groups of the search path) and ``--info`` all see exactly them.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from ..download import AssetUnavailableError
from ..networks.loader import SnapshotError
from ..testing import has_random_weights

__all__ = ["preflight", "one_line", "USER_ERRORS", "CONFIG_DIR", "APP_CONFIGS", "app_config_dir", "config_root", "config_dirs",
           "group_options", "initialize_app", "override_value", "take_positional_path", "run_job",
           "run_command_line"]

#: The root of this package's config folders (``configs/`` of the checkout it was installed from): ``configs/<app>/``
#: per app, the shared folders, ``tables/`` (bdia.apps.reproduce). A script's own checkout comes first for the
#: shared folders (:func:`config_root`).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Each app's shared config folders (under :data:`CONFIG_DIR`), searched after its own ``configs/<app>/``:
#: ``shared`` holds ``hydra/bdia.yaml`` (the Hydra settings every app selects); ``loggers``: ``logger/``;
#: ``launchers``: ``launcher/``; ``image_metrics`` / ``digits_metrics`` / ``prompt_metrics`` / ``sample_metrics``: the
#: ``metrics/`` options for any image run / 16x16 digits runs / runs with prompts / sampling runs (inverting their
#: records); ``sd``: the Stable Diffusion ``model/``; ``flow``: the flow-matching ``model/`` (SD3, FLUX).
APP_CONFIGS = {
    "sample": ("shared", "loggers", "launchers", "image_metrics", "digits_metrics", "sample_metrics"),
    "text2image": ("shared", "loggers", "launchers", "image_metrics", "prompt_metrics", "sd", "flow"),
    "edit": ("shared", "loggers", "launchers", "sd", "flow"),
    "demo": ("shared", "sd", "flow"),
    "evaluate": ("shared", "loggers", "image_metrics", "digits_metrics", "prompt_metrics", "sample_metrics"),
    "fid_ref": ("shared",),
    "train": ("shared",),
    "optimize": ("shared", "loggers"),
}


def app_config_dir(app: str) -> Path:
    """The folder of ``app``'s primary config ``<app>.yaml`` and its own groups: ``configs/<app>/``."""
    return CONFIG_DIR / app


def config_root(config_dir) -> Path | None:
    """The folder holding the shared config folders for the app folder ``config_dir`` (``<root>/<app>/``):
    ``config_dir``'s own parent when it holds ``shared/`` -- the checkout being run, wherever the installed
    ``bdia`` package lives (a script's ``@hydra.main`` names ``../configs/<app>`` relative to itself) -- else
    this package's :data:`CONFIG_DIR` (an app folder copied elsewhere on its own). ``None`` when the folder's
    name is not an app's."""
    config_dir = Path(config_dir)
    if config_dir.name not in APP_CONFIGS:
        return None
    return config_dir.parent if (config_dir.parent / "shared").is_dir() else CONFIG_DIR


def config_dirs(config_dir) -> list[Path]:
    """The config search path of the app whose folder is ``config_dir``: that folder, then its shared folders
    (:data:`APP_CONFIGS`) from :func:`config_root` (next to it in the same checkout); none for a folder that
    is not an app's."""
    config_dir = Path(config_dir)
    root = config_root(config_dir)
    if root is None:
        return [config_dir]
    return [config_dir, *(root / name for name in APP_CONFIGS[config_dir.name])]


def group_options(config_dir, group: str) -> list[str] | None:
    """The options of config group ``group`` on ``config_dir``'s search path (:func:`config_dirs`); ``None``
    when no folder on it has that group."""
    folders = [d / group for d in config_dirs(config_dir) if (d / group).is_dir()]
    if not folders:
        return None
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


class AppSearchPath(SearchPathPlugin):
    """Hydra search-path plugin: when the primary config folder is an app's ``<root>/<app>/``, append the
    shared folders of :data:`APP_CONFIGS` from the same ``<root>`` (:func:`config_dirs`; provider ``bdia``), for
    ``@hydra.main`` and ``initialize_config_dir`` alike. Registered when this module is imported (every script
    imports it before Hydra starts)."""

    def manipulate_search_path(self, search_path) -> None:
        for entry in list(search_path.get_path()):
            path = entry.path[len("file://"):] if entry.path.startswith("file://") else entry.path
            if entry.provider == "main" and "://" not in path:
                for folder in config_dirs(path)[1:]:
                    search_path.append("bdia", f"file://{folder}")


Plugins.instance().register(AppSearchPath)


@contextmanager
def initialize_app(app: str):
    """Hydra's compose API on ``app``'s configs: ``hydra.compose("<app>", overrides)`` inside composes what
    ``scripts/<app>.py`` would run (Hydra's earlier global state is restored afterwards)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(str(app_config_dir(app).resolve()), version_base="1.3"):
        yield


def override_value(text) -> str:
    """``text`` (e.g. a run folder's path, which holds ``=`` and ``,``) as a Hydra override value that
    composes back to exactly ``text``: single-quoted, quotes and the backslashes before them escaped,
    ``${`` escaped from OmegaConf's interpolation. ``f"run_dir={override_value(path)}"``."""
    text = str(text).replace("${", "\\${")
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _looks_like_override(arg: str) -> bool:
    key, sep, _ = arg.partition("=")
    return bool(sep) and re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.@/-]*", key) is not None and (
        "/" not in key or key.lstrip("+~").split("/")[0] in ("hydra",))


#: Hydra's flags that take the next argument as their value (``--info`` takes one of :data:`_INFO_VALUES` or none).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                     "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def take_positional_path(argv: Sequence[str], key: str) -> list[str]:
    """``argv`` with its one positional path turned into the override ``key='<path>'`` (:func:`override_value`),
    so that ``scripts/evaluate.py results/sample/default/dataset=digits,solver=bdia_edm`` works as typed. A
    positional path is an argument that names an existing file or folder, or that is not a ``key=value``
    override (``results/typo`` then fails as "no such directory"). A second one raises ``ValueError``."""
    out, found, flag_value = [], None, False
    for arg in argv:
        if flag_value or arg.startswith("-") or (_looks_like_override(arg) and not Path(arg).exists()):
            flag_value = arg in _FLAGS_WITH_VALUE
            out.append(arg)
            continue
        if out and out[-1] in ("--info", "-i") and arg in _INFO_VALUES:
            out.append(arg)
            continue
        if found is not None:
            raise ValueError(f"one {key} only: got {found!r} and {arg!r} (a sweep folder evaluates every run in it)")
        found = arg
        out.append(f"{key}={override_value(arg)}")
    return out


def run_name(override_dirname: str, extra: str | None = None) -> str:
    """A run folder's name from Hydra's ``job.override_dirname``: the overrides, or ``defaults`` when there are
    none (so a run without overrides gets a folder of its own beside the others, not their parent); ``extra``
    (e.g. :func:`prompts_tag`) is appended as one more ``key=value``."""
    name = str(override_dirname or "")
    if extra:
        return f"{name},{extra}" if name else str(extra)
    return name or "defaults"


def _slug(text: str, length: int = 24) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return words[:length].rstrip("-") or "x"


def prompts_tag(prompts=None, prompt_file=None, coco_captions=None, num_prompts=None, prompt_seed=None) -> str:
    """``prompts=<slug>-<hash>`` naming a text-to-image run's prompts in its folder name (the prompts themselves
    are left out of Hydra's override list): a slug of the first prompt (``+<n>`` more), of the prompt file's
    name or ``coco<N>``, and 8 hex digits of the prompt source's sha256 (the list, or the file path with
    ``num_prompts`` / ``prompt_seed``), so other prompts with the same seeds get another folder."""
    import hashlib
    import json

    from omegaconf import DictConfig, ListConfig, OmegaConf

    def plain(value):
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value

    prompts = plain(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts:
        slug = _slug(prompts[0]) + (f"+{len(prompts) - 1}" if len(prompts) > 1 else "")
    elif prompt_file:
        slug = _slug(Path(str(prompt_file)).stem)
    elif coco_captions:
        slug = f"coco{num_prompts or 'all'}"
    else:
        slug = "none"
    source = [prompts, None if prompt_file is None else str(prompt_file),
              None if coco_captions is None else str(coco_captions), num_prompts, prompt_seed]
    digest = hashlib.sha256(json.dumps(source, ensure_ascii=False, default=str).encode()).hexdigest()[:8]
    return f"prompts={slug}-{digest}"


_KEY_LINE = re.compile(r"^([A-Za-z_][\w]*):(.*)$")
_NESTED_KEY_LINE = re.compile(r"^  ([A-Za-z_][\w]*):(.*)$")


def config_help(path) -> str:
    """What ``--help`` says about an app's keys, from the comments of its primary config ``path``: the file's
    opening comment block, then one line per top-level key (``key: default  what it does``; indented comment lines
    after a key continue its text). The ``defaults`` list and the ``hydra`` block are left out."""
    lines = Path(path).read_text().splitlines()
    intro, rows, i = [], [], 0
    while i < len(lines) and lines[i].startswith("#"):
        intro.append(lines[i].lstrip("#")[1:] if lines[i].startswith("# ") else lines[i].lstrip("#"))
        i += 1
    skipping, block = False, None
    for line in lines[i:]:
        match = _KEY_LINE.match(line)
        nested = _NESTED_KEY_LINE.match(line) if block else None
        if match:
            key, rest = match.groups()
            skipping = key in ("defaults", "hydra")
            if skipping:
                continue
            value, _, comment = rest.partition(" #")
            block = key if not value.strip() else None  # a block of keys (train:): its keys follow as train.<key>
            if block is None or comment.strip():
                rows.append([key, value.strip(), comment.strip()])
        elif nested and not skipping:
            key, rest = nested.groups()
            value, _, comment = rest.partition(" #")
            rows.append([f"{block}.{key}", value.strip(), comment.strip()])
        elif rows and not skipping and line.strip().startswith("#") and line[:1].isspace():
            rows[-1][2] += " " + line.strip().lstrip("#").strip()
    width = max((len(k) for k, _, _ in rows), default=0)
    value_width = min(max((len(v) for _, v, _ in rows), default=0), 24)
    out = [*intro, "", "== Keys (key=value on the command line; the default, then what it does) ==", ""]
    for key, value, comment in rows:
        if len(value) > value_width:
            out += [f"  {key:<{width}}  {value}", f"  {'':<{width}}  {'':<{value_width}}  {comment}".rstrip()]
        else:
            out.append(f"  {key:<{width}}  {value:<{value_width}}  {comment}".rstrip())
    return "\n".join(out)


def key_help(_root_=None) -> str:
    """Resolver ``${bdia.key_help:}`` of the shared Hydra help template (configs/shared/hydra/bdia.yaml):
    :func:`config_help` of the primary config the app runs (``$`` doubled for the template)."""
    try:
        name = _root_.hydra.job.config_name
        folder = next(s.path for s in _root_.hydra.runtime.config_sources if s.provider == "main")
        text = config_help(Path(str(folder).removeprefix("file://")) / f"{name}.yaml")
    except Exception as e:  # noqa: BLE001 - help must print whatever happens
        text = f"(no key descriptions: {type(e).__name__}: {e})"
    return text.replace("$", "$$")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("bdia.key_help"):
        OmegaConf.register_new_resolver("bdia.key_help", key_help)

    if not OmegaConf.has_resolver("bdia.run_name"):
        OmegaConf.register_new_resolver("bdia.run_name", run_name)
    if not OmegaConf.has_resolver("bdia.prompts_tag"):
        OmegaConf.register_new_resolver("bdia.prompts_tag", prompts_tag)


_register_resolvers()  # the app configs' out_dir uses ${bdia.run_name:...}

#: Exceptions that mean "the input is wrong or a file is missing", reported as one line without a traceback.
USER_ERRORS = (ValueError, AssetUnavailableError, SnapshotError, FloatingPointError)

#: The longest error line printed (a message quoting a huge value is cut, never spread over many lines).
MAX_LINE = 2000


def one_line(error: BaseException | str) -> str:
    """A (possibly multi-line) message as one line: lines stripped and joined with `` | ``, runs of spaces
    collapsed, control characters shown escaped, at most :data:`MAX_LINE` characters."""
    try:
        text = str(error)
    except RecursionError:  # a message built from a value nested too deeply to print
        text = f"{type(error).__name__} (its message is too deeply nested to print)"
    text = " | ".join(re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


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


def _compose_error_line(error: BaseException, config_dir: Path) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException):
        return _missing_config_line(error)
    message = str(error)
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message}\n{cause}"
    line = one_line(message.split("Config search path:")[0])
    missing = re.search(r"Key '(gamma|num_steps)' is not in struct", line)
    if missing and group_options(config_dir, "solver"):  # the spelling before every app had a solver group
        line += f" | the solver's settings are solver.{missing.group(1)}=..."
    return line


#: Jobs of a sweep checked before any runs (a larger sweep has its first ones checked; the rest when they run).
MAX_CHECKED_JOBS = 1000


def _unknown_top_level_keys(parsed, config_dir: Path, base_keys) -> str | None:
    """``+foo=1`` / ``++foo=1`` that would add a top-level key the app does not have (Hydra accepts them silently)."""
    for o in parsed:
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or "." in key or "/" in key or key.startswith("hydra"):
            continue
        if group_options(config_dir, key) is not None or key in base_keys:
            continue
        shown = ", ".join(sorted(k for k in base_keys if k != "hydra"))
        return f"unknown setting {key!r} ({o.input_line}); this app's settings: {shown}"
    return None


def _jobs(parsed, sweep_params, argv_overrides) -> list[list[str]]:
    """The override lists of a multirun's jobs, as Hydra's basic sweeper forms them (the config's
    ``hydra.sweeper.params`` first, then the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweep_params or {}).items()]
    all_parsed = OverridesParser.create().parse_overrides([*params, *argv_overrides])
    return BasicSweeper.split_arguments(all_parsed, None)[0]


def _check_job(config_name: str, overrides: list[str], config_dir: Path, check) -> str | None:
    """Compose one job exactly as Hydra will and run the app's ``check(cfg)`` (cheap: no model, no writes). A
    problem of the job's values (not of the command line's names) is prefixed by ``@job:``."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    try:
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except Exception as e:
        return _compose_error_line(e, config_dir)
    if check is None:
        return None
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations (out_dir) resolve as in the job
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        check(cfg)
    except USER_ERRORS as e:
        return "@job:" + one_line(e)
    except OSError as e:
        return f"@job:cannot read or write a file: {one_line(e)}"
    except Exception as e:  # an interpolation that does not resolve, a value of the wrong type
        if type(e).__module__.startswith("omegaconf"):
            return "@job:" + one_line(str(e).split("full_key:")[0])
        raise
    finally:
        HydraConfig.instance().cfg = None
    return None


def preflight(argv: Sequence[str], config_dir=None, config_name: str = "sample", check=None) -> str | None:
    """Check an app's command line (``sys.argv[1:]``; the app's primary config ``config_name`` in
    ``config_dir``, default ``configs/<config_name>/``) before Hydra runs it; return one line describing the
    first problem, or ``None``.

    Every job is composed exactly as Hydra will (``hydra.compose``; a multirun ``-m`` is expanded into its jobs
    as Hydra's basic sweeper does, the config's ``hydra.sweeper.params`` included, and **every** job is checked
    before any runs), which catches unknown config names (the line lists the valid ones), keys that do not
    exist, malformed values and ``+key=value`` adding a top-level key the app does not have. ``check(cfg)``, the
    app's own check of a composed config (no model loaded, nothing written: values of the wrong type, bounds,
    the run folder), runs on each job; its one-line ``ValueError`` is the answer. Command lines with other Hydra
    flags (``--cfg``, ``--help`` …) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, multirun = [], False
    for arg in argv:
        if arg in ("-m", "--multirun"):
            multirun = True
            continue
        if arg.startswith("-"):  # --cfg, --help, --info ...: Hydra's own business
            return None
        overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        return f"cannot parse the command line: {one_line(e)}"
    config_dir = Path(config_dir) if config_dir is not None else app_config_dir(config_name)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        o = sweeps[0]
        return f"{o.input_line} is a sweep: add -m (multirun) to run one job per value"
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
        try:
            base = compose(config_name, overrides=fixed, return_hydra_config=True)
        except Exception as e:
            return _compose_error_line(e, config_dir)
        adds = {o.input_line for o in parsed if (o.is_add() or o.is_force_add()) and "." not in o.key_or_group}
        known = set(compose(config_name, overrides=[f for f in fixed if f not in adds]).keys()) if adds else set()
        problem = _unknown_top_level_keys(parsed, config_dir, known)
        if problem:
            return problem
        if not multirun:
            problem = _check_job(config_name, overrides, config_dir, check)
            return problem.removeprefix("@job:") if problem else None
        from omegaconf import OmegaConf

        sweep_params = OmegaConf.to_container(base.hydra.sweeper, resolve=False).get("params") \
            if "sweeper" in base.hydra else None
        try:
            jobs = _jobs(parsed, sweep_params, overrides)
        except Exception as e:
            return f"cannot expand the sweep: {one_line(e)}"
        for number, job in enumerate(jobs[:MAX_CHECKED_JOBS]):
            problem = _check_job(config_name, job, config_dir, check)
            if problem:
                if len(jobs) == 1 or not problem.startswith("@job:"):  # a bad name is bad in every job
                    return problem.removeprefix("@job:")
                problem = problem.removeprefix("@job:")
                where = f"sweep job {number + 1} of {len(jobs)}: {' '.join(job) or 'no overrides'}"
                return f"{problem} ({where}); no job was run"
    return None


# --------------------------------------------------------------------------------------------------
# What the Hydra shells in scripts/ share.


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


#: What a run says when it is interrupted (Ctrl-C): the apps resume where they stopped.
INTERRUPTED = "interrupted; rerun the same command to resume"
#: Settings an out-of-memory message may suggest lowering, in order, when the app has them.
_MEMORY_KEYS = ("batch_size", "network_batch", "image_size", "height", "width")


def _memory_advice(cfg) -> str:
    keys = [k for k in _MEMORY_KEYS if cfg is not None and k in cfg]
    if cfg is not None and "train" in cfg and "batch_size" in (cfg.get("train") or {}):
        keys.insert(0, "train.batch_size")
    return f"; lower {' or '.join(keys)}" if keys else ""


def run_job(job, cfg, interrupted: str = INTERRUPTED):
    """Inside a ``@hydra.main`` function: ``job(cfg, choices=<the config-group choices>)``. A user mistake
    (:data:`USER_ERRORS`) or a file-system refusal (``OSError``: disk full, file-size limit, permissions) ends the
    process with one line ``error: ...`` and exit status 1; running out of memory with one line naming the
    settings the app has that would lower it; Ctrl-C (SIGINT) with the one line ``interrupted`` (exit status
    130). ``HYDRA_FULL_ERROR=1``: the traceback instead."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return job(cfg, choices=dict(HydraConfig.get().runtime.choices))
    except KeyboardInterrupt:
        if _full_errors():
            raise
        print(interrupted, file=sys.stderr, flush=True)
        sys.exit(130)
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
        sys.exit(f"error: out of memory ({one_line(e)[:200]}){_memory_advice(cfg)}")
    except RecursionError as e:
        if _full_errors():
            raise
        sys.exit(f"error: an input is nested too deeply to read ({one_line(e)[:200]})")


def _out_of_memory(error: BaseException) -> bool:
    """CPU allocation failures (MemoryError, torch's "can't allocate memory") and CUDA's OutOfMemoryError."""
    import torch

    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error) or "out of memory" in str(error).lower())


def run_command_line(main, config_name: str, config_dir=None, check=None) -> None:
    """A script's entry point: check ``sys.argv``'s overrides with :func:`preflight` against the app's configs
    (``config_dir``, default ``configs/<config_name>/``: the folder its ``@hydra.main`` names; ``check``: the
    app's check of a composed config, run on every job of a sweep before any runs), one-line errors, then let
    Hydra run ``main``."""
    try:
        problem = None if _full_errors() else preflight(sys.argv[1:], config_dir, config_name, check)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    if problem:
        sys.exit(f"error: {problem}")
    main()


# --------------------------------------------------------------------------------------------------
# What every app prints when it is done: a short summary (run folder, headline numbers, what to run next).


def run_timing(stats, timed: int, num_images: int, phases: Sequence[str]) -> dict:
    """The run's measured time, kept across resumes: ``sampling_seconds`` sums every image's own seconds (its
    record's ``seconds_<phase>``: its batch's time over the batch size, whichever session sampled it; under K
    ranks the ranks' times add up), ``images_per_second`` = ``timed_images`` / those seconds (one process's
    rate), ``timed_images``: the images whose time is recorded (fewer than the run's only in folders written
    before per-image times were recorded; the numbers then cover those images). ``session``: what this
    invocation did (images sampled now, the slowest rank's seconds, the ranks' combined rate)."""
    seconds = sum(stats.seconds_all.get(phase, 0.0) for phase in phases)
    now = sum(stats.seconds.get(phase, 0.0) for phase in phases)
    out = {
        "sampling_seconds": round(seconds, 4) if timed else None,
        "images_per_second": round(timed / seconds, 3) if timed and seconds > 0 else None,
        "timed_images": timed,
        "session": {"num_sampled": stats.sampled, "num_resumed": num_images - stats.sampled,
                    "sampling_seconds": round(now, 4),
                    "images_per_second": round(stats.sampled / now, 3) if stats.sampled and now > 0 else None},
    }
    if len(phases) > 1:
        out.update({f"{phase}_seconds": round(stats.seconds_all.get(phase, 0.0), 4) if timed else None for phase in phases})
    return out


def speed_text(metrics: dict) -> str:
    """``12.3 images/s (5.2 s for 64 images)``, with what this session did when it resumed images."""
    rate, timed = metrics.get("images_per_second"), metrics.get("timed_images")
    session = metrics.get("session") or {}
    if rate is None:
        text = "speed unknown (no image of this run has a recorded time)"
    else:
        text = f"{rate:g} images/s per process ({timed / rate:.2f} s for {timed} images"
        text += ")" if timed == metrics.get("num_images") else f"; the other {metrics['num_images'] - timed} have no recorded time)"
    resumed = session.get("num_resumed", metrics.get("num_resumed")) or 0
    if resumed:
        sampled = session.get("num_sampled", 0)
        text += f"; this session sampled {sampled} and resumed {resumed}" if sampled else f"; all {resumed} images resumed"
    return text


def sweep_folder() -> str | None:
    """Inside a Hydra multirun job: the sweep's folder (``hydra.sweep.dir``, where ``scripts/summarize.py``
    tabulates every run); ``None`` otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(hydra_cfg.sweep.dir)


def shell_command(*args) -> str:
    """A command line that works when pasted into a POSIX shell (each argument quoted where it needs it)."""
    import shlex

    return shlex.join(str(a) for a in args)


def _g(value, fmt: str = ".4g") -> str:
    return "unknown" if value is None else format(value, fmt)


def headline_rows(evaluation: dict | None) -> list[tuple[str, str]]:
    """One summary row per metric in a run's ``metrics.json["evaluation"]``: FD / KID with the real-data floors
    (digits), FID, CLIP score, or the metric's top-level numbers."""
    rows = []
    for name, values in (evaluation or {}).items():
        if not isinstance(values, dict):
            continue
        label = values.get("label")
        if "fd" in values or "fid" in values:
            key = "fd" if "fd" in values else "fid"
            text = f"{key.upper()} {_g(values.get(key))}"
            if values.get("kid") is not None:
                text += f", KID {_g(values['kid'], '.3g')}"
            detail = ", ".join(str(x) for x in (label, f"{values['num_images']} images" if values.get("num_images") else None) if x)
            rows.append((name, text + (f" ({detail})" if detail else "")))
            floors = []
            if values.get("floor_matched_fd") is not None:
                floors.append(f"FD {_g(values['floor_matched_fd'])} ({values.get('floor_matched_num_images', 'as many')} "
                              f"real training digits)")
            if values.get("floor_halves_fd") is not None:
                floors.append(f"FD {_g(values['floor_halves_fd'])} (two disjoint halves of the real digits)")
            if floors:
                rows.append(("real-data floor", "; ".join(floors)))
        elif "noise_relative_error" in values:  # metrics=inversion (bdia.metrics.inversion)
            rows.append((name, f"noise recovered to {_g(values['noise_relative_error'], '.2g')} relative "
                               f"(max abs {_g(values['noise_max_abs_error'], '.2g')}), pair regenerated to "
                               f"{_g(values['pair_relative_error'], '.2g')}, {values.get('images_identical')} of "
                               f"{values.get('num_images')} images identical (network batch {values.get('network_batch')})"))
        elif "clip_score" in values:
            text = f"CLIP score {_g(values['clip_score'], '.2f')} (100 x cosine, clipped at 0"
            if values.get("model"):
                text += f"; {values['model']}" + (": random weights, the score means nothing"
                                                   if has_random_weights(values["model"]) else "")
            rows.append((name, text + ")"))
        else:
            numbers = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if numbers:
                rows.append((name, ", ".join(f"{k} {_g(v)}" for k, v in numbers[:5])))
    return rows


def summary_text(title: str, rows: Sequence[tuple[str, str | None]]) -> str:
    """``title`` and aligned ``label  text`` rows (rows whose text is empty are left out)."""
    rows = [(str(k), str(v)) for k, v in rows if v not in (None, "")]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def print_summary(title: str, rows: Sequence[tuple[str, str | None]]) -> None:
    """Print :func:`summary_text` to stdout (what an app shows when it is done)."""
    print(summary_text(title, rows), flush=True)
