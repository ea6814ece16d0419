"""CLIP score for text-to-image runs, computed with transformers' ``CLIPModel`` / ``CLIPProcessor`` directly.

Convention (torchmetrics' ``CLIPScore``, the one text-to-image papers report):

    per image:  s_i = 100 * cos(E_img(image_i), E_txt(prompt_i))      (projected embeddings, L2-normalised)
    mean:       max(mean_i s_i, 0)

``per_image`` is reported as ``max(s_i, 0)`` (the per-pair clip of Hessel et al.'s CLIPScore, with weight
100); the mean is torchmetrics' ``max(mean s_i, 0)``. The two agree whenever no cosine is negative (the usual
case with a trained CLIP; a random network in the tests has negative ones, so both are tested). Prompts
longer than the text model's ``max_position_embeddings`` (77) tokens are truncated by the tokenizer, which
keeps the end-of-text token the text model pools at (torchmetrics cuts the token ids, end token included).
Images go through the model's own ``CLIPProcessor`` (resize shortest side, centre crop, CLIP mean/std).

Why not torchmetrics: its ``CLIPScore`` (1.9) expects ``get_image_features`` to return a tensor, which
transformers 5 replaced by a model output; and it is one more dependency for a few lines.
open_clip models (ViT-g-14) are not supported: ``open-clip-torch`` pulls in ``timm`` and ``ftfy`` and
downloads its weights from the Hub at run time; only transformers' ``CLIPModel`` checkpoints are.

Offline, a model that is not in the Hugging Face cache fails at once (``local_files_only``) with the Hub
URL, the cache path and the config key ``metrics.clip.path`` that takes a local folder
(``save_pretrained`` layout: ``config.json``, weights, tokenizer and processor files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..distributed import gather_rows, resolve_device, shard_indices
from ..download import AssetUnavailableError, hub_cache_path, hub_reachable, is_offline
from .images import open_images

__all__ = ["CLIPScore", "DEFAULT_CLIP_MODEL", "clip_edit_metrics", "clip_scores", "load_clip", "read_prompts"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
PATH_KEY = "metrics.clip.path"


def load_clip(path: str = DEFAULT_CLIP_MODEL, device="cpu", dtype=torch.float32, config_key: str = PATH_KEY):
    """``(CLIPModel, CLIPProcessor)`` from a local folder or a Hub id (cache first; offline: cache only).

    Raises :class:`AssetUnavailableError` with the Hub URL, the cache path and ``config_key`` (the config key that
    takes a local folder) when the model is neither a local folder nor in the cache and cannot be downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    text = str(path).strip()
    local = Path(text).expanduser()
    if local.is_dir():
        try:
            model = CLIPModel.from_pretrained(local, dtype=dtype)
            processor = CLIPProcessor.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise AssetUnavailableError(None, local, config_key, what=f"CLIP model {text!r}",
                                        reason=f"not a complete CLIPModel/CLIPProcessor folder ({str(e).splitlines()[0][:120]})") from None
        return model.to(device).eval().requires_grad_(False), processor
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise AssetUnavailableError(None, local, config_key, reason="no such folder", what=f"{config_key}={text}")
    url = f"https://huggingface.co/{text}"

    def unavailable(reason):
        return AssetUnavailableError(url, hub_cache_path(text), config_key, reason=reason, what=f"CLIP model {text!r}")

    offline = is_offline()
    try:
        model = CLIPModel.from_pretrained(text, dtype=dtype, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(text, local_files_only=True)
    except (OSError, ValueError):
        if offline:
            var = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "BDIA_OFFLINE"
            raise unavailable(f"offline mode ({var}=1) and not in the Hugging Face cache") from None
        problem = hub_reachable()  # no network: fail now, not after the Hub client's retries
        if problem:
            raise unavailable(f"not in the Hugging Face cache and the Hub is unreachable ({problem})") from None
        try:
            model = CLIPModel.from_pretrained(text, dtype=dtype)
            processor = CLIPProcessor.from_pretrained(text)
        except (OSError, ValueError) as e2:
            raise unavailable(f"download failed ({str(e2).splitlines()[0][:160]})") from None
    return model.to(device).eval().requires_grad_(False), processor


def _pooled(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_scores(model, processor, images, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``100 * cos`` between each image (uint8 ``[N, 3, H, W]``; grayscale repeated) and its prompt, float64
    ``[N]``, not clipped. Shards over torchrun ranks and gathers the scores in image order."""
    source = open_images(images)
    if len(prompts) != len(source):
        raise ValueError(f"{len(prompts)} prompts for {len(source)} images")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_tokens = model.config.text_config.max_position_embeddings
    mine = list(shard_indices(len(source)))
    scores = []
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        x = source.batch(idx)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        inputs = processor(text=[prompts[i] for i in idx], images=list(x), return_tensors="pt", padding=True,
                           truncation=True, max_length=max_tokens)
        image_features = _pooled(model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype)))
        text_features = _pooled(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                        attention_mask=inputs["attention_mask"].to(device)))
        image_features = image_features.double() / image_features.double().norm(dim=-1, keepdim=True)
        text_features = text_features.double() / text_features.double().norm(dim=-1, keepdim=True)
        scores.append((100 * (image_features * text_features).sum(-1)).cpu())
    mine_scores = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    return gather_rows(mine_scores, len(source))


@torch.no_grad()
def clip_edit_metrics(model, processor, original, edited, source_prompt: str, edit_prompt: str) -> dict:
    """How well an edit follows its prompt, per image pair (uint8 ``[N, 3, H, W]``), averaged:

    * ``clip_score_edit``: ``100 * cos(E_image(edited), E_text(edit_prompt))`` (the CLIP score of the edit);
    * ``clip_directional_similarity``: ``cos(E_image(edited) - E_image(original), E_text(edit_prompt) -
      E_text(source_prompt))`` (Gal et al., StyleGAN-NADA; InstructPix2Pix's measure): does the image move the
      way the text moves."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    max_tokens = model.config.text_config.max_position_embeddings

    def unit(features):
        features = _pooled(features).double()
        return features / features.norm(dim=-1, keepdim=True)

    def image_features(images):
        inputs = processor(images=list(torch.as_tensor(np.asarray(images))), return_tensors="pt")
        return unit(model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype)))

    text = processor(text=[source_prompt, edit_prompt], return_tensors="pt", padding=True, truncation=True,
                     max_length=max_tokens)
    t_source, t_edit = unit(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                    attention_mask=text["attention_mask"].to(device)))
    i_original, i_edited = image_features(original), image_features(edited)
    direction_image, direction_text = i_edited - i_original, t_edit - t_source
    norms = direction_image.norm(dim=-1) * direction_text.norm()
    directional = (direction_image @ direction_text) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return {"clip_score_edit": float((100 * i_edited @ t_edit).mean()),
            "clip_directional_similarity": float(directional.mean())}


def read_prompts(run_dir=None, prompts=None, count: int | None = None) -> list[str]:
    """Prompts for a run's images: ``prompts`` (a list, or one string for all images) if given, else the run
    folder's ``images.npz`` ``prompts`` array, ``prompts.json`` (a list) or ``prompts.txt`` (one per line)."""
    found = None
    if prompts is not None:
        found = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    elif run_dir is not None:
        run_dir = Path(run_dir)
        npz = run_dir / "images.npz" if run_dir.is_dir() else run_dir
        if npz.suffix == ".npz" and npz.is_file():
            with np.load(npz, allow_pickle=False) as data:
                if "prompts" in data.files:
                    found = [str(p) for p in data["prompts"]]
        base = run_dir if run_dir.is_dir() else run_dir.parent
        if found is None and (base / "prompts.json").is_file():
            found = [str(p) for p in json.loads((base / "prompts.json").read_text())]
        if found is None and (base / "prompts.txt").is_file():
            found = [line for line in (base / "prompts.txt").read_text().splitlines() if line.strip()]
    if found is None:
        raise ValueError("CLIP score needs prompts: metrics.clip.prompts, or images.npz 'prompts', prompts.json or "
                         "prompts.txt in the run folder")
    if count is not None and len(found) == 1:
        found = found * count
    if count is not None and len(found) != count:
        raise ValueError(f"CLIP score: {len(found)} prompts for {count} images")
    return found


class CLIPScore:
    """The CLIP-score metric for ``configs/prompt_metrics/metrics/clip.yaml``.

    Args:
        path: Hub id (default ``openai/clip-vit-large-patch14``) or a local ``save_pretrained`` folder
            (config key ``metrics.clip.path``).
        prompts: prompts (list, or one for every image); default: read from the run folder.
        batch_size, device (``auto``: this rank's GPU if any), dtype (``float32`` / ``float16``).
        per_image: also return the per-image scores (a list) — large for 30k images.
    """

    def __init__(self, path: str = DEFAULT_CLIP_MODEL, prompts=None, batch_size: int = 32, device="auto",
                 dtype: str = "float32", per_image: bool = True):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"metrics.clip.dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.path, self.prompts, self.batch_size = str(path), prompts, int(batch_size)
        self.device, self.dtype, self.per_image = resolve_device(device), getattr(torch, dtype), per_image
        self._loaded = None

    def load(self):
        """Load (once) and return ``(model, processor)``; call it early to fail before sampling when offline."""
        if self._loaded is None:
            self._loaded = load_clip(self.path, self.device, self.dtype)
        return self._loaded

    def __call__(self, images, run_dir=None) -> dict:
        source = open_images(images)
        prompts = read_prompts(run_dir if run_dir is not None else (images if isinstance(images, (str, Path)) else None),
                               self.prompts, len(source))
        model, processor = self.load()
        raw = clip_scores(model, processor, source, prompts, self.batch_size)
        out = {
            "clip_score": float(torch.clamp(raw.mean(), min=0)),
            "clip_score_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "num_images": len(raw),
            "model": self.path,
            "convention": "100 * cosine; mean = max(mean, 0) (torchmetrics); per image max(score, 0)",
        }
        if self.per_image:
            out["per_image"] = torch.clamp(raw, min=0).tolist()
        return out
