"""Train the embedded digits model with EDM's preconditioning, loss and EMA (``bdia.apps.train``).

    python scripts/train.py                                   # configs/train/train.yaml
    python scripts/train.py train.total_images=20000 out_dir=/tmp/quick

Writes ``out_dir/final.safetensors`` (EMA weights, constructor arguments and training config in the
metadata), ``checkpoint-*.safetensors``, ``training_log.jsonl`` and ``config.yaml``. Deterministic for a
given seed and thread count on the CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bdia.apps import cli  # noqa: F401  (the config search path: configs/train/, then configs/shared/)
from bdia.apps.train import TrainConfig, save_network, train
from bdia.data import digits_images


@hydra.main(config_path="../configs/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
        torch.set_num_threads(int(cfg.threads))
        images, _ = digits_images(int(cfg.image_size), cfg.split)
    except (TypeError, ValueError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {e}")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    ema, rows = train(images, config, out_dir, progress=bool(cfg.progress))
    save_network(ema, out_dir / "final.safetensors", config, dict(images=rows[-1]["images"], final_loss=rows[-1]["loss"]))
    print(f"trained on {len(images)} images for {rows[-1]['images']} image draws in {rows[-1]['seconds']} s; "
          f"final loss {rows[-1]['loss']:.4f} -> {out_dir / 'final.safetensors'}")


if __name__ == "__main__":
    main()
