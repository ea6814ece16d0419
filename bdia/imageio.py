"""Seeds, per-image noise and images on disk: what every sampling app and metric shares.

* Seeds are a list or a range spec (``"0-63"``, ``"0,5,7-9"``); image k's noise, then its class label, come
  from its own ``torch.Generator`` seeded with k (EDM's ``generate.py`` scheme,
  :class:`StackedRandomGenerator`), so an image does not depend on the batch size, on the other seeds or on
  the number of processes.
* Images are quantised as EDM does, ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (:func:`quantize`), and
  saved as PNG; :func:`image_grid` tiles them, :func:`labelled_grid` with its rows and columns named.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .runfolder import atomic_write

__all__ = [
    "MAX_SEED",
    "MAX_SEEDS",
    "parse_seeds",
    "format_seeds",
    "StackedRandomGenerator",
    "seed_noise",
    "class_labels_for",
    "quantize",
    "image_grid",
    "labelled_grid",
    "save_image_grid",
    "png_bytes",
    "read_png",
]

#: Seeds are 32-bit (EDM takes ``seed % 2**32``); a run takes at most this many.
MAX_SEED = 2**32 - 1
MAX_SEEDS = 10_000_000

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")

# --------------------------------------------------------------------------------------------------
# Seeds and noise.


def parse_seeds(spec) -> list[int]:
    """Seeds from an int, a spec string (``"0-49999"``, ``"0,5,7-9"``; ranges inclusive) or a list of either.

    Raises ``ValueError`` naming the offending part for anything else: empty specs, negative or non-integer
    seeds, descending ranges (``"9-7"``), seeds above ``2**32 - 1``, duplicates.
    """
    seeds = _parse_seed_spec(spec)
    if not seeds:
        raise ValueError(f"seeds: no seeds given ({spec!r}); use e.g. 0-63 or 0,5,7-9")
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ValueError(f"seeds: seed {s} appears more than once in {spec!r}")
        seen.add(s)
    return seeds


def _parse_seed_spec(spec) -> list[int]:
    if isinstance(spec, bool) or spec is None:
        raise ValueError(f"seeds: expected a seed, a range like 0-63 or a list, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return [_check_seed(int(spec), spec)]
    if isinstance(spec, str):
        seeds: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if part.isdigit():
                seeds.append(_check_seed(int(part), spec))
                continue
            match = _RANGE.match(part)
            if not match:
                where = "" if part == spec else f" in {spec!r}"
                raise ValueError(
                    f"seeds: cannot parse {part!r}{where}; expected non-negative integers and "
                    f"ranges a-b separated by commas, e.g. 0-63 or 0,5,7-9"
                )
            lo, hi = (_check_seed(int(v), spec) for v in match.groups())
            if lo > hi:
                raise ValueError(f"seeds: range {part!r} in {spec!r} is descending; write {hi}-{lo}")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"seeds: {spec!r} names more than {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
        return seeds
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        seeds = []
        for item in spec:
            if isinstance(item, (list, tuple)):
                raise ValueError(f"seeds: nested lists are not seeds: {item!r}")
            seeds.extend(_parse_seed_spec(item))
        return seeds
    if isinstance(spec, float) and spec.is_integer():
        return [_check_seed(int(spec), spec)]
    raise ValueError(f"seeds: expected a seed, a range like 0-63 or a list, got {spec!r}")


def _check_seed(seed: int, spec) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seeds: seed {seed} in {spec!r} is outside [0, 2**32 - 1]")
    return seed


def format_seeds(seeds: Sequence[int]) -> str:
    """The shortest range spec for ``seeds`` in their order: ``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


class StackedRandomGenerator:
    """One ``torch.Generator`` per image, seeded with the image's seed (EDM's scheme): row k of every draw
    comes from generator k alone, so it does not depend on the batch it is in. ``randn_like`` can be handed
    to :func:`bdia.edm` as the churn noise, which keeps stochastic EDM sampling per-image reproducible too.

    Draws are made in float32 (what EDM draws) and cast, so seed k gives EDM's latents for seed k on the same
    device type (CPU and CUDA generators give different numbers).
    """

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape, dtype=torch.float64) -> torch.Tensor:
        """``[len(seeds), *shape]`` standard normal draws, row k from generator k."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows for {len(self.generators)} generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in ``[0, high)`` per image (``[len(seeds)]``, int64), from that image's generator."""
        return torch.stack([torch.randint(int(high), size=(), generator=g, device=self.device) for g in self.generators])


def seed_noise(seeds: Sequence[int], shape, sigma_max, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """The initial states ``sigma_max * n_k`` (``[len(seeds), *shape]``), ``n_k`` drawn by a generator seeded
    with ``seeds[k]`` alone. ``shape`` is one image's shape, e.g. ``(1, 16, 16)``."""
    noise = StackedRandomGenerator(parse_seeds(list(seeds)), device).randn(shape, dtype=dtype)
    return noise * torch.as_tensor(sigma_max, dtype=dtype, device=noise.device)


def class_labels_for(rng: StackedRandomGenerator, label_dim: int, class_idx: int | None = None):
    """Class labels as EDM's ``generate.py`` draws them, *after* the latents: image k's own generator picks
    ``randint(label_dim)``, the label is that row of ``eye(label_dim)`` (float32 one-hot). ``class_idx`` fixes
    the class for every image (the draw still happens, as in EDM, so later draws such as EDM's churn noise
    are unchanged). Returns ``(indices [B] int64, one_hot [B, label_dim])``, or ``(None, None)`` when
    ``label_dim`` is 0."""
    if not label_dim:
        return None, None
    indices = rng.randint(label_dim)
    if class_idx is not None:
        indices = torch.full_like(indices, int(class_idx))
    return indices, torch.eye(label_dim, device=indices.device)[indices]


# --------------------------------------------------------------------------------------------------
# Images.


def quantize(x) -> torch.Tensor:
    """EDM's quantisation of ``[-1, 1]`` images: ``(x * 127.5 + 128).clip(0, 255).to(uint8)``.

    (The ``+ 128`` with truncation rounds ``x * 127.5 + 127.5`` to the nearest integer, halves up.)
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise TypeError(f"quantize expects floating-point images in [-1, 1], got dtype {x.dtype}")
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _as_uint8_nchw(images) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (see quantize), got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, C, H, W] with C = 1 or 3, got {tuple(array.shape)}")
    return array


def image_grid(images, nrow: int | None = None, padding: int = 0, pad_value: int = 0, scale: int = 1) -> np.ndarray:
    """Tile uint8 images ``[N, C, H, W]`` into one ``[H', W', C]`` array, ``nrow`` images per row (default
    ``ceil(sqrt(N))``), ``padding`` pixels of ``pad_value`` between and around tiles, each pixel repeated
    ``scale`` times (nearest-neighbour enlargement, for tiny images)."""
    array = _as_uint8_nchw(images)
    n, c, h, w = array.shape
    if n == 0:
        raise ValueError("no images to tile")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    if scale > 1:
        array = array.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol_tiles, nrow_tiles = min(nrow, n), math.ceil(n / nrow)
    grid = np.full(
        (padding + nrow_tiles * (h + padding), padding + ncol_tiles * (w + padding), c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = array[i].transpose(1, 2, 0)
    return grid


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType, in the wheels)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels (words kept whole where they fit), ``max_lines`` at most."""
    lines: list[str] = []
    for word in str(text).split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,;") + " ..."
    return lines or [""]


def labelled_grid(images, nrow: int, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                  title: str | None = None, padding: int = 2, scale: int = 1, pad_value: int = 255,
                  font_size: int = 13, tile_labels: Sequence[str] | None = None) -> np.ndarray:
    """:func:`image_grid` with its rows and columns named: ``row_labels`` (one per row of tiles) in a margin on
    the left, ``col_labels`` (one per column) above the tiles, ``title`` above everything, black text on
    ``pad_value``; ``tile_labels`` (one per image, e.g. its class) in a strip under each tile. Labels wrap to the
    tile width (columns) or the margin (rows). Returns ``[H', W', C]`` uint8 (greyscale tiles are drawn in RGB so
    the text stays readable)."""
    from PIL import Image, ImageDraw

    if tile_labels is not None:
        array = _as_uint8_nchw(images)
        if len(tile_labels) != array.shape[0]:
            raise ValueError(f"{len(tile_labels)} tile labels for {array.shape[0]} images")
        strip = font_size + 4
        font = _font(font_size)
        tiles = []
        for image, label in zip(array, tile_labels):
            hwc = image.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
            hwc = hwc.repeat(3, axis=2) if hwc.shape[2] == 1 else hwc
            canvas = Image.new("RGB", (hwc.shape[1], hwc.shape[0] + strip), (pad_value,) * 3)
            canvas.paste(Image.fromarray(hwc), (0, 0))
            draw = ImageDraw.Draw(canvas)
            words, text = str(label).split(), ""
            for word in words:  # as many whole words as fit the tile ("3 cat" on 32 px: "3")
                if draw.textlength((text + " " + word).strip(), font=font) > hwc.shape[1] - 2 and text:
                    break
                text = (text + " " + word).strip()
            draw.text((2, hwc.shape[0] + 1), text, fill=(0, 0, 0), font=font)
            tiles.append(np.asarray(canvas).transpose(2, 0, 1))
        images, scale = np.stack(tiles), 1

    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value, scale=scale)
    if grid.shape[2] == 1:
        grid = grid.repeat(3, axis=2)
    n = _as_uint8_nchw(images).shape[0]
    rows, cols = math.ceil(n / nrow), min(nrow, n)
    tile_h, tile_w = (grid.shape[0] - padding) // rows - padding, (grid.shape[1] - padding) // cols - padding
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 3
    left = 0
    if row_labels:
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for {rows} rows of tiles")
        left = min(max(int(probe.textlength(str(t), font=font)) for t in row_labels) + 8, max(120, tile_w))
    col_lines = []
    if col_labels:
        if len(col_labels) != cols:
            raise ValueError(f"{len(col_labels)} column labels for {cols} columns of tiles")
        col_lines = [_wrap(probe, t, font, max(tile_w, 40), 3) for t in col_labels]
    title_lines = _wrap(probe, title, font, left + grid.shape[1] - 8, 3) if title else []
    top_cols = line_h * max((len(c) for c in col_lines), default=0) + (4 if col_lines else 0)
    top = line_h * len(title_lines) + (4 if title_lines else 0) + top_cols
    canvas = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), (pad_value,) * 3)
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((4, 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    y0 = top - top_cols
    for c, lines in enumerate(col_lines):
        x = left + padding + c * (tile_w + padding)
        for i, line in enumerate(lines):
            draw.text((x, y0 + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels or []):
        y = top + padding + r * (tile_h + padding)
        for i, line in enumerate(_wrap(draw, label, font, left - 8, max(1, tile_h // line_h))):
            draw.text((4, y + i * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def png_bytes(array_hwc: np.ndarray) -> bytes:
    import io

    from PIL import Image

    image = Image.fromarray(array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_grid(images, path, nrow: int | None = None, padding: int = 0, pad_value: int = 0, scale: int = 1) -> Path:
    """Write :func:`image_grid` of uint8 images ``[N, C, H, W]`` to ``path`` as PNG (atomically)."""
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value, scale=scale)
    with atomic_write(path) as f:
        f.write(png_bytes(grid))
    return Path(path)


def read_png(path: Path, shape: Sequence[int]) -> np.ndarray:
    """The PNG at ``path`` as uint8 ``[C, H, W]``; ``ValueError`` unless it has ``shape``."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    array = array.transpose(2, 0, 1)
    if array.shape != tuple(shape):
        raise ValueError(f"{path}: shape {list(array.shape)}, expected {list(shape)}")
    return array
