"""Where images to evaluate come from: a run folder, an ``.npz``, a folder of image files, or arrays in memory.

Every source is an :class:`ImageSource`: ``len(source)`` images of one shape ``[C, H, W]`` (uint8,
C = 1 or 3), optional per-image ``seeds``, and ``source.batch(indices)`` returning a uint8 tensor
``[B, C, H, W]``. Folders of image files are read lazily, batch by batch.

* a **run folder** (``bdia.apps.sample.sample_run``'s output): ``images.npz`` (``images`` uint8 ``[N, C, H, W]``,
  ``seeds``); if it has none, its ``images/`` folder;
* an **.npz** file: ``images`` (NCHW or NHWC), or ``arr_0`` (NHWC, the layout of ADM's reference batches),
  and ``seeds`` when present;
* a **folder** of ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.webp`` files, sorted by name (not recursive);
  grayscale files give 1 channel, everything else 3 (alpha dropped); a file named ``<digits>.<ext>`` gives
  its seed (EDM's and our ``<seed:06d>.png``);
* a uint8 **array or tensor** ``[N, C, H, W]`` (in memory, e.g. straight from a sampling run).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..runfolder import npz_members

__all__ = ["ImageSource", "open_images", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageSource:
    """A fixed, ordered set of uint8 images; see the module docstring."""

    def __init__(self, images=None, files: Sequence[Path] | None = None, seeds=None, description: str = "images"):
        if (images is None) == (files is None):
            raise ValueError("give either images or files")
        self.description = description
        self._files = list(files) if files is not None else None
        if images is not None:
            self._images = _as_nchw_uint8(images, description)
            self.shape = tuple(self._images.shape[1:])
            count = len(self._images)
        else:
            if not self._files:
                raise ValueError(f"{description}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
            self._images = None
            self.shape = tuple(_read_file(self._files[0]).shape)
            count = len(self._files)
        if count == 0:
            raise ValueError(f"{description}: no images")
        if seeds is not None:
            seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
            if len(seeds) != count:
                raise ValueError(f"{description}: {len(seeds)} seeds for {count} images")
        self.seeds = seeds
        self._len = count

    def __len__(self) -> int:
        return self._len

    @property
    def channels(self) -> int:
        return self.shape[0]

    def batch(self, indices) -> torch.Tensor:
        """uint8 ``[len(indices), C, H, W]``."""
        indices = [int(i) for i in indices]
        if self._images is not None:
            return torch.from_numpy(np.ascontiguousarray(self._images[indices]))
        arrays = []
        for i in indices:
            array = _read_file(self._files[i])
            if array.shape != self.shape:
                raise ValueError(f"{self.description}: {self._files[i].name} has shape {array.shape}, the first file "
                                 f"{self.shape}; all images must have one size")
            arrays.append(array)
        return torch.from_numpy(np.stack(arrays))

    def all(self) -> torch.Tensor:
        return self.batch(range(len(self)))

    def subset(self, indices, description: str | None = None) -> "ImageSource":
        """The images at ``indices`` (with their seeds) as a new in-memory source."""
        indices = np.asarray(list(indices), dtype=np.int64)
        seeds = None if self.seeds is None else self.seeds[indices]
        return ImageSource(images=self.batch(indices).numpy(), seeds=seeds, description=description or self.description)

    def __repr__(self) -> str:
        return f"ImageSource({self.description!r}, n={len(self)}, shape={self.shape})"


def _as_nchw_uint8(images, description) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"{description}: expected uint8 images (quantised, 0..255), got dtype {array.dtype}")
    if array.ndim == 3:  # [N, H, W] grayscale
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{description}: expected images [N, C, H, W], got shape {tuple(array.shape)}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):  # NHWC
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise ValueError(f"{description}: expected 1 or 3 channels, got shape {tuple(array.shape)}")
    return array


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("L", "I;16", "I", "F", "1"):
            array = np.asarray(image.convert("L"))[None]
        else:
            array = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def _seed_of(path: Path):
    stem = path.stem
    return int(stem) if stem.isdigit() else None


def _folder_source(folder: Path, description: str) -> ImageSource:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{description}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    seeds = [_seed_of(p) for p in files]
    return ImageSource(files=files, seeds=None if None in seeds else seeds, description=description)


#: Bound on the images an ``.npz`` may declare (50k ImageNet-64 images are 614 MB): this, or the free memory.
MAX_IMAGES_BYTES = 16 * 2**30


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _npz_source(path: Path, description: str) -> ImageSource:
    what = f"{description}: {path}" if str(path) != description else description
    if not path.is_file():
        raise ValueError(f"{what}: not a regular file")
    members = npz_members(path, 2**40, f"{what} (cannot read it as .npz)")  # headers only: nothing unpacked yet
    key = "images" if "images" in members else "arr_0" if "arr_0" in members else None
    if key is None:
        raise ValueError(f"{description}: {path} has no 'images' (or 'arr_0') array; it has {sorted(members)}")
    shape, dtype = members[key]
    if dtype != np.uint8 or len(shape) not in (3, 4):
        raise ValueError(f"{what}: '{key}' must be uint8 images [N, C, H, W] (or NHWC), got {list(shape)} {dtype}")
    declared = math.prod(shape)
    free = _available_memory()
    limit = min(MAX_IMAGES_BYTES, int(free * 0.8)) if free else MAX_IMAGES_BYTES
    if declared > limit:
        raise ValueError(f"{what}: '{key}' declares {declared / 2**30:.2f} GiB of images, more than the "
                         f"{limit / 2**30:.2f} GiB this reader accepts here (free memory or {MAX_IMAGES_BYTES // 2**30} GiB)")
    if "seeds" in members and (len(members["seeds"][0]) != 1 or members["seeds"][0][0] != shape[0]):
        raise ValueError(f"{what}: 'seeds' must be one seed per image ({shape[0]}), got {list(members['seeds'][0])}")
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data[key]
            seeds = data["seeds"] if "seeds" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated / damaged archives too
        raise ValueError(f"{description}: cannot read {path} as .npz ({e})") from None
    if key == "arr_0" and images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return ImageSource(images=images, seeds=seeds, description=description)


def open_images(source, seeds=None, description: str | None = None) -> ImageSource:
    """An :class:`ImageSource` from a run folder, an ``.npz``, a folder of images, or a uint8 array/tensor.

    Raises ``ValueError`` (one line) for a missing path, a folder without images, a file of another kind.
    """
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ImageSource(images=source, seeds=seeds, description=description or "images")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"images: expected a path or a uint8 array, got {type(source).__name__}")
    path = Path(source).expanduser()
    description = description or str(path)
    if not path.exists():
        raise ValueError(f"{description}: no such file or directory")
    if path.is_dir():
        if (path / "images.npz").is_file():
            return _npz_source(path / "images.npz", description)
        if (path / "images").is_dir():
            return _folder_source(path / "images", description)
        return _folder_source(path, description)
    if path.suffix.lower() == ".npz":
        return _npz_source(path, description)
    raise ValueError(f"{description}: not a run folder, an image folder or an .npz file")
