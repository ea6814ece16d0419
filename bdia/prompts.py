"""Prompts for text-to-image runs: from the command line, a text file, or COCO captions.

* :func:`read_prompt_file` — a text file, one prompt per line; blank lines and lines starting with ``#``
  are skipped, surrounding whitespace is stripped (the rule ``bdia.metrics.clip_score.read_prompts`` uses for
  a run folder's ``prompts.txt``, minus comments).
* :func:`coco_captions` — a fixed, seeded subset of the captions in COCO's
  ``annotations/captions_val2014.json`` (a local file; nothing is downloaded). The rule, so that a subset can
  be reproduced from its description alone:

  1. annotations are sorted by their caption ``id``;
  2. with ``one_per_image`` (default) only the first caption (lowest ``id``) of each image is kept;
  3. ``numpy.random.default_rng(seed).permutation`` of that list (``seed`` default 0) is taken and its first
     ``num`` entries are the subset, in that permuted order;
  4. each caption is stripped and its internal whitespace (newlines, runs of spaces) collapsed to one space.

  The subset for a smaller ``num`` is a prefix of the subset for a larger one.
* :func:`load_prompts` — exactly one of the three sources, as a list of strings; what the config keys
  ``prompts`` / ``prompt_file`` / ``coco_captions`` (+ ``num_prompts``, ``prompt_seed``) of
  ``configs/text2image/text2image.yaml`` feed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["read_prompt_file", "coco_captions", "load_prompts", "describe_prompt_source"]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


#: Bound on a prompt file's / captions file's size (COCO's captions_val2014.json is 24 MB).
MAX_TEXT_BYTES = 512 * 2**20


def _read_text(path: Path, key: str) -> str:
    """The UTF-8 text of the regular file ``path`` (a folder, a pipe, a binary or an oversized file is one line
    naming ``key`` and the file)."""
    if not path.exists():
        raise ValueError(f"{key}={path}: no such file")
    if path.is_dir():
        raise ValueError(f"{key}={path}: a folder, not a file")
    if not path.is_file():
        raise ValueError(f"{key}={path}: not a regular file (a pipe, socket or device)")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"{key}={path}: {path.stat().st_size / 2**20:.0f} MiB, more than the "
                         f"{MAX_TEXT_BYTES // 2**20} MiB this reader accepts")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}={path}: not UTF-8 text (byte {e.start}); give a text file") from None
    if "\x00" in text:
        raise ValueError(f"{key}={path}: holds NUL bytes, so it is not a text file")
    return text


def read_prompt_file(path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped, whitespace stripped)."""
    path = Path(path).expanduser()
    prompts = []
    for line in _read_text(path, "prompt_file").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt_file={path}: no prompts in it (one per line; blank lines and # comments are skipped)")
    return prompts


def coco_captions(path, num: int | None = None, seed: int = 0, one_per_image: bool = True,
                  return_records: bool = False):
    """A fixed, seeded subset of COCO captions (the rule is in the module notes).

    Args:
        path: a COCO captions file (``annotations/captions_val2014.json``) or the folder holding
            ``annotations/captions_val2014.json`` (or ``captions_val2014.json``).
        num: how many captions (default: all of them, permuted).
        seed: the permutation's seed (``numpy.random.default_rng(seed)``).
        one_per_image: keep one caption per image (the lowest caption id), so no image is described twice.
        return_records: return dicts ``{"caption", "caption_id", "image_id"}`` instead of strings.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "annotations" / "captions_val2014.json", path / "captions_val2014.json"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ValueError(f"coco_captions={path}: no annotations/captions_val2014.json in this folder")
    text = _read_text(path, "coco_captions")
    try:
        data = json.loads(text)
        annotations = data["annotations"]
        records = [{"caption": _clean(a["caption"]), "caption_id": int(a["id"]), "image_id": int(a["image_id"])}
                   for a in annotations]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"coco_captions={path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    records.sort(key=lambda r: r["caption_id"])
    if one_per_image:
        seen: set[int] = set()
        kept = []
        for r in records:
            if r["image_id"] not in seen:
                seen.add(r["image_id"])
                kept.append(r)
        records = kept
    records = [r for r in records if r["caption"]]
    if not records:
        raise ValueError(f"coco_captions={path}: no captions in it")
    if num is not None:
        if isinstance(num, bool) or int(num) != num or num < 1:
            raise ValueError(f"num_prompts must be a positive integer, got {num!r}")
        if num > len(records):
            raise ValueError(f"num_prompts={num} but {path} has only {len(records)} usable captions"
                             + (" (one per image)" if one_per_image else ""))
    order = np.random.default_rng(int(seed)).permutation(len(records))
    chosen = [records[i] for i in order[: (len(records) if num is None else int(num))]]
    return chosen if return_records else [r["caption"] for r in chosen]


_coco_captions = coco_captions


def load_prompts(prompts: str | Sequence[str] | None = None, prompt_file=None, coco_captions=None,
                 num_prompts: int | None = None, prompt_seed: int = 0) -> list[str]:
    """The prompts of a run from exactly one source:

    * ``prompts``: a list of prompts (or one string);
    * ``prompt_file``: :func:`read_prompt_file`;
    * ``coco_captions``: a captions file for :func:`coco_captions`, with ``num=num_prompts``, ``seed=prompt_seed``.

    ``num_prompts`` keeps the first ``num_prompts`` of a list or file (COCO: the seeded subset of that size).
    Raises ``ValueError`` (one line) for no source, several sources, or an empty / unreadable one.
    """
    given = [name for name, value in (("prompts", prompts), ("prompt_file", prompt_file),
                                      ("coco_captions", coco_captions)) if value not in (None, "", [])]
    if not given:
        raise ValueError("no prompts: set prompts=[...], prompt_file=/path/prompts.txt or "
                         "coco_captions=/path/annotations/captions_val2014.json")
    if len(given) > 1:
        raise ValueError(f"give exactly one prompt source, got {', '.join(given)} (set the others to null)")
    if num_prompts is not None and (isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1):
        raise ValueError(f"num_prompts must be a positive integer or null, got {num_prompts!r}")
    if coco_captions not in (None, ""):
        return _coco_captions(coco_captions, num=num_prompts, seed=prompt_seed)
    if prompt_file not in (None, ""):
        found = read_prompt_file(prompt_file)
    else:
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if any(not isinstance(p, str) for p in items):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in items if not isinstance(p, str)][0]}")
        found = [p.strip() for p in items]
        if any(not p for p in found):
            raise ValueError("prompts: empty prompt in the list (use negative_prompt / guidance for unconditional)")
    if num_prompts is not None:
        if num_prompts > len(found):
            raise ValueError(f"num_prompts={num_prompts} but only {len(found)} prompts were given")
        found = found[:num_prompts]
    return found


def describe_prompt_source(prompts=None, prompt_file=None, coco_captions=None, num_prompts=None,
                           prompt_seed: int = 0) -> dict:
    """How the prompts were chosen, for ``metrics.json``."""
    if coco_captions not in (None, ""):
        return {"source": "coco_captions", "path": str(coco_captions), "num_prompts": num_prompts,
                "seed": prompt_seed, "rule": "sorted by caption id, first caption per image, "
                                             "numpy default_rng(seed).permutation, first num"}
    if prompt_file not in (None, ""):
        return {"source": "prompt_file", "path": str(prompt_file), "num_prompts": num_prompts}
    return {"source": "list", "num_prompts": num_prompts}
