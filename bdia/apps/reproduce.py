"""Reproduce a paper table: run its Hydra multiruns (on 1..N GPUs, locally or on SLURM), then build the table.

A table is a spec in ``configs/tables/<name>.yaml`` (see :mod:`bdia.apps.tables` for the display keys):

    name: table2_mini
    script: scripts/sample.py          # the Hydra app every sweep runs
    config: sample                     # its config (configs/sample/sample.yaml: the dry run composes its jobs)
    runs_root: results/sample          # where that app's sweeps put run folders: <runs_root>/<experiment_name>/
    output: results/embedded/table2    # .md / .csv / .png
    sweeps:                            # one Hydra multirun each: the cartesian product of its comma lists
      - [experiment=table2_digits, solver=edm, "solver.num_steps=3,5,8,13,18"]
    smoke: [seeds=0-7]                 # --smoke (tests): these overrides, and every comma list cut to
    smoke_values: 2                    #   its first smoke_values entries
    multi_gpu: true                    # false: the script has no torchrun sharding (ngpu > 1 is refused)
    wandb: true                        # false: the script has no W&B logger (--wandb is refused)

Each sweep runs as ``python <script> -m <overrides>``; with ``ngpu > 1`` under ``torchrun --nproc_per_node=ngpu``
(``launcher=torchrun``: every run's seeds are split over the ranks, rank r sampling ``seeds[r::ngpu]``), with
``launcher="slurm"`` through Hydra's submitit launcher (one array task per job, ``ngpu`` tasks per node; the
launcher waits for its array to finish, so the table is built afterwards as in a local run).
Runs resume, so rerunning a target only samples what is missing and rebuilds the table. ``dry_run`` prints
every job (its composed overrides, seeds and rank layout) and runs nothing.
"""

from __future__ import annotations

import itertools
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from ..imageio import parse_seeds
from ..logger import WandbLogger
from ..rex import rex_nfe
from .cli import CONFIG_DIR, initialize_app, preflight
from .tables import split_values, write_table

__all__ = ["SPEC_DIR", "load_spec", "spec_names", "split_values", "expand_sweep", "plan_sweeps", "run_roots",
           "sweep_commands", "plan_jobs", "planned_nfe", "planned_images", "dry_run_text", "table_output",
           "reproduce"]

REPO_ROOT = CONFIG_DIR.parent
SPEC_DIR = CONFIG_DIR / "tables"
LAUNCHERS = ("local", "slurm")
_REQUIRED = ("name", "title", "script", "config", "runs_root", "output", "sweeps", "section", "lines", "column", "metrics")


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name: str) -> dict:
    """The table spec ``configs/tables/<name>.yaml`` as a plain dict (``-`` in the name is read as ``_``)."""
    name = str(name).replace("-", "_")
    path = SPEC_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown table {name!r}; tables: {', '.join(spec_names())}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"table spec {path} lacks {missing}")
    return spec


def _key_value(override: str) -> tuple[str, str]:
    key, sep, value = override.partition("=")
    if not sep:
        raise ValueError(f"an override is key=value, got {override!r}")
    return key, value


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of one multirun: the cartesian product of its comma-separated values, in Hydra's order."""
    choices = []
    for override in overrides:
        key, value = _key_value(override)
        choices.append([f"{key}={v}" for v in split_values(value)])
    return [list(job) for job in itertools.product(*choices)]


def _merge(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` with ``extra`` appended; an extra key replaces the same key in ``base``."""
    keys = {_key_value(o)[0] for o in extra}
    return [o for o in base if _key_value(o)[0] not in keys] + list(extra)


def plan_sweeps(spec: Mapping[str, Any], extra: Sequence[str] = (), smoke: bool = False) -> list[list[str]]:
    """The override list of every multirun: the spec's sweep, the smoke cut (``smoke=True``), then ``extra``."""
    sweeps = []
    for sweep in spec["sweeps"]:
        overrides = [str(o) for o in sweep]
        if smoke:
            keep = int(spec.get("smoke_values", 1))
            overrides = [f"{k}={','.join(split_values(v)[:keep])}" for k, v in map(_key_value, overrides)]
            overrides = _merge(overrides, [str(o) for o in spec.get("smoke") or []])
        sweeps.append(_merge(overrides, extra))
    return sweeps


def _experiments(sweeps: Sequence[Sequence[str]]) -> list[str]:
    names = []
    for sweep in sweeps:
        for override in sweep:
            key, value = _key_value(override)
            if key in ("experiment", "experiment_name"):  # experiment files set experiment_name to their own name
                names += [v for v in split_values(value) if v not in names]
    return names


def run_roots(spec: Mapping[str, Any], runs_root: str | Path | None = None) -> list[Path]:
    """Folders whose sub-folders are this table's runs: ``<runs_root>/<experiment>`` per experiment named."""
    root = Path(runs_root or spec["runs_root"])
    return [root / name for name in _experiments(spec["sweeps"])]


def sweep_commands(spec: Mapping[str, Any], sweeps: Sequence[Sequence[str]], ngpu: int = 1, launcher: str = "local",
                   runs_root: str | Path | None = None, python: str = sys.executable) -> list[list[str]]:
    """One command line per multirun."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {list(LAUNCHERS)}, got {launcher!r}")
    if int(ngpu) < 1:
        raise ValueError(f"ngpu must be >= 1, got {ngpu}")
    if ngpu > 1 and not spec.get("multi_gpu", True):
        raise ValueError(f"{spec['script']} runs on one process; table {spec['name']} cannot use ngpu={ngpu} "
                         f"(launcher=slurm runs its jobs in parallel instead)")
    commands = []
    for sweep in sweeps:
        overrides = list(sweep)
        if runs_root is not None:
            overrides.append(f"hydra.sweep.dir={Path(runs_root)}/${{experiment_name}}")
        if launcher == "slurm":
            overrides += ["launcher=slurm", f"hydra.launcher.gpus_per_node={ngpu}", f"hydra.launcher.tasks_per_node={ngpu}"]
            commands.append([python, spec["script"], "-m", *overrides])
        elif ngpu > 1:
            commands.append([python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ngpu}",
                             spec["script"], "-m", "launcher=torchrun", *overrides])
        else:
            commands.append([python, spec["script"], "-m", *overrides])
    return commands


def plan_jobs(spec: Mapping[str, Any], sweeps: Sequence[Sequence[str]], compose: bool = True) -> list[dict]:
    """Every job of every multirun: its overrides and, composed with Hydra (which also validates them), its
    seeds and the settings that identify the table cell."""
    jobs = []
    for index, sweep in enumerate(sweeps):
        for overrides in expand_sweep(sweep):
            job = {"sweep": index, "overrides": overrides}
            if compose:
                cfg = _compose(spec["config"], overrides)
                job["seeds"] = None if cfg.get("seeds") is None else str(cfg.get("seeds"))  # edit runs: one image
                job["config"] = cfg
            jobs.append(job)
    return jobs


def _compose(config_name: str, overrides: Sequence[str]):
    """The job's config as its app composes it (``configs/<config_name>/`` and that app's shared folders)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_app(config_name):
        return compose(config_name=config_name, overrides=list(overrides))


def planned_images(cfg) -> int:
    """Images a job makes: one per seed, or for text-to-image one per (prompt, seed)."""
    if cfg.get("seeds") is None:
        return 1  # scripts/edit.py: one real image per run
    count = len(parse_seeds(str(cfg.get("seeds"))))
    if "num_prompts" in cfg or "prompts" in cfg:
        prompts = cfg.get("num_prompts") or (len(cfg.prompts) if cfg.get("prompts") is not None else None)
        count *= int(prompts) if prompts else 1
    return count


def _rank_layout(count: int, ngpu: int, launcher: str, items: str = "seeds") -> str:
    where = "one SLURM array task" if launcher == "slurm" else ("torchrun" if ngpu > 1 else "one process")
    if ngpu == 1:
        return f"{count} images, {where}"
    per = f"{count // ngpu}" if count % ngpu == 0 else f"{count // ngpu}-{math.ceil(count / ngpu)}"
    return f"{count} images, {where}: {ngpu} ranks, rank r samples {items}[r::{ngpu}] ({per} each)"


def planned_nfe(cfg) -> int | None:
    """Network evaluations per image a job will make (the runs measure it; this is for planning): N for the DDIM
    family, 2N - 1 for the EDM family (Heun, Euler onto sigma = 0), plus N - 1 with BDIA-EDM's Heun backward map (one per BDIA step)."""
    solver = cfg.get("solver") if hasattr(cfg, "get") else None
    if solver is None or solver.get("num_steps") is None:
        return None
    steps = int(solver.num_steps)
    if solver.name in ("ddim", "bdia_ddim", "dpmpp_2m", "unipc", "ipndm"):
        return steps
    if solver.name == "rex":  # 2 s (N - 1) + 1 for an s-stage tableau (bdia.rex)
        return rex_nfe(steps, solver.get("tableau", "midpoint"))
    extra = steps - 1 if solver.get("backward") == "heun" else 0
    return 2 * steps - 1 + extra


def dry_run_text(spec: Mapping[str, Any], sweeps: Sequence[Sequence[str]], ngpu: int = 1, launcher: str = "local",
                 runs_root: str | Path | None = None) -> str:
    """What :func:`reproduce` would run: the commands, then every job with its seeds and rank layout."""
    lines = [f"# {spec['name']}: {spec['title']}", f"# dry run: {len(sweeps)} multirun(s), nothing is executed"]
    commands = sweep_commands(spec, sweeps, ngpu, launcher, runs_root, python="python")
    jobs = plan_jobs(spec, sweeps)
    evaluations = 0
    for index, command in enumerate(commands):
        lines.append(f"multirun {index}: {shlex.join(command)}")
        for job in (j for j in jobs if j["sweep"] == index):
            nfe = planned_nfe(job["config"])
            cost = "" if nfe is None else f" | NFE {nfe}"
            images = planned_images(job["config"])
            evaluations += (nfe or 0) * images
            lines.append(f"  job: {' '.join(job['overrides'])} | seeds {job['seeds'] or '-'} | "
                         f"{_rank_layout(images, ngpu, launcher, 'items' if spec['config'] == 'text2image' else 'seeds')}{cost}")
    lines.append(f"then: python scripts/make_tables.py {spec['name']} -> {spec['output']}.{{md,csv,png}}")
    total = f"total: {len(jobs)} jobs"
    if evaluations:
        total += f", {evaluations:,} network evaluations (images x NFE)"
    lines.append(total)
    return "\n".join(lines)


def table_output(spec: Mapping[str, Any], output: str | Path | None = None, results_dir: str | Path | None = None) -> Path:
    """Where a table's ``.md`` / ``.csv`` / ``.png`` go: ``output``, else the spec's ``output``
    (``results/<path>``) moved under ``results_dir`` (``results/local`` keeps the tracked ``results/`` files
    as they are: ``make`` writes there unless ``REGENERATE=1``)."""
    if output is not None:
        return Path(output)
    path = Path(spec["output"])
    if results_dir is None:
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "results" else path.parts
    return Path(results_dir, *parts)


#: Each app's check of a composed config (what its script runs on every job before any runs), by config name.
APP_CHECKS = {"sample": "bdia.apps.sample:check_config", "text2image": "bdia.apps.text2image:check_config",
              "edit": "bdia.apps.edit:check_config", "train": "bdia.apps.train:check_config"}


def check_sweeps(spec: Mapping[str, Any], sweeps: Sequence[Sequence[str]]) -> None:
    """Every job of every sweep composed as its script will compose it and checked by the app's own check
    (:data:`APP_CHECKS`; :func:`bdia.apps.cli.preflight`): a malformed or unknown override, a value of the wrong
    type or out of bounds, an unusable run folder is one ``ValueError`` naming the sweep, before anything runs."""
    import importlib

    target = APP_CHECKS.get(spec["config"])
    check = None
    if target is not None:  # the app is named by a string, like a config's _target_ (apps never import apps)
        module, name = target.split(":")
        check = getattr(importlib.import_module(module), name)
    for index, sweep in enumerate(sweeps):
        problem = preflight(["-m", *sweep], config_name=spec["config"], check=check)
        if problem:
            raise ValueError(f"{spec['name']} multirun {index} ({' '.join(sweep)}): {problem}")


def reproduce(name: str, ngpu: int = 1, launcher: str = "local", dry_run: bool = False, smoke: bool = False,
              extra: Sequence[str] = (), runs_root: str | Path | None = None, output: str | Path | None = None,
              wandb: bool = False, python: str = sys.executable, results_dir: str | Path | None = None) -> dict:
    """Run every multirun of table ``name`` (resuming), then write its table (:func:`table_output`). Returns
    what was done."""
    spec = load_spec(name)
    output = table_output(spec, output, results_dir)
    if wandb and not spec.get("wandb", True):
        raise ValueError(f"{spec['script']} has no W&B logger (its table spec says wandb: false)")
    extra = list(extra) + (["logger=wandb", f"logger.group={spec['name']}"] if wandb else [])
    sweeps = plan_sweeps(spec, extra, smoke=smoke)
    check_sweeps(spec, sweeps)  # every job of every sweep, before anything runs (dry run included)
    if dry_run:
        text = dry_run_text(spec, sweeps, ngpu, launcher, runs_root)
        print(text)
        return {"dry_run": text}
    for command in sweep_commands(spec, sweeps, ngpu, launcher, runs_root, python=python):
        print("+", shlex.join(command), flush=True)
        result = subprocess.run(command, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with status {result.returncode}; rerun to resume")
    label = f"make reproduce-{spec['name'].replace('_', '-')}"
    logger = None
    if wandb:
        table_dir = Path(output or spec["output"]).parent
        table_dir.mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(job_type="table", group=spec["name"])
        logger.start({"table": spec["name"]}, run_dir=table_dir, name=f"{spec['name']}-summary")
    try:
        paths = write_table(spec, run_roots(spec, runs_root), output, command=label, logger=logger)
    finally:
        if logger is not None:
            logger.finish()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return {"paths": paths}
