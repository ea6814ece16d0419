"""Metrics: FID (torch-fidelity / clean-fid, EDM protocol), FD and KID in digits-classifier features, CLIP
score, reconstruction errors — offline-safe, float64 statistics, torchrun-sharded.

    from bdia.metrics import FID, DigitsFD, CLIPScore, frechet_distance
    DigitsFD()("results/sample/bdia_edm")          # FD / KID in digits-classifier features (not FID)
    FID(ref="cifar10-32x32")("/runs/cifar")         # needs the Inception weights (metrics.fid.weights=/path)

Heavy dependencies (torch-fidelity, clean-fid, transformers) are imported only when a metric needs them.
"""

from .clip_score import CLIPScore, clip_scores, load_clip, read_prompts
from .digits_classifier import DigitsClassifier, DigitsFeatures, digits_split, digits_uint8
from .evaluate import evaluate_run, evaluate_runs, find_runs, flatten_numbers, merge_metrics_json
from .features import feature_statistics, inception_extractor, resolve_inception_weights
from .fid import FID, DigitsFD, ReferenceStats, load_reference
from .frechet import FeatureStats, frechet_distance, kernel_distance, polynomial_mmd2
from .images import ImageSource, open_images
from .inversion import RecordInversion, invert_run_records
from .reconstruction import Reconstruction, latent_metrics, pixel_metrics, reconstruction_metrics

__all__ = [
    "CLIPScore",
    "DigitsClassifier",
    "DigitsFD",
    "DigitsFeatures",
    "FID",
    "FeatureStats",
    "ImageSource",
    "Reconstruction",
    "RecordInversion",
    "ReferenceStats",
    "clip_scores",
    "digits_split",
    "digits_uint8",
    "evaluate_run",
    "evaluate_runs",
    "feature_statistics",
    "find_runs",
    "flatten_numbers",
    "frechet_distance",
    "inception_extractor",
    "invert_run_records",
    "kernel_distance",
    "latent_metrics",
    "load_clip",
    "load_reference",
    "merge_metrics_json",
    "open_images",
    "pixel_metrics",
    "polynomial_mmd2",
    "read_prompts",
    "reconstruction_metrics",
    "resolve_inception_weights",
]
