"""Compute reference statistics (``mu``, ``sigma``; float64) for FID or for FD in digits-classifier features.

    python scripts/fid_ref.py source=cifar10                                   # CIFAR-10 train via torchvision
    python scripts/fid_ref.py source=/data/ffhq-64x64 out=/data/ffhq-ref.npz   # any folder of images
    python scripts/fid_ref.py source=cifar10 backend=clean_fid weights=/data/inception-2015-12-05.pt
    python scripts/fid_ref.py source=digits-test features=digits save_features=true
    torchrun --standalone --nproc_per_node=8 scripts/fid_ref.py source=/data/afhqv2-64x64

The result (``<out>`` + ``<out>.json`` with provenance and sha256) is what ``metrics.fid.ref=<out>`` reads.
A second run with the same settings reuses it (the card's settings and the file's sha256 must match).
EDM's own published statistics need no computing: ``metrics.fid.ref=cifar10-32x32`` downloads them.

Offline, CIFAR-10 that is not under ``root`` and Inception weights that are not cached stop at once with the
URL, the expected path and the key that takes a local copy. Errors end with one line ``error: ...``, exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdia.apps.cli import run_job  # noqa: E402
from bdia.distributed import init_distributed, is_main_process, resolve_device  # noqa: E402
from bdia.download import AssetUnavailableError, cache_dir, is_offline  # noqa: E402

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _cifar10(root: Path):
    if is_offline() and not (root / "cifar-10-batches-py").is_dir():  # fail before importing torchvision
        raise AssetUnavailableError(CIFAR10_URL, root / "cifar-10-batches-py", "root",
                                    reason="offline mode and the data set is not under root", what="CIFAR-10 (torchvision)")
    import torchvision

    try:
        data = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    except RuntimeError:
        if is_offline():
            raise AssetUnavailableError(CIFAR10_URL, root / "cifar-10-batches-py", "root",
                                        reason="offline mode and the data set is not under root",
                                        what="CIFAR-10 (torchvision)") from None
        try:
            data = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # one attempt; torchvision raises URLError/RuntimeError/OSError
            raise AssetUnavailableError(CIFAR10_URL, root / "cifar-10-batches-py", "root",
                                        reason=f"download failed ({type(e).__name__}: {str(e)[:120]})",
                                        what="CIFAR-10 (torchvision)") from None
    return data.data  # uint8 [50000, 32, 32, 3]


def compute(cfg) -> dict:
    from bdia.metrics.fid import DIGITS_REFS, sha256_of, write_reference_stats
    from bdia.metrics.images import open_images

    dataset = str(cfg.source)
    device = resolve_device(cfg.device)
    if dataset == "cifar10":
        root = Path(cfg.root).expanduser() if cfg.root else cache_dir() / "datasets"
        images, description = open_images(_cifar10(root), description="CIFAR-10 train"), "CIFAR-10 train (torchvision)"
    elif dataset in DIGITS_REFS:
        from bdia.metrics.digits_classifier import digits_uint8

        images, description = open_images(digits_uint8(dataset.split("-", 1)[1])[0]), f"embedded digits, {dataset}"
    else:
        images, description = open_images(dataset, description=f"source={dataset}"), str(Path(dataset).expanduser().resolve())

    if cfg.features == "digits":
        from bdia.metrics.digits_classifier import DigitsFeatures

        extractor = DigitsFeatures(cfg.weights, device)
    elif cfg.features == "inception":
        from bdia.metrics.features import inception_extractor

        extractor = inception_extractor(cfg.backend, cfg.weights, cfg.mode, device, cfg.progress, config_key="weights")
    else:
        raise ValueError(f"features must be 'inception' or 'digits', got {cfg.features!r}")

    name = Path(dataset).name if dataset not in ("cifar10", *DIGITS_REFS) else dataset
    out = Path(cfg.out).expanduser() if cfg.out else cache_dir() / "fid-refs" / f"{name}-{extractor.name}.npz"
    settings = {"dataset": description, "num_images": len(images), "feature_extractor": extractor.name,
                "save_features": bool(cfg.save_features)}
    if getattr(extractor, "weights_path", None):
        settings["feature_extractor_weights_sha256"] = sha256_of(extractor.weights_path)
    card_path = out.with_name(out.name + ".json")
    if not cfg.force and out.is_file() and card_path.is_file():
        card = json.loads(card_path.read_text())
        same = all(card.get(k if k != "save_features" else "saved_features") == v for k, v in settings.items())
        if same and card.get("sha256") == sha256_of(out):
            card["reused"] = True
            return {"out": str(out), **card}
    provenance = {"dataset": description, "command": "python scripts/fid_ref.py " + " ".join(sys.argv[1:])}
    card = write_reference_stats(images, extractor, out, cfg.batch_size, bool(cfg.save_features), provenance,
                                 progress=bool(cfg.progress) and is_main_process())
    return {"out": str(out), **card}


def _job(cfg: DictConfig, choices=None) -> dict:
    init_distributed(cfg.device)
    return compute(cfg)


@hydra.main(config_path="../configs/fid_ref", config_name="fid_ref", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    result = run_job(_job, cfg)
    if is_main_process():
        print(f"{result['out']}: {result['num_images']} images, {result['feature_extractor']} features, "
              f"sha256 {result.get('sha256', '')[:12]}{' (reused)' if result.get('reused') else ''}")
    return result


if __name__ == "__main__":
    main()
