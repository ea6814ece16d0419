"""EDM-style training of a small denoiser (Karras et al. 2022, section 5 and Appendix B), as plain functions.

* Preconditioning: our :class:`bdia.networks.EDMPrecond` around a :class:`bdia.networks.SongUNet`.
* Loss: ``lambda(sigma) * ||D(y + sigma n, sigma) - y||^2`` with ``ln sigma ~ N(P_mean, P_std^2)`` and
  ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2`` (EDM's ``EDMLoss``).
* Optimiser: Adam with a linear learning-rate warm-up; EMA of the weights with a half-life in images and
  EDM's ramp-up (the half-life is at most ``ema_rampup_ratio`` times the images seen so far).

Deterministic for a given seed and thread count on the CPU (one generator drives batches, noise levels and noise).

Run folder (:mod:`bdia.runfolder`, app ``train``): ``checkpoint-<images>.safetensors`` (EMA weights),
``training_log.jsonl``, ``final.safetensors``, ``settings.json`` (the training config, the data's shape and
sha256, the thread count), ``config.yaml``, ``env.json`` and the marker; only a new, empty or own train folder
is written, with the lock held. Training cannot continue midway (no optimiser state is saved): a rerun with the
same settings keeps a finished run (nothing is trained again) and starts an unfinished one afresh;
``resume=false`` removes what a training run writes, then trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from ..data import SPLITS, digits_images
from ..networks import EDMPrecond
from ..networks.loader import load_network_file
from ..runfolder import RunFolder, atomic_write, check_out_dir, environment_info, jsonable, open_run

__all__ = ["TrainConfig", "edm_loss", "build_network", "train", "save_network", "load_network", "network_bytes",
           "check_config", "train_from_config", "TRAIN_WRITTEN"]

#: What a training run writes (:mod:`bdia.runfolder`): ``resume=false`` removes these (and only these) first.
TRAIN_WRITTEN = (r"checkpoint-[0-9]{9,}\.safetensors", r"training_log\.jsonl", r"final\.safetensors")
#: Bound on the network's estimated parameter count (EDM's largest, ImageNet-64 ADM, has 296 M).
MAX_PARAMETERS = 500_000_000


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

    def __post_init__(self):
        """Every field checked (one line naming ``train.<field>``) before anything is built or allocated."""
        key = "train.{}".format
        check_int(key("model_channels"), self.model_channels, 1, 1024)
        if not isinstance(self.channel_mult, (list, tuple)) or not 1 <= len(self.channel_mult) <= 8:
            raise ValueError(f"train.channel_mult must be a list of 1 to 8 integers, got {self.channel_mult!r}")
        for i, mult in enumerate(self.channel_mult):
            check_int(key(f"channel_mult[{i}]"), mult, 1, 16)
        check_int(key("num_blocks"), self.num_blocks, 1, 16)
        if not isinstance(self.attn_resolutions, (list, tuple)) or len(self.attn_resolutions) > 16:
            raise ValueError(f"train.attn_resolutions must be a list of resolutions, got {self.attn_resolutions!r}")
        for i, resolution in enumerate(self.attn_resolutions):
            check_int(key(f"attn_resolutions[{i}]"), resolution, 1, 4096)
        check_number(key("dropout"), self.dropout, 0, 1, high_open=True)
        check_number(key("sigma_data"), self.sigma_data, 0, low_open=True)
        check_number(key("P_mean"), self.P_mean)
        check_number(key("P_std"), self.P_std, 0, low_open=True)
        check_int(key("batch_size"), self.batch_size, 1, 65536)
        check_int(key("total_images"), self.total_images, 1, 10**12)
        check_number(key("lr"), self.lr, 0, low_open=True)
        check_number(key("lr_rampup_images"), self.lr_rampup_images, 0)
        check_number(key("ema_halflife_images"), self.ema_halflife_images, 0)
        if self.ema_rampup_ratio is not None:
            check_number(key("ema_rampup_ratio"), self.ema_rampup_ratio, 0)
        if self.grad_clip is not None:
            check_number(key("grad_clip"), self.grad_clip, 0, low_open=True)
        check_int(key("seed"), self.seed, 0, 2**63 - 1)
        check_int(key("checkpoint_every_images"), self.checkpoint_every_images, 1)
        check_int(key("log_every_images"), self.log_every_images, 1)
        widest = self.model_channels * max(self.channel_mult)
        # 3x3 convolutions of every level's blocks (encoder, decoder with skips): a lower bound of the count
        estimate = sum(27 * (2 * self.num_blocks + 1) * (self.model_channels * m) ** 2 for m in self.channel_mult)
        if estimate > MAX_PARAMETERS:
            raise ValueError(f"train.model_channels={self.model_channels} with channel_mult={list(self.channel_mult)} "
                             f"(up to {widest} channels) makes a network of more than {estimate / 1e6:.0f} M "
                             f"parameters, over the {MAX_PARAMETERS / 1e6:.0f} M allowed")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "TrainConfig":
        """A config from a mapping (``cfg.train``); an unknown key is one line naming it."""
        if not isinstance(settings, Mapping):
            raise ValueError(f"train must be a mapping of TrainConfig fields, got {type(settings).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown train setting(s) {unknown}; valid keys: {', '.join(names)}")
        return cls(**settings)


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
    resume: bool = True,
    settings: Mapping[str, Any] | None = None,
    config_text: str | None = None,
) -> tuple[EDMPrecond, list[dict]]:
    """Train on ``images`` (float ``[N, C, H, W]`` in [-1, 1]); returns the EMA network and the log rows.

    ``out_dir``: the run folder (module notes): ``checkpoint-<images>.safetensors`` (EMA weights) every
    ``checkpoint_every_images``, ``training_log.jsonl`` (one row per ``log_every_images``), ``final.safetensors``.
    ``settings``: extra entries for ``settings.json`` (e.g. the data's description); ``config_text``: the
    ``config.yaml`` to record. With ``resume`` a finished run of the same settings is returned as it is (network
    loaded from ``final.safetensors``, rows from the log) instead of training again.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    images = torch.as_tensor(images)
    if images.ndim != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError(f"images must be float [N, C, H, W] with N >= 1, got {tuple(images.shape)} {images.dtype}")
    resolution = images.shape[-1]
    if images.shape[-2] != resolution or resolution % 2 ** (len(config.channel_mult) - 1):
        raise ValueError(f"images of {images.shape[-2]}x{resolution} pixels: a U-Net with {len(config.channel_mult)} "
                         f"levels (train.channel_mult) needs square images divisible by {2 ** (len(config.channel_mult) - 1)}")
    run_settings = {
        "train": asdict(config),
        "data": {"shape": list(images.shape), "sha256": _tensor_sha256(images),
                 "labels_sha256": None if labels is None else _tensor_sha256(labels)},
        "threads": torch.get_num_threads(),
        **(dict(settings) if settings else {}),
    }
    records = {"env.json": lambda: json.dumps(jsonable(environment_info()), indent=2) + "\n"}
    if config_text is not None:
        records["config.yaml"] = lambda: config_text
    with open_run(out_dir, "train", run_settings, resume, written=TRAIN_WRITTEN, records=records) as run:
        if run.previous_state == "complete":
            finished = _finished_training(run)
            if finished is not None:
                run.mark("complete")
                return finished
        ema, rows = _train(run, images, config, labels, progress)
        run.write_bytes("final.safetensors", network_bytes(ema, config, dict(images=rows[-1]["images"],
                                                                            final_loss=rows[-1]["loss"])))
        run.mark("complete")
    return ema, rows


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _finished_training(run: RunFolder) -> tuple[EDMPrecond, list[dict]] | None:
    """The network and log rows of a finished training run, or ``None`` when they do not read back."""
    log_bytes = run.read_bytes("training_log.jsonl", 64 * 2**20)
    if log_bytes is None or not run.is_regular_file("final.safetensors"):  # never read through a link
        return None
    try:
        rows = [json.loads(line) for line in log_bytes.decode().splitlines() if line.strip()]
        network = load_network_file(run.path / "final.safetensors")
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    return (network, rows) if rows and all(isinstance(r, dict) for r in rows) else None


def _train(run: RunFolder, images, config: TrainConfig, labels, progress) -> tuple[EDMPrecond, list[dict]]:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    label_dim = 0 if labels is None else labels.shape[1]
    net = build_network(config, images.shape[-1], images.shape[1], label_dim).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    images = images.to(torch.float32)
    num_steps = math.ceil(config.total_images / config.batch_size)
    rows, running, running_n, start = [], 0.0, 0, time.time()
    bar = tqdm(range(num_steps), desc="train", disable=not progress, dynamic_ncols=True)
    with run.stream("training_log.jsonl") as log_file:
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
                run.write_bytes(f"checkpoint-{images_seen:09d}.safetensors",
                                network_bytes(ema, config, dict(images=images_seen)))
    return ema, rows


def network_bytes(net: EDMPrecond, config: TrainConfig, extra: dict | None = None) -> bytes:
    """EMA weights as safetensors bytes (float32) with the constructor arguments and training config as metadata."""
    from safetensors.torch import save

    metadata = {
        "class_name": type(net).__name__,
        "init_kwargs": json.dumps(net.init_kwargs),
        "train_config": json.dumps(asdict(config)),
        "extra": json.dumps(extra or {}),
    }
    return save({k: v.detach().contiguous() for k, v in net.state_dict().items()}, metadata=metadata)


def save_network(net: EDMPrecond, path, config: TrainConfig, extra: dict | None = None) -> Path:
    """:func:`network_bytes` written to ``path`` atomically (a file of your own; a training run writes its
    checkpoints through its run folder)."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(network_bytes(net, config, extra))
    return path


#: Rebuilds a network saved by :func:`save_network` (the file is checked as untrusted input first).
load_network = load_network_file


def check_config(cfg) -> tuple[TrainConfig, dict]:
    """Every setting of a composed ``configs/train/train.yaml`` checked (one line naming the key) before anything
    is built or read, and the run folder (read-only). Returns the :class:`TrainConfig` and the script's settings."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    train_config = TrainConfig.from_settings(config.get("train") or {})
    settings = {"threads": check_int("threads", config.get("threads"), 1, 1024),
                "image_size": check_int("image_size", config.get("image_size"), 8, 256),
                "split": config.get("split"), "progress": config.get("progress", True),
                "resume": config.get("resume", True), "out_dir": config.get("out_dir")}
    if settings["split"] not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {settings['split']!r}")
    for key in ("progress", "resume"):
        if not isinstance(settings[key], bool):
            raise ValueError(f"{key} must be true or false, got {settings[key]!r}")
    levels = 2 ** (len(train_config.channel_mult) - 1)
    if settings["image_size"] % levels:
        raise ValueError(f"image_size={settings['image_size']} must be divisible by {levels} for a U-Net of "
                         f"{len(train_config.channel_mult)} levels (train.channel_mult)")
    check_out_dir(settings["out_dir"], "train")
    return train_config, settings


def train_from_config(cfg, choices: Mapping[str, Any] | None = None) -> dict:
    """``scripts/train.py`` for a composed ``configs/train/train.yaml``: check every setting (:func:`check_config`)
    before anything is built, train into the run folder ``out_dir``, print a summary line. Returns
    ``{"out_dir", "images", "final_loss", "seconds"}``."""
    from omegaconf import OmegaConf

    train_config, settings = check_config(cfg)
    torch.set_num_threads(settings["threads"])
    images, _ = digits_images(settings["image_size"], settings["split"])
    out_dir = settings["out_dir"]
    data = f"embedded digits, {settings['split']} split, {settings['image_size']}x{settings['image_size']}"
    ema, rows = train(images, train_config, out_dir, progress=settings["progress"], resume=settings["resume"],
                      settings={"data_source": data}, config_text=OmegaConf.to_yaml(cfg))
    last = rows[-1]
    print(f"trained on {len(images)} images for {last['images']} image draws in {last['seconds']} s; "
          f"final loss {last['loss']:.4f} -> {Path(out_dir) / 'final.safetensors'}")
    return {"out_dir": str(out_dir), "images": last["images"], "final_loss": last["loss"], "seconds": last["seconds"]}
