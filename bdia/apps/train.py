"""EDM-style training of a small denoiser (Karras et al. 2022, section 5 and Appendix B), as plain functions.

* Preconditioning: our :class:`bdia.networks.EDMPrecond` around a :class:`bdia.networks.SongUNet`.
* Loss: ``lambda(sigma) * ||D(y + sigma n, sigma) - y||^2`` with ``ln sigma ~ N(P_mean, P_std^2)`` and
  ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2`` (EDM's ``EDMLoss``).
* Optimiser: Adam with a linear learning-rate warm-up; EMA of the weights with a half-life in images and
  EDM's ramp-up (the half-life is at most ``ema_rampup_ratio`` times the images seen so far).

Deterministic for a given seed on the CPU (one generator drives batches, noise levels and noise).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..networks import EDMPrecond
from ..networks.loader import load_network_file

__all__ = ["TrainConfig", "edm_loss", "build_network", "train", "save_network", "load_network"]


@dataclass
class TrainConfig:
    # network (SongUNet, DDPM++-style: positional embedding, standard encoder/decoder)
    model_channels: int = 32
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [8])
    dropout: float = 0.1
    sigma_data: float = 0.5
    # loss
    P_mean: float = -1.2
    P_std: float = 1.2
    # optimisation
    batch_size: int = 128
    total_images: int = 1_000_000
    lr: float = 2e-3
    lr_rampup_images: int = 50_000
    ema_halflife_images: int = 50_000
    ema_rampup_ratio: float = 0.05
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every_images: int = 200_000
    log_every_images: int = 10_000


def build_network(config: TrainConfig, img_resolution: int, img_channels: int, label_dim: int = 0) -> EDMPrecond:
    return EDMPrecond(
        img_resolution=img_resolution,
        img_channels=img_channels,
        label_dim=label_dim,
        sigma_data=config.sigma_data,
        model_type="SongUNet",
        model_channels=config.model_channels,
        channel_mult=list(config.channel_mult),
        num_blocks=config.num_blocks,
        attn_resolutions=list(config.attn_resolutions),
        dropout=config.dropout,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    )


def edm_loss(net, images, labels, P_mean, P_std, sigma_data, generator):
    """EDM's loss for one batch (mean over the batch of the per-image weighted squared error sum)."""
    rnd = torch.randn(images.shape[0], 1, 1, 1, generator=generator)
    sigma = (rnd * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = torch.randn(images.shape, generator=generator) * sigma
    denoised = net(images + noise, sigma.flatten(), labels)
    return (weight * (denoised - images) ** 2).sum(dim=(1, 2, 3)).mean()


def _ema_beta(config: TrainConfig, images_seen: int, batch_size: int) -> float:
    halflife = config.ema_halflife_images
    if config.ema_rampup_ratio is not None:
        halflife = min(halflife, images_seen * config.ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def train(
    images: torch.Tensor,
    config: TrainConfig,
    out_dir,
    labels: torch.Tensor | None = None,
    progress: bool = True,
    log=print,
) -> tuple[EDMPrecond, list[dict]]:
    """Train on ``images`` (float ``[N, C, H, W]`` in [-1, 1]); returns the EMA network and the log rows.

    Writes ``out_dir/checkpoint-<images>.safetensors`` (EMA weights) every ``checkpoint_every_images`` and
    ``out_dir/training_log.jsonl`` (one row per ``log_every_images``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    label_dim = 0 if labels is None else labels.shape[1]
    net = build_network(config, images.shape[-1], images.shape[1], label_dim).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    images = images.to(torch.float32)
    num_steps = math.ceil(config.total_images / config.batch_size)
    rows, running, running_n, start = [], 0.0, 0, time.time()
    log_file = open(out_dir / "training_log.jsonl", "w")
    bar = tqdm(range(num_steps), desc="train", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            index = torch.randint(len(images), (config.batch_size,), generator=generator)
            batch_labels = None if labels is None else labels[index]
            loss = edm_loss(net, images[index], batch_labels, config.P_mean, config.P_std, config.sigma_data, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            images_seen = (step + 1) * config.batch_size
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(images_seen / max(config.lr_rampup_images, 1e-8), 1)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            optimizer.step()
            beta = _ema_beta(config, images_seen, config.batch_size)
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p.detach().lerp(p_ema, beta))
            running += loss.item()
            running_n += 1
            previous = images_seen - config.batch_size
            if images_seen // config.log_every_images > previous // config.log_every_images or step == num_steps - 1:
                row = dict(images=images_seen, loss=running / running_n, lr=optimizer.param_groups[0]["lr"],
                           ema_beta=beta, seconds=round(time.time() - start, 1))
                rows.append(row)
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                running, running_n = 0.0, 0
            if images_seen // config.checkpoint_every_images > previous // config.checkpoint_every_images:
                save_network(ema, out_dir / f"checkpoint-{images_seen:09d}.safetensors", config, dict(images=images_seen))
    finally:
        log_file.close()
    return ema, rows


def save_network(net: EDMPrecond, path, config: TrainConfig, extra: dict | None = None) -> Path:
    """EMA weights as safetensors (float32) with the constructor arguments and training config as metadata;
    written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {
        "class_name": type(net).__name__,
        "init_kwargs": json.dumps(net.init_kwargs),
        "train_config": json.dumps(asdict(config)),
        "extra": json.dumps(extra or {}),
    }
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


#: Rebuilds a network saved by :func:`save_network` (the file is checked as untrusted input first).
load_network = load_network_file
