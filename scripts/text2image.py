"""Text-to-image with Stable Diffusion and DDIM / BDIA-DDIM (our solver loop, diffusers' networks), and with the
flow-matching SD3 / FLUX models and flow Euler (solver=ddim) / BDIA-flow (solver=bdia_ddim).

    python scripts/text2image.py                                    # sd15, BDIA-DDIM gamma 0.5, 10 steps, 2 prompts x 4 seeds
    python scripts/text2image.py model=tiny-sd device=cpu           # offline: the tiny folder from scripts/make_tiny_sd.py
    python scripts/text2image.py model.path=/models/stable-diffusion-v1-5 'prompts=["a red fox in snow"]' seeds=0-7
    python scripts/text2image.py prompt_file=prompts.txt prompts=null solver=ddim solver.num_steps=50 model.dtype=float16
    python scripts/text2image.py coco_captions=/data/annotations/captions_val2014.json prompts=null num_prompts=1000 \
        seeds=0 noise_per_prompt=true metrics=clip
    python scripts/text2image.py -m solver=ddim,bdia_ddim solver.num_steps=10,20,40         # a sweep
    python scripts/text2image.py -m solver=bdia_ddim solver.gamma=0.5,1.0                    # a gamma sweep
    python scripts/text2image.py model=flux-dev solver.num_steps=28 height=1024 width=1024   # FLUX.1-dev, BDIA-flow
    python scripts/text2image.py model=tiny-sd3 height=32 width=32  # offline: scripts/make_tiny_flow.py's tiny SD3
    python scripts/text2image.py --cfg job                          # print the composed config and exit

Config: ``configs/text2image/text2image.yaml`` (groups ``solver/`` and ``experiment/`` of its own, ``model/`` from
``configs/sd/`` and ``configs/flow/``, ``metrics/``, ``logger/``, ``launcher/``; :data:`bdia.apps.cli.APP_CONFIGS`). The work is done by
:func:`bdia.apps.text2image.text2image_from_config` and :func:`bdia.apps.text2image.text_to_image`.

Output: ``out_dir`` (default ``results/text2image/<experiment_name>/<overrides>``) holds ``images/*.png``,
``records/*.npz``, ``images.npz``, ``grid.png`` (one row per prompt), ``prompts.json``, ``prompts.txt``,
``metrics.json`` (NFE measured, wall time, settings), ``env.json``, ``config.yaml`` and ``settings.json``.
Rerunning the same command resumes.

Mistakes (an unknown config name, a missing prompt file, gamma outside [0, 1] or given to ddim, a model that is
neither cached nor downloadable — offline it fails at once) end with one line ``error: ...`` and exit status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bdia.apps.cli import run_command_line, run_job
from bdia.apps.text2image import check_config, text2image_from_config


@hydra.main(config_path="../configs/text2image", config_name="text2image", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    return run_job(text2image_from_config, cfg)


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="text2image", check=check_config)


if __name__ == "__main__":
    cli()
