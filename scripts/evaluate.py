"""Evaluate a run folder, or every run folder of a sweep: FID, FD/KID in digits-classifier features, CLIP score,
reconstruction errors. The numbers are merged into each run's ``metrics.json`` (under ``"evaluation"``) and
logged through the ``logger`` group.

    python scripts/evaluate.py results/sample/default/dataset=digits,solver=bdia_edm   # a run folder, as printed
    python scripts/evaluate.py results/sample/table2_cifar10 metrics=fid    # a sweep: every run below it
    python scripts/evaluate.py <run folder> metrics=fid metrics.fid.backend=clean_fid metrics.fid.weights=/data/inception.pt
    python scripts/evaluate.py <run folder> 'metrics=[fid,clip]' logger=wandb
    torchrun --standalone --nproc_per_node=2 scripts/evaluate.py <run folder> metrics=fid   # sharded over ranks
    python scripts/evaluate.py --cfg job                                             # print the config

The run folder is the first argument, taken verbatim (run folders are named after their overrides, so they hold
``=`` and ``,``, which Hydra's override grammar would read as syntax); ``run_dir='<path>'`` (quoted) works too.

Configs: ``configs/evaluate/evaluate.yaml``; the ``metrics/*.yaml`` of ``configs/{image,digits,prompt}_metrics/``
map metric names to ``_target_`` classes whose arguments are the YAML keys (``bdia.metrics.FID``, ``DigitsFD``,
``CLIPScore``, ``Reconstruction``).

Bad input (no run folder given, no such folder, no runs in it, an unknown option, a missing asset offline) ends with one line
``error: ...`` on stderr and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Under torchrun
every rank computes its shard; rank 0 writes ``metrics.json``, logs and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdia.apps.cli import (  # noqa: E402
    headline_rows,
    run_command_line,
    run_job,
    shell_command,
    summary_text,
    take_positional_path,
)
from bdia.configs import build_metrics, instantiate  # noqa: E402
from bdia.distributed import init_distributed, is_main_process  # noqa: E402
from bdia.metrics.evaluate import evaluate_runs, find_runs  # noqa: E402


def _summary(results: dict, run_dir, written: bool = True) -> str:
    """Per run folder its headline numbers (bdia.apps.cli.headline_rows); for several, how to tabulate them."""
    where = [("written to", "{run}/metrics.json (evaluation)")] if written else [("written to", "nothing (write=false)")]
    parts = [summary_text(f"evaluate: {run}", headline_rows(metrics) + [(k, v.format(run=run)) for k, v in where])
             for run, metrics in results.items()]
    if len(results) > 1:
        parts.append(f"{len(results)} runs; as one table: {shell_command('python', 'scripts/summarize.py', run_dir)}")
    return "\n".join(parts)


def evaluate_from_config(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ValueError("no run folder: python scripts/evaluate.py <run folder or sweep folder> [metrics=...]")
    config = OmegaConf.to_container(cfg, resolve=True)
    find_runs(cfg.run_dir)  # fail on a bad folder before building any metric
    metrics_cfg = cfg.get("metrics") or {}
    if not metrics_cfg:
        raise ValueError("no metrics selected (metrics=none); choose e.g. metrics=digits or metrics=fid")
    metrics = build_metrics(metrics_cfg)
    logger = instantiate(cfg.logger, "logger") if cfg.get("logger") else None
    return evaluate_runs(cfg.run_dir, metrics, logger=logger, config=config, name=cfg.get("name"),
                         group=cfg.get("group"), write=bool(cfg.get("write", True)))


def _job(cfg: DictConfig, choices=None) -> dict:
    init_distributed()
    return evaluate_from_config(cfg)


@hydra.main(config_path="../configs/evaluate", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    results = run_job(_job, cfg)
    if is_main_process():
        print(_summary(results, cfg.run_dir, bool(cfg.get("write", True))), flush=True)
    return results


def cli() -> None:
    """The command line: the first argument is the run folder (verbatim), then overrides (checked, one-line
    errors), then Hydra runs ``main``."""
    try:
        sys.argv[1:] = take_positional_path(sys.argv[1:], "run_dir")
    except ValueError as e:
        sys.exit(f"error: {e}")
    run_command_line(main, config_name="evaluate")


if __name__ == "__main__":
    cli()
