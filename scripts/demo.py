"""The exact-editing web demo: upload a photo, invert it once with BDIA, edit it many times, in a browser.

    make demo                                        # tiny random SD (make tiny-sd), offline: http://127.0.0.1:7860
    python scripts/demo.py model=sd15                # SD 1.5 from the Hugging Face cache
    python scripts/demo.py model.path=/models/my-sd port=7861 compare=[ddim,edict,null_text]
    python scripts/demo.py model=tiny-flux 'compare=[ddim,rf_solver,fireflow]'   # tiny random FLUX (make tiny-flow)
    python scripts/demo.py model=sd3-medium          # SD3 Medium (or flux-dev ...) from the Hugging Face cache

Config: ``configs/demo/demo.yaml`` (keys = :func:`bdia.apps.demo.serve`'s arguments, plus ``device`` and
``image_size``) and the ``model`` group of ``configs/sd/`` and ``configs/flow/`` (every option is offered in the
page's model menu; the chosen one is loaded at start). ``guidance_scale: null`` is the model's own (SD 7.5, SD3 7.0,
FLUX.1-dev 3.5); ``compare`` takes the methods of the model's kind (Stable Diffusion: ddim, edict, null_text; SD3 /
FLUX: ddim = flow-Euler inversion, rf_inversion, rf_solver, fireflow). The page: :mod:`bdia.apps.demo`. It writes nothing outside a temporary folder
(uploads, shown images, saved zips), removed when the demo stops (Ctrl-C).

Mistakes (a port in use, a missing model at start) end with one line ``error: ...`` on stderr and exit status 1;
in the page, mistakes (a bad image, an empty prompt, a model whose weights are absent) show one line in the status box.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the demo runs offline

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bdia.apps.cli import run_command_line, run_job  # noqa: E402


def demo_from_config(cfg, choices=None) -> dict:
    """Load the chosen model, then serve the page (:func:`bdia.apps.demo.serve`) until interrupted."""
    import inspect

    from bdia.apps.demo import Models, check_compare, check_port, model_configs, serve
    from bdia.distributed import resolve_device

    config = OmegaConf.to_container(cfg, resolve=True)
    model_cfg = config.pop("model", None)
    device = resolve_device(config.pop("device", "auto"))
    image_size = config.pop("image_size", None)
    keys = [k for k in inspect.signature(serve).parameters if k != "models"]
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"unknown demo settings {unknown}; valid keys: {', '.join(keys)}, device, image_size")
    if not model_cfg or "_target_" not in model_cfg:
        raise ValueError("model: the config has no _target_ (choose one with model=tiny-sd|sd15|sd14|sd21_base|"
                         "tiny-sd3|tiny-flux|sd3-medium|sd3.5-medium|sd3.5-large|flux-dev|flux-schnell)")
    if image_size is not None and (not isinstance(image_size, int) or not 8 <= image_size <= 2048 or image_size % 8):
        raise ValueError(f"image_size must be null or a multiple of 8 in 8..2048, got {image_size!r}")
    check_port(str(config.get("host", "127.0.0.1")), config.get("port", 7860))  # before the model is loaded
    chosen = (choices or {}).get("model") or "model"
    models = Models(model_configs(chosen, model_cfg), chosen, device=device, image_size=image_size)
    check_compare(config.get("compare", ()), models.is_flow(chosen))  # methods of the model's kind, before loading it
    models.get(chosen)  # a missing checkpoint fails here, in one line, before the page is served
    return serve(models, **config)


@hydra.main(config_path="../configs/demo", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_job(demo_from_config, cfg)


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="demo")


if __name__ == "__main__":
    cli()
