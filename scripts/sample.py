"""Sample images with DDIM, BDIA-DDIM, EDM or BDIA-EDM; write PNGs, images.npz, an image grid and metrics.

    python scripts/sample.py                                  # analytic digits (dataset=gmm), BDIA-EDM, 18 steps
    python scripts/sample.py solver=bdia_edm dataset=cifar10  # NVIDIA's EDM network (downloaded on first use)
    python scripts/sample.py dataset=cifar10 model.path=/data/edm-cifar10-32x32-cond-vp.pkl   # a local file
    python scripts/sample.py solver=bdia_ddim solver.gamma=0.9 solver.num_steps=50 seeds=0-255
    python scripts/sample.py dataset=cifar10 class_idx=3 save_states=true                     # one class; BDIA pair
    python scripts/sample.py metrics=digits                   # + FD/KID in digits-classifier features afterwards
    python scripts/sample.py -m experiment=digits_demo        # a sweep: one run folder per override set
    torchrun --standalone --nproc_per_node=8 scripts/sample.py launcher=torchrun dataset=cifar10 seeds=0-49999
    python scripts/sample.py -m experiment=table2_cifar10 launcher=slurm hydra.launcher.partition=gpu
    python scripts/sample.py --cfg job                        # print the composed config and exit

Configs: ``configs/sample/sample.yaml`` and its groups: its own (``configs/sample/``: dataset/ model/ solver/
experiment/) and the shared ones it runs (metrics/ logger/ launcher/; :data:`bdia.apps.cli.APP_CONFIGS`).
The work is done by :func:`bdia.apps.sample.sample_from_config` and :func:`bdia.apps.sample.sample_run`.

Output: ``out_dir`` (default ``results/sample/<experiment_name>/<overrides>``) holds ``images/<seed:06d>.png``,
``records/<seed:06d>.npz``, ``images.npz``, ``grid.png``, ``metrics.json`` (NFE measured, wall time,
images/s), ``env.json``, ``config.yaml`` (resolved), ``settings.json`` and the marker ``.bdia-run.json``
(:mod:`bdia.runfolder`: only a new, empty or own run folder is written). Rerunning the same command resumes:
seeds already written are skipped (``resume=false`` starts afresh).

Mistakes (an unknown config name, malformed seeds, gamma outside [0, 1], a missing ``model.path``, a
checkpoint that cannot be downloaded) end with one line ``error: ...`` on stderr and exit status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bdia.apps.cli import run_command_line, run_job
from bdia.apps.sample import check_config, sample_from_config


@hydra.main(config_path="../configs/sample", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    return run_job(sample_from_config, cfg)


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="sample", check=check_config)


if __name__ == "__main__":
    cli()
