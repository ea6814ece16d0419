"""A small CNN classifier for the embedded data set (scikit-learn's digits at 16x16), and its features.

The project's embedded data set is ``sklearn.datasets.load_digits()`` (1797 8x8 images, 0..16) scaled to
EDM's pixel range ``[-1, 1]`` and resized bilinearly to 16x16, with a fixed train / held-out split: both come
from :func:`bdia.data.digits_images` (the preprocessing :func:`bdia.analytic.digits_gmm` also uses; a test
checks they agree). Images enter the classifier quantised like every generated image
(``bdia.imageio.quantize``: uint8), so real and generated digits take one path.

The classifier is trained on the ``"train"`` split only by ``scripts/train_digits_classifier.py``; its weights
ship in ``bdia/assets/digits_classifier.safetensors`` beside ``digits_classifier.json`` (architecture,
training settings, held-out accuracy, a fingerprint of the held-out split, sha256 of the weights). A test
fails if :mod:`bdia.data`'s split no longer matches the card (then retrain: about 30 s).

The 64-d penultimate pre-activations (scaled to unit mean square on the training digits) are the feature
space of "FD in digits-classifier features" and KID on the embedded default. That is **not FID**: the numbers
are not comparable with Inception FIDs. Features are computed in float32; per-image values can differ in the
last float32 bits with the batch composition (oneDNN blocking), ~1e-7 — statistics are reduced in float64.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import digits_images
from ..download import AssetUnavailableError, sha256_of
from ..imageio import quantize
from ..runfolder import atomic_write

__all__ = [
    "ASSET_WEIGHTS",
    "ASSET_CARD",
    "DigitsClassifier",
    "DigitsFeatures",
    "SPLITS",
    "digits_split",
    "digits_uint8",
    "split_fingerprint",
    "load_digits_classifier",
    "train_digits_classifier",
    "evaluate_accuracy",
    "save_digits_classifier",
]

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
ASSET_WEIGHTS = ASSET_DIR / "digits_classifier.safetensors"
ASSET_CARD = ASSET_DIR / "digits_classifier.json"


# --------------------------------------------------------------------------------------------------
# Data.

#: Splits: bdia.data's fixed train / test (held-out) split, all digits, and two disjoint halves of all digits
#: (even / odd index) for the real-data floor.
SPLITS = ("train", "test", "all", "even", "odd")


def digits_split(split: str = "test", image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 digits ``[n, 1, S, S]`` in ``[-1, 1]`` and labels of one split (see :data:`SPLITS`), from
    :func:`bdia.data.digits_images` (the project's embedded-data preprocessing and fixed split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
    if split in ("even", "odd"):
        x, labels = digits_images(image_size, "all", dtype=torch.float64)
        sl = slice(0, None, 2) if split == "even" else slice(1, None, 2)
        return x[sl], labels[sl]
    return digits_images(image_size, split, dtype=torch.float64)


def split_fingerprint(split: str = "test") -> str:
    """sha256 of a split's images (float64 bytes): the classifier card records the held-out one, and a test
    checks it still matches :mod:`bdia.data`, so a changed split cannot silently leak training digits."""
    x, labels = digits_split(split)
    return hashlib.sha256(x.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def digits_uint8(split: str = "test", image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split`` quantised like generated images (``bdia.imageio.quantize``): uint8
    ``[n, 1, image_size, image_size]`` and labels ``[n]``."""
    x, labels = digits_split(split, image_size)
    return quantize(x).numpy(), labels.numpy()


def _uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize``: uint8 ``u`` -> ``u / 127.5 - 1`` in ``[-1, 1]`` (float32)."""
    return images.to(torch.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# The network.


class DigitsClassifier(nn.Module):
    """Two conv blocks (two 3x3 convs + ReLU each, 2x2 max-pool), a linear ``feature_dim`` layer and a
    ReLU + linear head. Input: float ``[B, 1, S, S]`` in ``[-1, 1]`` (S divisible by 4).

    :meth:`features` are the ``feature_dim`` pre-activations of the penultimate layer (before the head's
    ReLU, so no feature is constant zero) times ``feature_scale``, a fixed scalar set after training so that
    the mean squared feature over the training digits is 1 — KID's polynomial kernel ``(x.y / D + 1)^3``
    then sees O(1) inner products, as with Inception features."""

    def __init__(self, channels=(16, 32), feature_dim: int = 64, image_size: int = 16, num_classes: int = 10):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.config = dict(channels=[c1, c2], feature_dim=int(feature_dim), image_size=int(image_size),
                           num_classes=int(num_classes))
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (image_size // 4) ** 2, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_digits_classifier(path=None, device="cpu", config_key: str = "metrics.digits.weights") -> DigitsClassifier:
    """The shipped classifier (or the safetensors file ``path`` with its ``.json`` card beside it), in eval
    mode, gradients off. ``config_key``: the setting that names the file, in every message."""
    from safetensors.torch import load_file

    weights = Path(path).expanduser() if path is not None else ASSET_WEIGHTS
    card_path = weights.with_suffix(".json")
    for candidate in (weights, card_path):
        if candidate.exists() and not candidate.is_file():
            raise ValueError(f"{config_key}: {candidate} is {'a folder' if candidate.is_dir() else 'not a regular file'}"
                             f", not a weights file")
    if not weights.is_file() or not card_path.is_file():
        missing = weights if not weights.is_file() else card_path
        raise AssetUnavailableError(None, missing, config_key=config_key,
                                    reason="no such file (train it with scripts/train_digits_classifier.py)",
                                    what="digits classifier")
    if card_path.stat().st_size > 2**20:
        raise ValueError(f"{config_key}: {card_path} is larger than a weights card can be (1 MiB)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{config_key}: {card_path} is not a readable JSON card ({e})") from None
    model = DigitsClassifier(**_checked_architecture(card, card_path, config_key))  # sizes bounded before allocation
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors' and torch's errors for damaged or mismatched files
        raise ValueError(f"{config_key}: {weights} does not hold this classifier's weights "
                         f"({' '.join(str(e).split())[:200]})") from None
    return model.to(device).eval().requires_grad_(False)


def _checked_architecture(card, card_path, config_key: str = "metrics.digits.weights") -> dict:
    """The card's ``architecture``, each argument of the expected type and within bounds far above the shipped
    classifier's (channels 16/32, 64 features, 16 px, 10 classes)."""
    bounds = {"feature_dim": (1, 4096), "image_size": (4, 256), "num_classes": (1, 1000)}
    arch = card.get("architecture") if isinstance(card, dict) else None
    if not isinstance(arch, dict) or set(arch) - {"channels", *bounds}:
        raise ValueError(f"{config_key}: {card_path} has no valid 'architecture' "
                         f"(keys: channels, {', '.join(bounds)})")

    def is_int(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    channels = arch.get("channels", [16, 32])
    if not (isinstance(channels, list) and len(channels) == 2 and all(is_int(c, 1, 1024) for c in channels)):
        raise ValueError(f"{config_key}: {card_path}: channels must be two integers in 1..1024, got {channels!r}")
    for name, (low, high) in bounds.items():
        if name in arch and not is_int(arch[name], low, high):
            raise ValueError(f"{config_key}: {card_path}: {name} must be an integer in {low}..{high}, "
                             f"got {arch[name]!r}")
    return arch


class DigitsFeatures(nn.Module):
    """Feature extractor: uint8 ``[B, 1, 16, 16]`` -> the classifier's 64-d penultimate features (float32).

    ``name`` and ``label`` say what the distance computed on these features is — "FD in digits-classifier
    features", never FID."""

    name = "digits-classifier"
    label = "FD in digits-classifier features (not FID)"

    def __init__(self, weights=None, device="cpu", config_key: str = "metrics.digits.weights"):
        super().__init__()
        self.classifier = load_digits_classifier(weights, device, config_key)
        self.weights_path = str(Path(weights).expanduser() if weights is not None else ASSET_WEIGHTS)
        self.feature_dim = self.classifier.config["feature_dim"]
        size = self.classifier.config["image_size"]
        self.image_shape = (1, size, size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"digits-classifier features take uint8 images, got {images.dtype}")
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"digits-classifier features need images of shape [N, {', '.join(map(str, self.image_shape))}]"
                             f" (the embedded digits data set), got {list(images.shape)}")
        device = next(self.classifier.parameters()).device
        return self.classifier.features(_uint8_to_float(images.to(device)))


# --------------------------------------------------------------------------------------------------
# Training (scripts/train_digits_classifier.py).


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift: int, max_noise: float) -> torch.Tensor:
    """Random integer shifts in [-max_shift, max_shift] (zero = background -1 padding), Gaussian grain with a
    per-image std uniform in [0, max_noise], then the uint8 round trip every evaluated image takes."""
    b, _, h, w = x.shape
    if max_shift:
        padded = F.pad(x, (max_shift,) * 4, value=-1.0)
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        x = torch.stack([padded[k, :, dy[k] : dy[k] + h, dx[k] : dx[k] + w] for k in range(b)])
    if max_noise:
        std = torch.rand(b, 1, 1, 1, generator=generator, dtype=x.dtype) * max_noise
        x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return _uint8_to_float(quantize(x))


@torch.no_grad()
def evaluate_accuracy(model: DigitsClassifier, split: str = "test", noise_std: float = 0.0, seed: int = 0) -> float:
    """Accuracy on a split's quantised digits (optionally with Gaussian grain of ``noise_std`` added before
    quantisation, like the analytic model's samples)."""
    x, labels = digits_split(split, model.config["image_size"])
    if noise_std:
        x = x + noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    logits = model.eval()(_uint8_to_float(quantize(x)))
    return float((logits.argmax(1) == labels).double().mean())


def train_digits_classifier(epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                            seed: int = 0, max_shift: int = 1, max_noise: float = 0.1, channels=(16, 32),
                            feature_dim: int = 64, image_size: int = 16, threads: int = 1,
                            progress: bool = False) -> tuple[DigitsClassifier, dict]:
    """Train :class:`DigitsClassifier` on the ``"train"`` split, deterministically (fixed seed, one fixed
    thread count, ``torch.use_deterministic_algorithms``); AdamW with a cosine learning-rate decay.
    Returns the model (eval mode) and a report: settings, held-out accuracy (clean and with 0.05 grain),
    train accuracy, wall time."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        x_train, y_train = digits_split("train", image_size)
        x_train = x_train.to(torch.float32)
        model = DigitsClassifier(channels, feature_dim, image_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch))))
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = _augment(x_train[batch], generator, max_shift, max_noise)
                loss = F.cross_entropy(model(inputs), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}", flush=True)
        model.eval().requires_grad_(False)
        with torch.no_grad():  # fix the feature scale: mean squared feature 1 on the (clean) training digits
            raw = model.body(_uint8_to_float(quantize(x_train)))
            model.feature_scale.fill_(float(raw.pow(2).mean().rsqrt()))
        seconds = time.perf_counter() - started
        report = {
            "architecture": model.config,
            "training": dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                             max_shift=max_shift, max_noise=max_noise, optimizer="AdamW, cosine decay",
                             threads=int(threads), deterministic_algorithms=True),
            "data": {
                "source": "sklearn.datasets.load_digits (1797 8x8 images) via bdia.data.digits_images",
                "preprocessing": f"x / 16 * 2 - 1, bilinear resize to {image_size}x{image_size} "
                                 "(align_corners=False), clamp [-1, 1], quantised to uint8 as bdia.imageio.quantize",
                "split": "bdia.data's fixed split: trained on 'train', accuracy on the held-out 'test'",
                "num_train": int(len(x_train)),
                "num_test": int(len(digits_split("test", image_size)[0])),
                "test_split_sha256": split_fingerprint("test"),
            },
            "accuracy": {
                "test": evaluate_accuracy(model, "test"),
                "test_noise_0.05": evaluate_accuracy(model, "test", noise_std=0.05),
                "train": evaluate_accuracy(model, "train"),
            },
            "features": {"layer": "penultimate pre-activation (before the head's ReLU), times feature_scale",
                         "dim": model.config["feature_dim"], "feature_scale": float(model.feature_scale)},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 2),
            "torch": torch.__version__,
        }
        return model, report
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def save_digits_classifier(model: DigitsClassifier, report: dict, path=None) -> Path:
    """Write ``path`` (safetensors, default the shipped asset) and its ``.json`` card (``report`` plus the
    weights' sha256)."""
    from safetensors.torch import save_file

    weights = Path(path) if path is not None else ASSET_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})  # one key: safetensors' header order is then fixed
    tmp.chmod(0o644)
    tmp.replace(weights)
    card = dict(report)
    card["weights"] = {"file": weights.name, "sha256": sha256_of(weights),
                       "bytes": weights.stat().st_size}
    with atomic_write(weights.with_suffix(".json"), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return weights
