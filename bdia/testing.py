"""Tiny models built locally with random weights, for tests, offline demos and benchmarks: no download.

* :func:`build_tiny_sd`: a Stable Diffusion diffusers folder (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
  a CLIP tokenizer from a locally written byte-level vocabulary, DDIMScheduler with SD's settings) that
  :func:`bdia.networks.load_sd` and diffusers' own pipelines load;
* :func:`build_tiny_clip`: a CLIP model + processor folder for the CLIP score;
* :func:`build_tiny_sd3` / :func:`build_tiny_flux`: flow-matching pipelines (``StableDiffusion3Pipeline``: an
  ``SD3Transformer2DModel``, its VAE, two CLIP text encoders, no T5; ``FluxPipeline``: a ``FluxTransformer2DModel``,
  CLIP + a tiny T5 with a tokenizer built here), each with ``FlowMatchEulerDiscreteScheduler`` as its checkpoint
  family has it (SD3: shift 3; FLUX.1-dev: dynamic shifting); ``scripts/make_tiny_flow.py`` writes them.

Their outputs are noise-like: they exercise every code path (shapes, dtypes, scheduler numbers, guidance,
exactness of inversion), not image quality. ``scripts/make_tiny_sd.py`` writes both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .schedules import SD_SCHEDULE

__all__ = ["build_tiny_sd", "build_tiny_clip", "build_tiny_sd3", "build_tiny_flux", "RANDOM_WEIGHTS_MARKER",
           "has_random_weights"]

#: A file the builders write into every folder they make, so that apps can say its outputs are noise.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"


def _mark_random(folder: Path, what: str) -> None:
    (Path(folder) / RANDOM_WEIGHTS_MARKER).write_text(
        f"{what} with random weights, written by bdia.testing for tests and offline demos: its outputs are noise by "
        f"construction and measure nothing about image quality.\n")


def has_random_weights(path) -> bool:
    """Whether ``path`` is a model folder written by :func:`build_tiny_sd` / :func:`build_tiny_clip` (random
    weights); ``False`` for anything else (a Hub id, another folder)."""
    try:
        return (Path(path) / RANDOM_WEIGHTS_MARKER).is_file()
    except (OSError, ValueError):
        return False


def _bytes_to_unicode() -> list[str]:
    """The byte-level BPE alphabet CLIP's tokenizer uses (256 printable characters for the 256 bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _tiny_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer from a vocabulary and merges written here (byte alphabet, its end-of-word forms, a few
    merges of common English letter pairs): no download."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer, vocab


def _tiny_folder(out_dir, sample_size) -> tuple[Path, int]:
    """``out_dir`` (created) and the image side, checked: a positive multiple of 8 pixels."""
    sample_size = int(sample_size)
    if sample_size < 8 or sample_size % 8:
        raise ValueError(f"sample_size must be a positive multiple of 8 (pixels), got {sample_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, sample_size


def build_tiny_sd(out_dir, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random Stable Diffusion as a diffusers folder and return its path.

    Components (random weights from ``torch.manual_seed(seed)``, so the folder is deterministic given ``seed``):
    ``UNet2DConditionModel`` (block channels 16/32, one cross-attention down/up block, cross-attention width 32,
    4 latent channels), ``AutoencoderKL`` (3 blocks of 8/16/16 channels: factor 4, latents ``sample_size / 4``),
    ``CLIPTextModel`` (width 32, 2 layers, 77 positions), a ``CLIPTokenizer`` from a locally written byte-level
    vocabulary, and ``DDIMScheduler`` with SD's settings (:data:`bdia.SD_SCHEDULE`).

    ``sample_size`` is the image side in pixels (a multiple of 8); the UNet's ``sample_size`` is the latent side.
    The folder (``model_index.json`` + one subfolder per component, safetensors weights) loads with
    :func:`load_sd` ``(path=...)`` and with ``StableDiffusionPipeline.from_pretrained(out_dir, safety_checker=None)``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir, sample_size = _tiny_folder(out_dir, sample_size)
    tokenizer, vocab = _tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        vae_factor = 4
        unet = UNet2DConditionModel(
            sample_size=sample_size // vae_factor,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=sample_size,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], projection_dim=32,
        ))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _mark_random(out_dir, "A tiny Stable Diffusion")
    return out_dir


def build_tiny_clip(folder, image_size: int = 32):
    """A random transformers CLIPModel + CLIPProcessor (width 32, 2 layers, ``image_size`` pixels, patch 8) saved
    like a Hub model, with the tiny SD's locally built tokenizer: a CLIP-score model that needs no download."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab = _tiny_tokenizer()
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    torch.random.set_rng_state(state)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _mark_random(folder, "A tiny CLIP model")
    return Path(folder)


def _tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram) tokenizer from a vocabulary written here: lower-case letters, digits, a little punctuation,
    word-initial letters; no download."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars[:26]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_clip_text(vocab, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=32, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_flow_vae(sample_size: int, latent_channels: int, blocks: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) + (16,) * (blocks - 1),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=sample_size,
        # SD3 / FLUX VAEs shift and scale their latents (the real ones: 0.0609 / 1.5305 and 0.1159 / 0.3611)
        shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )


def _seeded(seed: int, build):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        return build()
    finally:
        torch.random.set_rng_state(state)


def build_tiny_sd3(out_dir, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random Stable Diffusion 3 as a diffusers folder (``StableDiffusion3Pipeline.from_pretrained``
    and :func:`bdia.networks.flow.load_flow` read it) and return its path.

    ``SD3Transformer2DModel`` (1 joint block, 2 heads of 8, patch 2, 4 latent channels, joint attention width 64,
    pooled width 64), an ``AutoencoderKL`` with SD3's latent shift and scale (2 blocks: factor 2, latents
    ``sample_size / 2``), two ``CLIPTextModelWithProjection`` (width 32, projection 32) with the locally built CLIP
    tokenizer, no T5 (``text_encoder_3=None``, which SD3 allows: its prompt tokens are zeros), and
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, SD3's. Deterministic given ``seed``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out_dir, sample_size = _tiny_folder(out_dir, sample_size)
    tokenizer, vocab = _tiny_tokenizer()

    def build():
        transformer = SD3Transformer2DModel(
            sample_size=sample_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
            pooled_projection_dim=64, pos_embed_max_size=sample_size // 2,
        )
        return (transformer.eval(), _tiny_flow_vae(sample_size, 4, 2), _tiny_clip_text(vocab, True),
                _tiny_clip_text(vocab, True))

    transformer, vae, text_encoder, text_encoder_2 = _seeded(seed, build)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _mark_random(out_dir, "A tiny Stable Diffusion 3")
    return out_dir


def build_tiny_flux(out_dir, seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True) -> Path:
    """Write a tiny random FLUX.1 as a diffusers folder (``FluxPipeline.from_pretrained`` and
    :func:`bdia.networks.flow.load_flow` read it) and return its path.

    ``FluxTransformer2DModel`` (1 double and 1 single block, 2 heads of 16, RoPE axes 4/4/8, 4 latent channels
    packed 2x2 into 16, ``guidance_embeds`` as FLUX.1-dev: True, schnell: False), an ``AutoencoderKL`` with a
    latent shift and scale (2 blocks: factor 2), a ``CLIPTextModel`` (pooled width 32) with the locally built CLIP
    tokenizer, a ``T5EncoderModel`` (width 32, 1 layer) with a T5 tokenizer built here, and
    ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's settings (dynamic shifting, ``base_shift`` 0.5,
    ``max_shift`` 1.15, ``shift`` 3). Image side ``sample_size`` (a multiple of 8: packing needs even latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    out_dir, sample_size = _tiny_folder(out_dir, sample_size)
    tokenizer, vocab = _tiny_tokenizer()
    tokenizer_2 = _tiny_t5_tokenizer()

    def build():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
        return transformer.eval(), _tiny_flow_vae(sample_size, 4, 2), _tiny_clip_text(vocab, False), t5.eval()

    transformer, vae, text_encoder, text_encoder_2 = _seeded(seed, build)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _mark_random(out_dir, "A tiny FLUX.1")
    return out_dir
