"""Speed options for the network inside a denoiser: precision, memory layout, compilation, batch size.

Only the network call changes. Solver states stay float64 and every solver, BDIA's combination and its exact
inverse included, runs on them as before; a reduced-precision network is just another (less accurate)
denoiser, so a BDIA state pair is still recovered exactly from its successor (:func:`bdia.invert` undoes the
same float64 arithmetic), while the images move away from the float32 ones by the network's rounding.

* ``precision``: ``float32`` (default, what the networks were trained in), ``tf32`` (CUDA: float32 storage,
  TensorFloat-32 matrix products and convolutions; on a CPU it is float32), ``bf16`` / ``fp16``
  (:func:`torch.autocast` around the network only).
* ``channels_last``: NHWC inputs and weights for convolution networks (no change to the numbers' meaning; the
  kernels, and so float32's low bits, may differ).
* ``compile``: :func:`torch.compile` of the network with this mode (``default``, ``reduce-overhead``,
  ``max-autotune``, ``max-autotune-no-cudagraphs``), ``None`` for eager.
* :func:`auto_batch_size`: the largest batch whose network call fits in free memory.

Bit-identity: with float32 eager networks an image is the same for any batch size and process count
(:class:`bdia.denoisers.FixedBatchDenoiser` fixes the rows per call). Autocast and channels_last keep that
property for a fixed setting (each shape runs one fixed kernel sequence); compiled kernels are generated per
machine and may fuse differently, so compiled runs are reproducible on one machine and setting only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import torch

from .denoisers import DenoiserWrapper
from .networks.edm import _Preconditioned

__all__ = ["PRECISIONS", "COMPILE_MODES", "SpeedOptions", "NetworkSpeed", "with_speed", "auto_batch_size", "MAX_AUTO_BATCH"]

PRECISIONS = ("float32", "tf32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: ``batch_size="auto"`` never picks more than this many images per batch.
MAX_AUTO_BATCH = 4096


@dataclass(frozen=True)
class SpeedOptions:
    """How the network runs. The default changes nothing: float32, contiguous NCHW, eager."""

    precision: str = "float32"
    channels_last: bool = False
    compile: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {self.channels_last!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be null or one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    @property
    def is_default(self) -> bool:
        return self == SpeedOptions()

    def as_dict(self) -> dict:
        return asdict(self)


class NetworkSpeed(DenoiserWrapper):
    """Runs ``denoiser`` under :class:`SpeedOptions`; returns the input's dtype and a contiguous NCHW tensor.

    Autocast only lowers the precision of float32 operations (matrix products, convolutions); float64 solver
    arithmetic outside the network is untouched. In EDM's preconditioned networks the inner U-Net's output is
    handed back in float32 (a forward hook added once to the U-Net, inert outside autocast), so the
    preconditioning ``c_skip * x + c_out * F`` stays float32, as with EDM's own ``use_fp16``. ``channels_last``
    converts the wrapped module's weights once (in place) and each 4-D input per call.
    """

    def __init__(self, denoiser, options: SpeedOptions = SpeedOptions()):
        super().__init__(denoiser)
        self.options = options
        if options.channels_last and isinstance(denoiser, torch.nn.Module):
            denoiser.to(memory_format=torch.channels_last)
        if options.precision in _AUTOCAST_DTYPES:
            _hook_edm_unets(denoiser)
        # Kept outside the module tree: the compiled wrapper shares the parameters and must not duplicate them
        # in state_dict().
        self.__dict__["_call"] = torch.compile(denoiser, mode=options.compile, dynamic=False) if options.compile else denoiser

    def _context(self, device: torch.device):
        precision = self.options.precision
        if precision in _AUTOCAST_DTYPES:
            return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
        if precision == "tf32" and device.type == "cuda":
            return _tf32()
        return contextlib.nullcontext()

    def forward(self, x, sigma, class_labels=None, **cond):
        inputs = x.contiguous(memory_format=torch.channels_last) if self.options.channels_last and x.ndim == 4 else x
        with self._context(x.device):
            denoised = self._call(inputs, sigma, class_labels, **cond)
        return denoised.to(x.dtype).contiguous()


def _unet_output_in_input_dtype(module, args, output):
    """Forward hook on an EDM preconditioner's inner U-Net: under autocast a U-Net given float32 returns
    bfloat16 / float16, which the preconditioner refuses (it checks that its U-Net returns the dtype it was
    given). Hand it back in the input's dtype; outside autocast the output is returned unchanged."""
    x = args[0] if args else None
    if (isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and output.dtype != x.dtype
            and x.dtype == torch.float32 and torch.is_autocast_enabled(output.device.type)):
        return output.to(x.dtype)
    return output


def _hook_edm_unets(denoiser) -> None:
    """Add :func:`_unet_output_in_input_dtype` (once) to the inner U-Net of every EDM preconditioner in
    ``denoiser``, so that autocast runs the U-Net in reduced precision and the preconditioning
    (``c_skip * x + c_out * F``) in float32, as EDM's own ``use_fp16`` does."""
    if not isinstance(denoiser, torch.nn.Module):
        return
    for module in denoiser.modules():
        unet = getattr(module, "model", None)
        if (isinstance(module, _Preconditioned) and isinstance(unet, torch.nn.Module)
                and _unet_output_in_input_dtype not in unet._forward_hooks.values()):
            unet.register_forward_hook(_unet_output_in_input_dtype)


@contextlib.contextmanager
def _tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def with_speed(denoiser, precision: str = "float32", channels_last: bool = False, compile: str | None = None):
    """``denoiser`` wrapped in :class:`NetworkSpeed`, or ``denoiser`` itself for the default options."""
    options = SpeedOptions(precision, channels_last, compile)
    return denoiser if options.is_default else NetworkSpeed(denoiser, options)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _activation_bytes(denoiser, x, sigma, class_labels, cond) -> int:
    """Sum of the bytes of every module output in one call: an upper bound on the call's transient memory
    (outputs are freed as the call goes on; without autograd nothing else is kept)."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    modules = list(denoiser.modules()) if isinstance(denoiser, torch.nn.Module) else []
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        denoiser(x, sigma, class_labels, **cond)
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def auto_batch_size(denoiser, image_shape, device, limit: int = MAX_AUTO_BATCH, label_dim: int = 0,
                    memory_fraction: float = 0.8, probe_rows: int = 2, cond=None) -> int:
    """The largest power of two ``<= limit`` images whose network call fits in ``memory_fraction`` of the
    device's free memory.

    Per-image memory is measured on a probe call of ``probe_rows`` rows: on CUDA the allocator's peak, on a CPU
    the summed size of all module outputs (an upper bound). Free memory is CUDA's ``mem_get_info`` or the
    host's ``MemAvailable``. ``cond``: conditioning tensors of one row (e.g. a prompt embedding), repeated to
    the probe's rows. Returns at least 1.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"auto batch size: limit must be a positive integer, got {limit!r}")
    device = torch.device(device)
    x = torch.zeros(probe_rows, *image_shape, dtype=torch.float64, device=device)
    sigma = torch.ones(probe_rows, dtype=torch.float64, device=device)
    labels = torch.zeros(probe_rows, label_dim, device=device) if label_dim else None
    if label_dim:
        labels[:, 0] = 1
    cond = {k: v.expand(probe_rows, *v.shape[1:]) for k, v in (cond or {}).items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        denoiser(x, sigma, labels, **cond)
        torch.cuda.synchronize(device)
        per_row = (torch.cuda.max_memory_allocated(device) - base) / probe_rows
    else:
        per_row = _activation_bytes(denoiser, x, sigma, labels, cond) / probe_rows
    per_row = max(per_row, 1.0)
    fits = int(_free_bytes(device) * memory_fraction / per_row)
    batch = 1
    while batch * 2 <= min(fits, limit):
        batch *= 2
    return batch
