"""EDM's network architectures and preconditioners, written for this project.

This module re-implements the networks of Karras et al., "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022): the DDPM++ / NCSN++ U-Net of Song et al. (``SongUNet``), the ADM U-Net of
Dhariwal & Nichol (``DhariwalUNet``) and the four preconditioners (``VPPrecond``, ``VEPrecond``,
``iDDPMPrecond``, ``EDMPrecond``). It is our own code, written from the published description and from
reading NVIDIA's ``training/networks.py`` for the facts an interoperable implementation must share
(EDM's code is CC BY-NC-SA and is not copied here). What is shared, on purpose, so that the published
snapshots load into these classes:

* the class names (EDM pickles refer to classes by name; see :data:`EDM_CLASSES`);
* constructor argument names and defaults (a snapshot records the keyword arguments it was built with);
* parameter and buffer names and shapes (``load_state_dict(strict=True)`` of a snapshot's tensors works);
* the forward maths, including the order of the operations that matter for float32 round-off, and the
  ``use_fp16`` behaviour.

Conventions
-----------
* ``sigma`` is EDM's noise level: ``x = x0 + sigma * n``. A preconditioned network is a denoiser
  ``D(x, sigma, class_labels=None, **model_kwargs) -> denoised`` (the protocol of :mod:`bdia.denoisers`)
  with attributes ``sigma_min``, ``sigma_max`` and a method ``round_sigma``. ``sigma`` may be a 0-dim
  tensor or one value per batch row.
* ``class_labels`` are one-hot float rows ``[B, label_dim]`` (``None`` = all zeros, i.e. no class).
* Preconditioners compute in float32 whatever the input dtype, and return float32. With ``use_fp16=True``
  the inner U-Net runs in float16 -- but only on CUDA tensors and only when ``force_fp32`` is false, exactly
  as EDM does; on the CPU ``use_fp16`` changes nothing. Noise labels and embeddings stay float32; each
  layer casts its weights to the dtype of its input.
* Every module records its resolved constructor arguments (defaults filled in, a preconditioner's
  ``**model_kwargs`` merged in) as ``module.init_kwargs``, a plain dict a loader can compare against a
  snapshot's recorded arguments.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math

import torch
from torch import nn
from torch.nn.functional import silu

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "AttentionOp",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
    "SongUNet",
    "DhariwalUNet",
    "VPPrecond",
    "VEPrecond",
    "iDDPMPrecond",
    "EDMPrecond",
    "EDM_CLASSES",
    "EDM_MODULE",
]

#: The module path under which EDM's pickles name these classes.
EDM_MODULE = "training.networks"


def _records_init_kwargs(cls):
    """Class decorator: after ``__init__`` runs, store the resolved constructor arguments as
    ``self.init_kwargs`` (defaults applied; a trailing ``**kwargs`` catch-all merged into the dict)."""
    signature = inspect.signature(cls.__init__)
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        resolved = {}
        for name, value in list(bound.arguments.items())[1:]:  # skip self
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                resolved.update(value)
            else:
                resolved[name] = value
        self.init_kwargs = copy.deepcopy(resolved)

    cls.__init__ = __init__
    return cls


# --------------------------------------------------------------------------------------------------
# Layers.


def weight_init(shape, mode, fan_in, fan_out):
    """Random initial values for a weight or bias of ``shape`` (a list of ints).

    ``mode`` picks the distribution and its scale from the fans:

    ===================  ==========================  ===========================
    mode                 distribution                scale
    ===================  ==========================  ===========================
    ``xavier_uniform``   U(-1, 1) * scale            sqrt(6 / (fan_in + fan_out))
    ``xavier_normal``    N(0, 1) * scale             sqrt(2 / (fan_in + fan_out))
    ``kaiming_uniform``  U(-1, 1) * scale            sqrt(3 / fan_in)
    ``kaiming_normal``   N(0, 1) * scale             sqrt(1 / fan_in)
    ===================  ==========================  ===========================
    """
    if mode == "xavier_uniform":
        scale, uniform = math.sqrt(6 / (fan_in + fan_out)), True
    elif mode == "xavier_normal":
        scale, uniform = math.sqrt(2 / (fan_in + fan_out)), False
    elif mode == "kaiming_uniform":
        scale, uniform = math.sqrt(3 / fan_in), True
    elif mode == "kaiming_normal":
        scale, uniform = math.sqrt(1 / fan_in), False
    else:
        raise ValueError(f"unknown weight-init mode {mode!r}")
    noise = torch.rand(*shape) * 2 - 1 if uniform else torch.randn(*shape)
    return scale * noise


def _parameter(shape, init_mode, fan_in, fan_out, gain):
    return nn.Parameter(weight_init(list(shape), mode=init_mode, fan_in=fan_in, fan_out=fan_out) * gain)


@_records_init_kwargs
class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b`` whose weights follow the input's dtype.

    Parameters: ``weight`` ``[out_features, in_features]``, ``bias`` ``[out_features]`` (absent when
    ``bias=False``). Initial values are ``weight_init(...) * init_weight`` and ``weight_init(...) * init_bias``
    with fans (in_features, out_features).
    """

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(init_mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _parameter([out_features, in_features], gain=init_weight, **fans)
        if bias:
            self.bias = _parameter([out_features], gain=init_bias, **fans)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


@_records_init_kwargs
class Conv2d(nn.Module):
    """2-D convolution ('same' padding, odd ``kernel``) with optional 2x up- or downsampling by a separable
    FIR filter.

    ``resample_filter`` is a 1-D tap list ``f``; the layer stores the normalised 2-D filter
    ``outer(f, f) / sum(f)**2`` as the buffer ``resample_filter`` of shape ``[1, 1, len(f), len(f)]`` (only
    when ``up`` or ``down``; otherwise the buffer is ``None``). Upsampling is a stride-2 transposed
    depthwise convolution with 4x the filter, downsampling a stride-2 depthwise convolution.
    ``kernel=0`` makes a pure resampling layer without weights. Unfused order: resample, then convolve.
    ``fused_resample=True`` merges the two into fewer passes where a weight exists (convolve-then-filter
    for downsampling, filter-then-convolve with reduced padding for upsampling).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=[1, 1],
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1,
        init_bias=0,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        area = kernel * kernel
        fans = dict(init_mode=init_mode, fan_in=in_channels * area, fan_out=out_channels * area)
        if kernel:
            self.weight = _parameter([out_channels, in_channels, kernel, kernel], gain=init_weight, **fans)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = _parameter([out_channels], gain=init_bias, **fans)
        else:
            self.register_parameter("bias", None)
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if (up or down) else None)

    def _upsample(self, x, filt, padding):
        depthwise = (filt * 4).tile([self.in_channels, 1, 1, 1])
        return torch.nn.functional.conv_transpose2d(x, depthwise, groups=self.in_channels, stride=2, padding=padding)

    def _downsample(self, x, filt, channels, padding):
        depthwise = filt.tile([channels, 1, 1, 1])
        return torch.nn.functional.conv2d(x, depthwise, groups=channels, stride=2, padding=padding)

    def forward(self, x):
        conv2d = torch.nn.functional.conv2d
        weight = None if self.weight is None else self.weight.to(x.dtype)
        filt = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if weight is None else weight.shape[-1] // 2
        f_pad = 0 if filt is None else (filt.shape[-1] - 1) // 2
        fused = self.fused_resample and weight is not None
        if fused and self.up:
            x = self._upsample(x, filt, padding=max(f_pad - w_pad, 0))
            x = conv2d(x, weight, padding=max(w_pad - f_pad, 0))
        elif fused and self.down:
            x = conv2d(x, weight, padding=w_pad + f_pad)
            x = self._downsample(x, filt, self.out_channels, padding=0)
        else:
            if self.up:
                x = self._upsample(x, filt, padding=f_pad)
            if self.down:
                x = self._downsample(x, filt, self.in_channels, padding=f_pad)
            if weight is not None:
                x = conv2d(x, weight, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


@_records_init_kwargs
class GroupNorm(nn.Module):
    """Group normalisation with an affine ``weight``/``bias`` per channel.

    The number of groups is ``min(num_groups, num_channels // min_channels_per_group)``, so narrow layers
    get fewer, wider groups.
    """

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(
            x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps
        )


class AttentionOp(torch.autograd.Function):
    """Attention weights ``softmax_k(q^T k / sqrt(C))`` for ``q``, ``k`` of shape ``[N, C, L]``, as ``[N, Lq, Lk]``.

    The product and the softmax are computed in float32 (also for float16 inputs; ``k`` is scaled by
    ``1/sqrt(C)`` in its own dtype first), or in float64 for float64 inputs (a network cast to float64 stays a
    smooth function at float64 round-off); the result is returned in ``q``'s dtype. The backward pass works in
    the same dtype and only keeps the inputs and the weights. Not a module (no state, not pickled).
    """

    @staticmethod
    def forward(ctx, q, k):
        scale = math.sqrt(k.shape[1])
        work = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
        logits = torch.einsum("ncq,nck->nqk", q.to(work), (k / scale).to(work))
        weights = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, weights)
        return weights

    @staticmethod
    def backward(ctx, grad_weights):
        q, k, weights = ctx.saved_tensors
        scale = math.sqrt(k.shape[1])
        work = torch.promote_types(q.dtype, torch.float32)
        g = grad_weights.to(work)
        w = weights.to(work)
        grad_logits = w * (g - (g * w).sum(dim=2, keepdim=True))  # softmax Jacobian-vector product
        grad_q = torch.einsum("nck,nqk->ncq", k.to(work), grad_logits).to(q.dtype) / scale
        grad_k = torch.einsum("ncq,nqk->nck", q.to(work), grad_logits).to(k.dtype) / scale
        return grad_q, grad_k


@_records_init_kwargs
class UNetBlock(nn.Module):
    """Residual U-Net block conditioned on an embedding vector, optionally resampling and with
    self-attention: the union of the DDPM++, NCSN++ and ADM blocks.

    Main path: GroupNorm -> SiLU -> conv0 (3x3, carries the up/down resampling) -> conditioning ->
    dropout -> conv1 (3x3). The conditioning is ``affine(emb)``: with ``adaptive_scale`` it gives a
    (scale, shift) pair and ``h = SiLU(shift + norm1(h) * (1 + scale))``, otherwise a bias added before
    ``norm1``: ``h = SiLU(norm1(h + bias))``. The shortcut ``skip`` is an identity, or a convolution (1x1 when
    ``resample_proj`` or the width changes, a pure resampler otherwise) when the shape changes. The sum is
    multiplied by ``skip_scale``.

    With ``attention``: multi-head self-attention over the pixels (``num_heads`` heads, default
    ``out_channels // channels_per_head``), ``qkv`` a 1x1 conv whose ``3 * C`` output channels are ordered
    per head, then per channel, then (q, k, v); a 1x1 ``proj`` adds the result back, again times
    ``skip_scale``.

    ``init``, ``init_zero`` and ``init_attn`` are keyword dicts for the convolutions / linear layers:
    ``init`` for conv0, affine, skip (and qkv unless ``init_attn`` is given), ``init_zero`` for conv1 and proj.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0,
        skip_scale=1,
        eps=1e-5,
        resample_filter=[1, 1],
        resample_proj=False,
        adaptive_scale=True,
        init=dict(),
        init_zero=dict(init_weight=0),
        init_attn=None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        resampling = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resampling, **init)
        affine_width = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(in_features=emb_channels, out_features=affine_width, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if in_channels != out_channels or up or down:
            shortcut_kernel = 1 if (resample_proj or in_channels != out_channels) else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=shortcut_kernel, **resampling, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def _condition(self, h, emb):
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            return silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        return silu(self.norm1(h + params))

    def _attend(self, x):
        batch, channels = x.shape[:2]
        heads = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(batch * heads, channels // heads, 3, -1)
        q, k, v = qkv.unbind(2)
        weights = AttentionOp.apply(q, k)  # [B*heads, L, L]
        mixed = torch.einsum("nqk,nck->ncq", weights, v)
        return self.proj(mixed.reshape(*x.shape))

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        h = self._condition(h, emb)
        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        shortcut = x if self.skip is None else self.skip(x)
        h = (h + shortcut) * self.skip_scale
        if self.num_heads:
            h = (self._attend(h) + h) * self.skip_scale
        return h


@_records_init_kwargs
class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a 1-D tensor of noise labels: ``[cos(x * w_i), sin(x * w_i)]`` with
    frequencies ``w_i = (1 / max_positions) ** (i / d)``, ``i = 0 .. num_channels/2 - 1`` and
    ``d = num_channels/2`` (``num_channels/2 - 1`` with ``endpoint``, so the last frequency is exactly
    ``1 / max_positions``). Output ``[len(x), num_channels]``, cosines first. No parameters."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(0, half, dtype=torch.float32, device=x.device) / (half - 1 if self.endpoint else half)
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


@_records_init_kwargs
class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise labels: ``[cos(2 pi x f_i), sin(2 pi x f_i)]`` with fixed
    frequencies ``f ~ N(0, scale^2)`` stored as the buffer ``freqs`` (``num_channels // 2`` values)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# --------------------------------------------------------------------------------------------------
# U-Nets. Both take (x, noise_labels, class_labels, augment_labels=None): ``noise_labels`` is the 1-D
# c_noise(sigma) of the preconditioner, ``class_labels`` one-hot rows (or None when label_dim = 0).


def _label_dropout(labels, p, training, batch, device):
    """Classifier-free-guidance training: zero each row's labels with probability ``p`` (training only)."""
    if not (training and p):
        return labels
    keep = (torch.rand([batch, 1], device=device) >= p).to(labels.dtype)
    return labels * keep


def _role(key):
    """'16x16_aux_skip' -> 'aux_skip'; the part of a U-Net ModuleDict key after the resolution."""
    return key.split("_", 1)[1]


@_records_init_kwargs
class SongUNet(nn.Module):
    """The DDPM++ / NCSN++ U-Net of Song et al. (score_sde), as configured in EDM.

    DDPM++: ``embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
    decoder_type='standard', resample_filter=[1,1]``. NCSN++: ``embedding_type='fourier',
    channel_mult_noise=2, encoder_type='residual', decoder_type='standard', resample_filter=[1,3,3,1]``.

    Layout (names of the ``enc`` / ``dec`` ModuleDict entries, ``R`` = resolution at that level):

    * encoder, per level: ``RxR_conv`` (level 0, a 3x3 conv to ``model_channels``) or ``RxR_down`` (a
      downsampling block); with ``encoder_type='skip'`` also ``RxR_aux_down`` (filter-only
      downsampling of the input image) and ``RxR_aux_skip`` (1x1 conv added to the features); with
      ``'residual'`` ``RxR_aux_residual`` (3x3 fused-downsampling conv of the previous level's features,
      averaged in with 1/sqrt(2)); then ``RxR_block0 .. block{num_blocks-1}``, with attention at
      ``attn_resolutions``.
    * decoder, per level from the coarsest: ``RxR_in0`` (with attention) and ``RxR_in1`` at the coarsest
      level, ``RxR_up`` elsewhere; then ``RxR_block0 .. block{num_blocks}``, each concatenating one
      encoder skip, the last with attention at ``attn_resolutions``; the output head ``RxR_aux_norm``,
      ``RxR_aux_conv`` at level 0 (``decoder_type='standard'``) or at every level with ``'skip'``, which
      also upsamples the running output with ``RxR_aux_up`` (filter only).

    The embedding: the noise embedding (its sin/cos halves swapped), plus ``map_label(labels *
    sqrt(label_dim))``, plus ``map_augment(augment_labels)``, through two SiLU-activated linear layers.
    """

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=[1, 2, 2, 2],
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.10,
        label_dropout=0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    ):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = functools.partial(
            UNetBlock,
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Embedding of noise level, class label and augmentation label.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder. `width` is the feature width, `aux_width` that of the auxiliary (image / residual) path.
        self.enc = nn.ModuleDict()
        width = in_channels
        aux_width = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(in_channels=width, out_channels=model_channels, kernel=3, **init)
                width = model_channels
            else:
                self.enc[f"{tag}_down"] = block(in_channels=width, out_channels=width, down=True)
                if encoder_type == "skip":
                    self.enc[f"{tag}_aux_down"] = Conv2d(
                        in_channels=aux_width, out_channels=aux_width, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{tag}_aux_skip"] = Conv2d(in_channels=aux_width, out_channels=width, kernel=1, **init)
                elif encoder_type == "residual":
                    self.enc[f"{tag}_aux_residual"] = Conv2d(
                        in_channels=aux_width,
                        out_channels=width,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    aux_width = width
            for idx in range(num_blocks):
                self.enc[f"{tag}_block{idx}"] = block(
                    in_channels=width, out_channels=model_channels * mult, attention=(res in attn_resolutions)
                )
                width = model_channels * mult
        skip_widths = [m.out_channels for key, m in self.enc.items() if not _role(key).startswith("aux")]

        # Decoder.
        self.dec = nn.ModuleDict()
        coarsest = len(channel_mult) - 1
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == coarsest:
                self.dec[f"{tag}_in0"] = block(in_channels=width, out_channels=width, attention=True)
                self.dec[f"{tag}_in1"] = block(in_channels=width, out_channels=width)
            else:
                self.dec[f"{tag}_up"] = block(in_channels=width, out_channels=width, up=True)
            for idx in range(num_blocks + 1):
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{tag}_block{idx}"] = block(
                    in_channels=width + skip_widths.pop(), out_channels=model_channels * mult, attention=attention
                )
                width = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < coarsest:
                    self.dec[f"{tag}_aux_up"] = Conv2d(
                        in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{tag}_aux_norm"] = GroupNorm(num_channels=width, eps=1e-6)
                self.dec[f"{tag}_aux_conv"] = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        cos_half, sin_half = emb.chunk(2, dim=1)
        emb = torch.cat([sin_half, cos_half], dim=1)  # score_sde's order: sines first
        if self.map_label is not None:
            labels = _label_dropout(class_labels, self.label_dropout, self.training, x.shape[0], x.device)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(x, noise_labels, class_labels, augment_labels)

        skips = []
        aux = x  # the auxiliary path starts from the input image
        for key, module in self.enc.items():
            role = _role(key)
            if role == "aux_down":
                aux = module(aux)
            elif role == "aux_skip":
                x = x + module(aux)
                skips[-1] = x
            elif role == "aux_residual":
                x = (x + module(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = module(x) if role == "conv" else module(x, emb)
                skips.append(x)

        out = None  # running output image (sum of the aux_conv heads)
        head = None
        for key, module in self.dec.items():
            role = _role(key)
            if role == "aux_up":
                out = module(out)
            elif role == "aux_norm":
                head = module(x)
            elif role == "aux_conv":
                head = module(silu(head))
                out = head if out is None else head + out
            else:
                if role.startswith("block"):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


@_records_init_kwargs
class DhariwalUNet(nn.Module):
    """The ADM U-Net of Dhariwal & Nichol (guided-diffusion), as configured in EDM.

    Blocks use adaptive (scale, shift) conditioning, attention heads of 64 channels, unit skip scale and
    filter-only resampling shortcuts. Layout (``R`` = resolution): encoder ``RxR_conv`` (level 0, to
    ``model_channels * channel_mult[0]``) or ``RxR_down``, then ``RxR_block0 .. block{num_blocks-1}``;
    decoder ``RxR_in0`` (attention) / ``RxR_in1`` at the coarsest level or ``RxR_up``, then
    ``RxR_block0 .. block{num_blocks}`` concatenating the encoder skips (attention in all of them at
    ``attn_resolutions``); output ``out_norm``, ``out_conv``. The embedding is ``map_noise`` (+ ``map_augment``)
    through ``map_layer0`` (SiLU) and ``map_layer1``, plus ``map_label(labels)``, then SiLU.
    """

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        dropout=0.10,
        label_dropout=0,
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = functools.partial(
            UNetBlock, emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = (
            Linear(
                in_features=label_dim,
                out_features=emb_channels,
                bias=False,
                init_mode="kaiming_normal",
                init_weight=math.sqrt(label_dim),
            )
            if label_dim
            else None
        )

        self.enc = nn.ModuleDict()
        width = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(in_channels=width, out_channels=model_channels * mult, kernel=3, **init)
                width = model_channels * mult
            else:
                self.enc[f"{tag}_down"] = block(in_channels=width, out_channels=width, down=True)
            for idx in range(num_blocks):
                self.enc[f"{tag}_block{idx}"] = block(
                    in_channels=width, out_channels=model_channels * mult, attention=(res in attn_resolutions)
                )
                width = model_channels * mult
        skip_widths = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        coarsest = len(channel_mult) - 1
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == coarsest:
                self.dec[f"{tag}_in0"] = block(in_channels=width, out_channels=width, attention=True)
                self.dec[f"{tag}_in1"] = block(in_channels=width, out_channels=width)
            else:
                self.dec[f"{tag}_up"] = block(in_channels=width, out_channels=width, up=True)
            for idx in range(num_blocks + 1):
                self.dec[f"{tag}_block{idx}"] = block(
                    in_channels=width + skip_widths.pop(),
                    out_channels=model_channels * mult,
                    attention=(res in attn_resolutions),
                )
                width = model_channels * mult
        self.out_norm = GroupNorm(num_channels=width)
        self.out_conv = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _label_dropout(class_labels, self.label_dropout, self.training, x.shape[0], x.device)
            emb = emb + self.map_label(labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(x, noise_labels, class_labels, augment_labels)
        skips = []
        for key, module in self.enc.items():
            x = module(x) if _role(key) == "conv" else module(x, emb)
            skips.append(x)
        for key, module in self.dec.items():
            if _role(key).startswith("block"):
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


# --------------------------------------------------------------------------------------------------
# Preconditioners: D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

_ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _make_unet(model_type, **kwargs):
    try:
        cls = _ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(_ARCHITECTURES)}") from None
    return cls(**kwargs)


class _Preconditioned(nn.Module):
    """Shared set-up and input handling of the four preconditioners (not an EDM class)."""

    def _add_unet(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, out_channels=None):
        """The attributes every preconditioner has, and its inner U-Net ``self.model``."""
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _make_unet(
            model_type, img_resolution=img_resolution, in_channels=img_channels,
            out_channels=out_channels or img_channels, label_dim=label_dim, **model_kwargs,
        )

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


    def _inputs(self, x, sigma, class_labels, force_fp32):
        """float32 ``x``; ``sigma`` as ``[B or 1, 1, 1, 1]`` float32; labels as float32 ``[B, label_dim]``
        (zeros ``[1, label_dim]`` when not given, ``None`` for unconditional nets); the inner net's dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        return x, sigma, class_labels, (torch.float16 if half else torch.float32)

    def _run(self, inputs, model_kwargs, c_skip, c_out, c_in, c_noise, out_slice=None):
        """``c_skip * x + c_out * F(c_in * x, c_noise)`` for ``inputs`` from :meth:`_inputs`, with F the
        inner U-Net run in the chosen dtype (and only its first ``out_slice`` output channels used)."""
        x, _, class_labels, dtype = inputs
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f"inner network returned {F_x.dtype}, expected {dtype}")
        if out_slice is not None:
            F_x = F_x[:, :out_slice]
        return c_skip * x + c_out * F_x.to(torch.float32)


@_records_init_kwargs
class VPPrecond(_Preconditioned):
    """Variance-preserving preconditioning (Song et al.'s VP SDE, continuous time), EDM's "config A" VP.

    Noise schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` for ``t in [epsilon_t, 1]``;
    ``sigma_min = sigma(epsilon_t)``, ``sigma_max = sigma(1)``, computed in float32 as EDM does (so with the
    defaults ``sigma_min`` is exactly ``2**-10``: ``exp(1e-6) - 1`` rounds to ``2**-20`` in float32; the exact
    value is 0.0010000), ``sigma_max`` = 152.167.
    ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = (M - 1) sigma^{-1}(sigma)``
    (the network predicts the noise). ``round_sigma`` is the identity.
    """

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        beta_d=19.9,
        beta_min=0.1,
        M=1000,
        epsilon_t=1e-5,
        model_type="SongUNet",
        **model_kwargs,
    ):
        super().__init__()
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self._add_unet(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        inputs = self._inputs(x, sigma, class_labels, force_fp32)
        sigma = inputs[1]
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return self._run(inputs, model_kwargs,
                         c_skip=1, c_out=-sigma, c_in=1 / (sigma**2 + 1).sqrt(), c_noise=c_noise)

    def sigma(self, t):
        """Noise level at continuous time ``t``."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Continuous time ``t`` with ``sigma(t) = sigma``."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d



@_records_init_kwargs
class VEPrecond(_Preconditioned):
    """Variance-exploding preconditioning (Song et al.'s VE SDE), EDM's "config A" VE.

    ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``, ``c_noise = ln(sigma / 2)``; supported range
    ``[sigma_min, sigma_max]`` (default 0.02 .. 100). ``round_sigma`` is the identity.
    """

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        sigma_min=0.02,
        sigma_max=100,
        model_type="SongUNet",
        **model_kwargs,
    ):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._add_unet(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        inputs = self._inputs(x, sigma, class_labels, force_fp32)
        sigma = inputs[1]
        return self._run(inputs, model_kwargs,
                         c_skip=1, c_out=sigma, c_in=1, c_noise=(0.5 * sigma).log())



@_records_init_kwargs
class iDDPMPrecond(_Preconditioned):  # noqa: N801 -- EDM's class name
    """Improved-DDPM preconditioning (Nichol & Dhariwal's cosine schedule), for the ADM baselines.

    The network only knows the ``M`` discrete levels ``u_0 > u_1 > ... > u_{M-1}`` (buffer ``u``, ``M + 1``
    float32 values with ``u_M = 0``), built backwards from ``u_M = 0`` by
    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1)``,
    ``abar(j) = sin(pi/2 * j / (M (C_2 + 1)))^2``. ``round_sigma`` snaps to the nearest ``u_j``;
    ``c_noise = M - 1 - j``. ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``. The inner
    network has ``2 * img_channels`` outputs (noise and learned variance); only the noise half is used.
    ``sigma_min = u_{M-1}``, ``sigma_max = u_0``.
    """

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        C_1=0.001,
        C_2=0.008,
        M=1000,
        model_type="DhariwalUNet",
        **model_kwargs,
    ):
        super().__init__()
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self._add_unet(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, out_channels=img_channels * 2)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        inputs = self._inputs(x, sigma, class_labels, force_fp32)
        sigma = inputs[1]
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return self._run(inputs, model_kwargs,
                         c_skip=1, c_out=-sigma, c_in=1 / (sigma**2 + 1).sqrt(), c_noise=c_noise,
                         out_slice=self.img_channels)

    def alpha_bar(self, j):
        """The cosine schedule's alpha-bar at discrete step ``j`` (float32)."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Nearest level of ``u`` (or its index ``j`` with ``return_index``), same shape as ``sigma``.

        The distance is torch's ``cdist`` in float32, as EDM computes it, so that near-ties resolve the
        same way as in EDM's sampler."""
        sigma = torch.as_tensor(sigma)
        query = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(query, self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@_records_init_kwargs
class EDMPrecond(_Preconditioned):
    """EDM's own preconditioning (Karras et al. 2022, Table 1), ``sigma_data`` the data's standard deviation:

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``. ``round_sigma`` is the identity;
    ``sigma_min`` / ``sigma_max`` default to 0 / inf (EDM's snapshots keep these defaults; its sampler
    clamps its grid to them).
    """

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        sigma_min=0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        model_type="DhariwalUNet",
        **model_kwargs,
    ):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._add_unet(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        inputs = self._inputs(x, sigma, class_labels, force_fp32)
        sigma = inputs[1]
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return self._run(inputs, model_kwargs,
                         c_skip=c_skip, c_out=c_out, c_in=c_in, c_noise=c_noise)



#: Every class that appears by name in EDM's pickles (module ``training.networks``) -> our class.
#: ``AttentionOp`` and ``weight_init`` are not persistent and never appear in a snapshot.
EDM_CLASSES = {
    cls.__name__: cls
    for cls in (
        Linear,
        Conv2d,
        GroupNorm,
        UNetBlock,
        PositionalEmbedding,
        FourierEmbedding,
        SongUNet,
        DhariwalUNet,
        VPPrecond,
        VEPrecond,
        iDDPMPrecond,
        EDMPrecond,
    )
}
