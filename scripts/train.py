"""Train the embedded digits model with EDM's preconditioning, loss and EMA (``bdia.apps.train``).

    python scripts/train.py                                   # configs/train/train.yaml
    python scripts/train.py train.total_images=20000 out_dir=/tmp/quick

Writes the run folder ``out_dir`` (:mod:`bdia.runfolder`: only a new, empty or own train folder, with a lock
held): ``final.safetensors`` (EMA weights, constructor arguments and training config in the metadata),
``checkpoint-*.safetensors``, ``training_log.jsonl``, ``settings.json``, ``config.yaml`` and ``env.json``.
Deterministic for a given seed and thread count on the CPU. A rerun with the same settings keeps a finished
run; ``resume=false`` replaces it. Mistakes end with one line ``error: ...`` and exit status 1.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bdia.apps.cli import run_command_line, run_job
from bdia.apps.train import check_config, train_from_config


@hydra.main(config_path="../configs/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_job(train_from_config, cfg, interrupted="interrupted; training cannot continue midway: rerun to "
                                                       "train again from the start")


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="train", check=check_config)


if __name__ == "__main__":
    cli()
