"""CLIP score on a tiny random CLIP built locally (tokenizer from a locally written byte-level BPE vocabulary),
against a direct computation of the formula from the model's sub-networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bdia.metrics import CLIPScore, read_prompts


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (image 32x32, patch 8, width 32, 2 layers) and its processor, saved like a Hub model
    (bdia.testing.build_tiny_clip: the tokenizer's vocabulary is written locally, no download)."""
    from transformers import CLIPModel, CLIPProcessor

    from bdia.testing import build_tiny_clip

    folder = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), image_size=32)
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    return folder, model, processor.tokenizer, processor


@torch.no_grad()
def _direct_scores(model, tokenizer, processor, images, prompts):
    """100 * cos from the sub-networks, with the pixel normalisation written out (images already 32x32)."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).float() / 255 - mean) / std
    image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    scores = []
    for image_embed, prompt in zip(image_embeds, prompts):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        text_embed = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
        cos = torch.dot(image_embed.double(), text_embed.double()) / (image_embed.double().norm() * text_embed.double().norm())
        scores.append(100 * cos)
    return torch.stack(scores)


def test_clip_score_matches_the_formula_on_a_tiny_random_clip(tiny_clip, tmp_path):
    folder, model, tokenizer, processor = tiny_clip
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    prompts = ["a photo of a cat", "abca do", "x", "a much longer prompt than the others, padded in its batch", "do ab"]
    metric = CLIPScore(path=str(folder), prompts=prompts, batch_size=2, device="cpu")
    out = metric(images)
    direct = _direct_scores(model, tokenizer, processor, images, prompts)

    np.testing.assert_allclose(out["per_image"], direct.clamp(min=0).numpy(), rtol=1e-4, atol=1e-4)
    assert out["clip_score"] == pytest.approx(max(float(direct.mean()), 0.0), abs=1e-4)
    assert out["num_images"] == 5 and out["model"] == str(folder)
    assert (direct < 0).any() and (direct > 0).any()  # a random CLIP has both signs: the clipping is exercised

    # Prompts from the run folder (prompts.txt), one image pair at a time gives the same numbers.
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "images.npz", images=images, seeds=np.arange(5))
    (run / "prompts.txt").write_text("\n".join(prompts) + "\n")
    again = CLIPScore(path=str(folder), batch_size=1, device="cpu")(run, run_dir=run)
    np.testing.assert_allclose(again["per_image"], out["per_image"], rtol=1e-4, atol=1e-4)


def test_read_prompts_sources_and_errors(tmp_path):
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 3, 4, 4), np.uint8), prompts=np.array(["a", "b"]))
    assert read_prompts(tmp_path, count=2) == ["a", "b"]
    assert read_prompts(None, prompts="same", count=3) == ["same"] * 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "prompts.json").write_text(json.dumps(["x", "y"]))
    assert read_prompts(tmp_path / "other", count=2) == ["x", "y"]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        read_prompts(tmp_path, count=3)
    with pytest.raises(ValueError, match="needs prompts"):
        read_prompts(tmp_path / "missing")
