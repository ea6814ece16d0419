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

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdia.apps.cli import run_command_line, run_job  # noqa: E402
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


def _out_path(cfg, name: str, extractor_name: str) -> Path:
    return Path(cfg.out).expanduser() if cfg.out else cache_dir() / "fid-refs" / f"{name}-{extractor_name}.npz"


def check_config(cfg) -> None:
    """The settings checked before any data or weights are read (one line naming the key), and ``out``: an
    existing file there is replaced only when this script wrote it (its card holds the file's sha256)."""
    from bdia.checks import check_int
    from bdia.metrics.fid import check_reference_out

    if not isinstance(cfg.source, str) or not cfg.source.strip():
        raise ValueError(f"source must be cifar10, a digits split, a folder or an .npz, got {cfg.source!r}")
    if cfg.features not in ("inception", "digits"):
        raise ValueError(f"features must be 'inception' or 'digits', got {cfg.features!r}")
    check_int("batch_size", cfg.batch_size, 1, 65536)
    for key in ("save_features", "force", "progress"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg.out is not None:
        if not isinstance(cfg.out, str) or not cfg.out.strip():
            raise ValueError(f"out must be a file path or null, got {cfg.out!r}")
        check_reference_out(Path(cfg.out).expanduser())


def compute(cfg) -> dict:
    from bdia.metrics.fid import DIGITS_REFS, check_reference_out, reference_card, sha256_of, write_reference_stats
    from bdia.metrics.images import open_images
    from bdia.runfolder import RunFolder

    check_config(cfg)
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

        extractor = DigitsFeatures(cfg.weights, device, config_key="weights")
    elif cfg.features == "inception":
        from bdia.metrics.features import inception_extractor

        extractor = inception_extractor(cfg.backend, cfg.weights, cfg.mode, device, cfg.progress, config_key="weights")
    else:
        raise ValueError(f"features must be 'inception' or 'digits', got {cfg.features!r}")

    name = Path(dataset).name if dataset not in ("cifar10", *DIGITS_REFS) else dataset
    out = _out_path(cfg, name, extractor.name)
    check_reference_out(out)  # the default out too: a file there that this script did not write is never replaced
    settings = {"dataset": description, "num_images": len(images), "feature_extractor": extractor.name,
                "save_features": bool(cfg.save_features)}
    if getattr(extractor, "weights_path", None):
        settings["feature_extractor_weights_sha256"] = sha256_of(extractor.weights_path)
    if not cfg.force and out.parent.is_dir():
        with RunFolder.for_reading(out.parent) as folder:  # the card and file, read without following links
            card = reference_card(folder, out.name)
            digest = folder.sha256(out.name) if card is not None else None
        same = card is not None and all(card.get(k if k != "save_features" else "saved_features") == v
                                        for k, v in settings.items())
        if same and digest is not None and card.get("sha256") == digest:
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


def cli() -> None:
    """The command line: check the overrides (one-line errors), then let Hydra run ``main``."""
    run_command_line(main, config_name="fid_ref", check=check_config)


if __name__ == "__main__":
    cli()
