"""Sample images with DDIM, BDIA-DDIM, EDM or BDIA-EDM; write the images, an image grid and metrics.

    python scripts/sample.py                                  # BDIA-EDM, gamma 0.5, 18 steps (NFE 35), seeds 0-63
    python scripts/sample.py solver=ddim seeds=0-255
    python scripts/sample.py solver=bdia_ddim solver.gamma=0.9 solver.num_steps=50
    python scripts/sample.py solver=edm solver.s_churn=40     # stochastic EDM; churn noise per image
    python scripts/sample.py out_dir=/tmp/run1 batch_size=16 device=cuda
    python scripts/sample.py --cfg job                        # print the composed config and exit

Model: until trained networks exist, the default ``dataset=gmm_digits`` is analytic: a Gaussian mixture with
one component per scikit-learn digit (``bdia.analytic.digits_gmm``), whose exact denoiser stands in for a
network. Configs: ``configs/sample.yaml`` (keys = ``bdia.run.sample_run`` arguments), ``configs/solver/``,
``configs/dataset/``.

Output: ``out_dir``, by default ``results/sample/<solver name>`` relative to the current directory (git-ignored),
holds ``images/<seed:06d>.png``, ``images.npz``, ``grid.png``, ``metrics.json`` (NFE measured, wall time,
images/s, mixture quality numbers), ``env.json`` and ``config.yaml`` (resolved). Hydra's run directory is the
same folder (``.hydra/``, ``sample.log``). A rerun into the same folder replaces its outputs.

Mistakes in the inputs (malformed seeds, gamma outside [0, 1], an option the solver does not have, bad dataset
arguments) end with one line ``error: ...`` on stderr and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bdia.run import sample_run


def _one_line(error: BaseException) -> str:
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        settings = {key: value for key, value in config.items() if key not in ("solver", "dataset")}
        solver = dict(config["solver"])
        denoiser = instantiate(cfg.dataset.denoiser)
        return sample_run(denoiser, solver=solver.pop("name"), **solver, **settings, config=config)
    except (ValueError, InstantiationException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {_one_line(e)}")


if __name__ == "__main__":
    main()
