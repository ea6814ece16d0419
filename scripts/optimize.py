"""Optimise the starting noise of the embedded digits model so the shipped digits classifier reads a chosen class,
back-propagating through every sampling step in constant memory (``bdia.apps.optimize``, ``bdia.sample_with_grad``).

    python scripts/optimize.py                                 # class 3, 64 images, BDIA-EDM (35 NFE), 8 iterations
    python scripts/optimize.py target_class=7 iterations=12
    python scripts/optimize.py iterations=16                   # continues the run above after its last iteration
    python scripts/optimize.py logger=wandb                    # W&B (offline by default), a point per iteration

Writes ``out_dir`` (default ``results/optimize/<overrides>``; :mod:`bdia.runfolder`: only a new, empty or own optimize
folder, with a lock held): ``before_after.png`` (before/after grids, each digit marked with the classifier's
reading), ``before.png``, ``after.png``, ``loss.png``, ``metrics.json`` (accuracy on the target class before and
after), ``images.npz``, ``history.jsonl``, ``state.npz`` (resume), ``settings.json``, ``config.yaml``, ``env.json``.
Rerunning the same command resumes after the last finished iteration; other settings are refused
(``resume=false`` starts afresh). Mistakes end with one line ``error: ...`` and exit status 1.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bdia.apps.cli import run_command_line, run_job
from bdia.apps.optimize import check_config, optimize_from_config


@hydra.main(config_path="../configs/optimize", config_name="optimize", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_job(optimize_from_config, cfg)


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="optimize", check=check_config)


if __name__ == "__main__":
    cli()
