"""Data that ships inside PyPI packages, so the project trains and evaluates offline.

The embedded data set is scikit-learn's ``load_digits()``: 1,797 greyscale 8x8 handwritten digits (values
0..16, white strokes on black). We scale them to EDM's pixel range [-1, 1] and upsample to 16x16
(bilinear, which stays inside [-1, 1]). 16x16 keeps training on a 2-core CPU within minutes while giving the
U-Net three resolutions (16, 8, 4); 32x32 would quadruple the cost without adding information to 8x8 sources.

The split is fixed: a permutation of all indices drawn with seed 0; the first ``TEST_SIZE`` images are the
held-out set (Fréchet-distance references, classifier test accuracy), the rest train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["digits_images", "TEST_SIZE", "SPLITS"]

TEST_SIZE = 597  # leaves 1,200 training images
SPLITS = ("all", "train", "test")


def digits_images(image_size: int = 16, split: str = "all", interpolation: str = "bilinear", dtype=torch.float32):
    """``(images [N, 1, image_size, image_size] in [-1, 1], labels [N])`` of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0 * 2.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if image_size != images.shape[-1]:
        kwargs = dict(align_corners=False) if interpolation == "bilinear" else {}
        images = F.interpolate(images, size=(int(image_size), int(image_size)), mode=interpolation, **kwargs)
    images = images.clamp(-1.0, 1.0)
    if split != "all":
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        index = order[:TEST_SIZE] if split == "test" else order[TEST_SIZE:]
        images, labels = images[index], labels[index]
    return images.to(dtype), labels
