"""Invert a real image and edit it with Stable Diffusion: BDIA-DDIM (exact) beside DDIM inversion, EDICT and
null-text inversion; or with a flow-matching model (SD3, FLUX): BDIA over flow Euler (exact) beside flow-Euler
inversion, RF-Inversion, RF-Solver and FireFlow.

    python scripts/edit.py                                        # SD v1.5, scikit-learn's china.jpg, all methods
    python scripts/edit.py model=sd14 methods=[bdia,edict] gamma=0.92 num_steps=50
    python scripts/edit.py image=/data/cat.png source_prompt="a photo of a cat" edit_prompt="a photo of a tiger"
    python scripts/edit.py model.path=/models/stable-diffusion-v1-5 model.dtype=float64   # a local folder, fp64
    python scripts/make_tiny_sd.py && python scripts/edit.py model=tiny-sd num_steps=10 grid_scale=4   # offline demo
    python scripts/edit.py model=sd3-medium num_steps=28 'methods=[bdia,rf_inversion]'     # SD3 (flow methods)
    python scripts/make_tiny_flow.py && python scripts/edit.py model=tiny-flux image_size=32 num_steps=10  # offline

Config: ``configs/edit/edit.yaml`` (keys = :func:`bdia.apps.edit.edit_run`'s arguments) and the ``model`` group of
``configs/sd/`` (``sd15`` default, ``sd14``, ``sd21_base``, ``tiny-sd``) and ``configs/flow/`` (``sd3-medium``,
``sd3.5-medium``, ``sd3.5-large``, ``flux-dev``, ``flux-schnell``, ``tiny-sd3``, ``tiny-flux``); ``model.path`` takes
any local diffusers folder; ``logger/`` and ``launcher/``.

Output (``out_dir``, default ``results/edit/<overrides>``): ``<method>.png`` (original | reconstruction | edit),
``edit_grid.png`` (one row per method), ``bdia_pair.npz`` (the noise pair BDIA inverts the image to) and
``<method>_inversion.npz``, ``metrics.json`` (round-trip errors in latents and pixels, NFE, backward passes and
wall time per phase, gamma, N, dtypes), ``env.json``, ``config.yaml``.

Mistakes and missing models (``model=sd15`` offline and not cached, a missing ``model.path`` or image) end with
one line ``error: ...`` on stderr and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bdia.apps.cli import print_summary, run_command_line, run_job, shell_command, sweep_folder
from bdia.configs import instantiate
from bdia.distributed import launch_context, resolve_device
from bdia.logger import NullLogger, Table, log_run
from bdia.apps.edit import check_config
from bdia.networks.flow import is_flow_model


def load_sd_config(model_cfg: dict, device="cpu"):
    """Instantiate the ``model`` group (``_target_: bdia.networks.sd.load_sd`` or ``bdia.networks.flow.load_flow``),
    re-raising the loader's own error (Hydra wraps it) so that a missing checkpoint reaches the user as its one clear
    message."""
    if not model_cfg or "_target_" not in model_cfg:
        raise ValueError("model: the config has no _target_ (choose one with model=sd15|sd14|sd21_base|tiny-sd, "
                         "or a flow model: sd3-medium|flux-dev|tiny-sd3|tiny-flux ...)")
    sd = instantiate(model_cfg, "model", device=str(device))
    if not all(hasattr(sd, name) for name in ("encode_images", "decode_latents", "encode_prompts", "denoiser")) or \
            not (hasattr(sd, "eps_denoiser") or is_flow_model(sd)):
        raise ValueError(f"model: {model_cfg['_target_']} is neither a Stable Diffusion nor an SD3 / FLUX loader "
                         "(use model=sd15 ... or model=flux-dev ...)")
    return sd


def edit_from_config(cfg, choices=None) -> dict | None:
    """Load the model of ``cfg.model`` and run :func:`bdia.apps.edit.edit_run` with the top-level keys (on a
    multirun under torchrun, only this rank's jobs; ``None`` for the others)."""
    from bdia.apps.edit import edit_run, summary_rows

    config = OmegaConf.to_container(cfg, resolve=True)
    model_cfg = config.pop("model", None)
    logger_cfg = config.pop("logger", None)
    experiment_name = config.pop("experiment_name", None)  # names the sweep folder (results/edit/<name>/) only
    ctx = launch_context(config.pop("distributed", "auto"))  # no process group: each image is a job of its own
    device = resolve_device(config.pop("device", "auto"), ctx.local_rank)
    job = _job_number()
    if job % ctx.world_size != ctx.rank:  # several processes (torchrun): the jobs of a sweep are dealt out
        print(f"rank {ctx.rank} of {ctx.world_size}: job {job} is rank {job % ctx.world_size}'s", flush=True)
        return None
    check_config(cfg)  # every setting and the folder, before the model is loaded or the folder is claimed
    sd = load_sd_config(model_cfg, device)
    model_info = {"config": (choices or {}).get("model"), **sd.describe()}
    full_config = OmegaConf.to_container(cfg, resolve=True)
    metrics = edit_run(sd, config=full_config, model_info=model_info, **config)
    out_dir = Path(config.get("out_dir", "."))
    logger = instantiate(logger_cfg, "logger") if logger_cfg else NullLogger()
    figures = {f"{method}/figure": out_dir / f"{method}.png" for method in metrics["methods"]}
    log_run(logger, {**full_config, "choices": dict(choices or {})}, out_dir, experiment_name, metrics,
            images={**figures, "edit_grid": out_dir / "edit_grid.png"}, tables=[edit_table(metrics)])
    rows = summary_rows(metrics, out_dir)
    if (sweep := sweep_folder()) is not None:
        rows.append(("sweep table", shell_command("python", "scripts/summarize.py", sweep)))
    print_summary(f"edit: {len(metrics['methods'])} method(s) in {out_dir}", rows)
    return metrics


def _job_number() -> int:
    """The job's index in a Hydra multirun (0 for a single run or outside Hydra)."""
    if not HydraConfig.initialized():
        return 0
    job = HydraConfig.get().job
    return 0 if OmegaConf.is_missing(job, "num") else int(job.num)


def edit_table(metrics: dict) -> Table:
    """One row per method: its cost (NFE, network rows, backward passes, seconds) and errors."""
    columns = ["method", "nfe_inversion_and_reconstruction", "network_rows", "backward_passes", "seconds",
               "latent_relative_error", "image_psnr", "edit_vs_reconstruction_psnr"]
    rows = []
    for method, m in metrics["methods"].items():
        phases = m["cost"].values()
        rows.append([method, m["nfe_inversion_and_reconstruction"], sum(p["network_rows"] for p in phases),
                     sum(p["backward_passes"] for p in phases), m["seconds_inversion_and_reconstruction"],
                     m["latent"].get("relative_error"), m["image"].get("psnr"), m["edit_vs_reconstruction"].get("psnr")])
    return Table("methods", columns, rows)


@hydra.main(config_path="../configs/edit", config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    return run_job(edit_from_config, cfg)


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="edit", check=check_config)


if __name__ == "__main__":
    cli()
