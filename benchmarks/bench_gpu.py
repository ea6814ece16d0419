"""GPU benchmark: the network speed options of :mod:`bdia.speed` x the solvers x batch sizes, on EDM's architectures.

    python benchmarks/bench_gpu.py            # one CUDA GPU: about 4-5 min on an H200 -> results/bench/gpu.{md,json}
    python benchmarks/bench_gpu.py --compile --time-limit 600   # also bf16 + torch.compile (compiles per shape)
    python benchmarks/bench_gpu.py --tiny --out /tmp/bench      # tiny networks on the CPU, ~30 s: a smoke test

``results/bench/gpu.md`` and ``gpu.json`` are not in the repository yet: they await a run on a GPU machine. Without
CUDA the script says in one line that it needs a GPU and suggests ``--tiny``.

Networks
--------
Built from our own code (:mod:`bdia.networks.edm`) on the device, with the constructor arguments of two published
snapshots: the registry (:mod:`bdia.networks.registry`) gives resolution, channels, classes, preconditioner and
architecture, EDM's ``train.py`` the rest for that architecture (``tests/test_edm_networks.py`` checks these
against the published parameter counts):

* ``edm-cifar10-32x32-uncond-vp``: EDMPrecond + DDPM++ (SongUNet), 32x32, unconditional, 55,733,891 parameters;
* ``edm-imagenet-64x64-cond-adm``: EDMPrecond + ADM (DhariwalUNet), 64x64, 1000 classes, 295,899,267 parameters.

Random weights (``--seed``): EDM's initialisation, then every weight matrix and kernel redrawn from N(0, 1/fan_in),
because EDM zero-initialises ADM's output layer (and DDPM++'s to 1e-5), which makes a fresh network's output 0 and
every precision agree exactly. ``use_fp16`` is False (EDM's own float16 path is not used): precision is set by the
options only. Timing does not depend on the weights' values; the differences below do, so they are indicative.

Options and solvers
-------------------
Options (``bdia.speed.with_speed``): ``float32`` (the reference), ``tf32``, ``bf16``, ``fp16``,
``bf16+channels_last`` and, with ``--compile``, ``bf16+compile`` (``torch.compile`` mode ``default``). An option or
cell that fails (an unsupported op, out of memory, a non-finite state) is recorded as skipped with the reason.

float32 is *strict* float32 here: the script turns TF32 off for cuDNN convolutions and matrix products. PyTorch's
default lets cuDNN convolutions use TF32, so an ordinary ``precision="float32"`` run on an Ampere-or-later GPU
computes its convolutions in TF32 (the ``tf32`` row is the nearer reference for it). ``cudnn.benchmark`` is on.

Solvers: ``edm`` (Heun), ``bdia_edm`` (gamma 0.5) and ``bdia_ddim`` (gamma 1), at equal NFE: a Karras grid of N
levels for the EDM-type solvers (NFE 2N - 1) and of 2N - 1 levels for BDIA-DDIM (one evaluation per step). NFE is
counted (``bdia.denoisers.CountingDenoiser``).

Two passes
----------
1. Accuracy: each option and solver once on ``--accuracy-batch`` 16 images at EDM's CIFAR-10 grid (N = 18, NFE 35),
   against float32 with the same noise and labels: max |difference| of the final float64 states and of EDM's uint8
   quantisation ``(x * 127.5 + 128).clip(0, 255)``, and the fraction of uint8 values that differ.
2. Timing, per (network, option, batch size): one warm-up sampling run, then ``--repeats`` 3 timed runs of each
   solver (interleaved ABC ABC ABC), CUDA events (``time.perf_counter`` on a CPU); median time, images/s, images/s
   extrapolated to the checkpoint's recommended NFE (35 for CIFAR-10, 511 for ImageNet: throughput is linear in
   NFE, the solver's float64 arithmetic being small beside the network), achieved TFLOPS (FLOPs counted by
   ``torch.utils.flop_counter``) and peak memory (``torch.cuda.max_memory_allocated`` during a run: weights, the
   stored images and the activations). gpu.json also has each timing run's differences against float32 and
   float32's last repeat against its first (run-to-run reproducibility; 0 = deterministic).

Timing grid, and why: N = 3 (NFE 5), for the time budget. The timing pass costs options x batch sizes x (1 + 3
solvers x 3 repeats) runs x NFE x (batch x time of one image-NFE). One image-NFE is ~42 GFLOP for DDPM++ and ~219
GFLOP for ADM; strict float32 on an H200 (~67 TFLOPS without tensor cores) is then ~1 ms and ~5 ms, the other
options ~0.2-1.5 ms. Estimate for the defaults: DDPM++ ~80 s, ADM ~130 s, the accuracy pass ~25 s, set-up ~20 s.
EDM's 18-step grid in every timing cell would take over half an hour. The short grid also exaggerates the
differences (its last Heun step reaches sigma_min = 0.002 from far above, and the denoiser's error enters that
step's slope divided by sigma_min), which is why the accuracy pass has its own grid.

Batch sizes: DDPM++ 64, 256 and ``bdia.speed.auto_batch_size``'s pick for the float32 network capped at 512; ADM
(5x the cost per image) 16, 64 and the pick capped at 256. ``--batch-sizes``, ``--max-batch``, ``--options``,
``--num-steps``, ``--accuracy-steps`` change the plan (e.g. ``--num-steps 18 --batch-sizes 64 --options float32,bf16``).

Time guard: the timing cells run smallest batch first (networks and options interleaved); a cell whose estimated
time (from the same network and option at the previous batch size) would end past ``--time-limit`` (270 s after
the start) is skipped with that reason, so an overrun loses the largest batches first.

Runs with only PyTorch and the standard library plus this source tree: it puts the repository root on ``sys.path``
itself and imports only ``bdia``'s core modules.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bdia.denoisers import CountingDenoiser  # noqa: E402
from bdia.networks.edm import EDM_CLASSES  # noqa: E402
from bdia.networks.registry import get_checkpoint  # noqa: E402
from bdia.schedules import karras_sigmas  # noqa: E402
from bdia.solvers import DEFAULT_GAMMA, sample  # noqa: E402
from bdia.speed import MAX_AUTO_BATCH, auto_batch_size, with_speed  # noqa: E402

COMMAND = "python benchmarks/bench_gpu.py"
EXPECTED_RUNTIME = "about 4-5 minutes on one H200; no timing cell starts that would end past --time-limit, 270 s"
DEFAULT_OUT = REPO_ROOT / "results" / "bench"
SOLVERS = ("edm", "bdia_edm", "bdia_ddim")


@dataclass(frozen=True)
class Option:
    name: str
    precision: str = "float32"
    channels_last: bool = False
    compile: str | None = None

    def speed_kwargs(self) -> dict:
        return dict(precision=self.precision, channels_last=self.channels_last, compile=self.compile)


OPTIONS = (
    Option("float32"),
    Option("tf32", "tf32"),
    Option("bf16", "bf16"),
    Option("fp16", "fp16"),
    Option("bf16+channels_last", "bf16", channels_last=True),
    Option("bf16+compile", "bf16", compile="default"),
)
COMPILE_OPTIONS = {o.name for o in OPTIONS if o.compile}
OPTION_NAMES = tuple(o.name for o in OPTIONS)


# --------------------------------------------------------------------------------------------------
# Networks.

#: EDM train.py's arguments per ``--arch`` (those the registry does not record). CIFAR-10 trains with
#: augmentation (augment_dim 9) and dropout 0.13; ImageNet without augmentation, dropout 0.10.
_ARCH_KWARGS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                   num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                attn_resolutions=[32, 16, 8], dropout=0.10),
}
#: Tiny versions of the same two architectures (8x8 images, two levels, attention at 4x4).
_TINY_ARCH_KWARGS = {
    "ddpmpp": dict(_ARCH_KWARGS["ddpmpp"], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "adm": dict(_ARCH_KWARGS["adm"], model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
}


@dataclass
class NetSpec:
    key: str  # "cifar10-ddpmpp" / "imagenet-adm"
    checkpoint: str  # registry name whose architecture this is
    batches: tuple  # fixed batch sizes
    max_batch: int  # cap of the auto pick
    tiny: bool = False
    # filled in by build():
    class_name: str = ""
    kwargs: dict = field(default_factory=dict)
    resolution: int = 0
    channels: int = 0
    label_dim: int = 0
    recommended_nfe: int = 0


def net_specs(tiny: bool) -> list[NetSpec]:
    if tiny:
        return [NetSpec("cifar10-ddpmpp", "edm-cifar10-32x32-uncond-vp", (1, 2), 4, tiny=True),
                NetSpec("imagenet-adm", "edm-imagenet-64x64-cond-adm", (1, 2), 4, tiny=True)]
    return [NetSpec("cifar10-ddpmpp", "edm-cifar10-32x32-uncond-vp", (64, 256), 512),
            NetSpec("imagenet-adm", "edm-imagenet-64x64-cond-adm", (16, 64), 256)]


def resolve_spec(spec: NetSpec) -> None:
    """Constructor arguments from the registry entry (plus EDM train.py's per-architecture arguments)."""
    ckpt = get_checkpoint(spec.checkpoint)
    arch = (_TINY_ARCH_KWARGS if spec.tiny else _ARCH_KWARGS)[ckpt.architecture]
    spec.class_name = ckpt.preconditioner
    spec.resolution = 8 if spec.tiny else ckpt.resolution
    spec.channels = ckpt.channels
    spec.label_dim = ckpt.label_dim
    spec.recommended_nfe = ckpt.nfe
    spec.kwargs = dict(img_resolution=spec.resolution, img_channels=ckpt.channels, label_dim=ckpt.label_dim,
                       use_fp16=False, **copy.deepcopy(arch))


def build_network(spec: NetSpec, device: torch.device, seed: int) -> torch.nn.Module:
    """The network on ``device`` with EDM's initialisation, then every weight matrix / kernel redrawn from
    N(0, 1/fan_in): EDM zero-initialises ADM's output layer and the second convolution of each block (and DDPM++'s
    to 1e-5), so a freshly built network's output is (nearly) 0 and every precision option would agree exactly."""
    torch.manual_seed(seed)
    with torch.device(device):
        net = EDM_CLASSES[spec.class_name](**spec.kwargs)
    net = net.to(device).eval().requires_grad_(False)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                draw = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)
                p.copy_(draw / math.sqrt(p[0].numel()))
    return net


def count_flops(spec: NetSpec) -> tuple[float | None, str | None]:
    """(FLOPs of one network call on one image, None) by torch's FlopCounterMode on a shapes-only build, or
    (None, the reason it could not be counted): an informative extra, never a reason to stop."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            net = EDM_CLASSES[spec.class_name](**spec.kwargs).eval()
            x = torch.zeros(1, spec.channels, spec.resolution, spec.resolution)
            labels = torch.zeros(1, spec.label_dim) if spec.label_dim else None
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                net(x, torch.ones(1), labels)
        return float(counter.get_total_flops()), None
    except Exception as e:
        return None, one_line(e)


# --------------------------------------------------------------------------------------------------
# Helpers.


_OOM_ERRORS = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                    if t)


class UsageError(Exception):
    """A mistake in the command line or the environment: one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if not isinstance(exc, UsageError) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quantize(x: torch.Tensor) -> torch.Tensor:
    """EDM's uint8 quantisation of [-1, 1] images (as ``bdia.imageio.quantize``)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def differences(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max |out - ref| of the float states and of their uint8 quantisations, the fraction of uint8 values that
    differ, and the fraction of the reference's values inside [-1, 1] (the rest saturate in uint8)."""
    q_out, q_ref = quantize(out).to(torch.int16), quantize(ref).to(torch.int16)
    return dict(
        max_abs_diff_float=float((out - ref).abs().max()),
        max_abs_diff_uint8=int((q_out - q_ref).abs().max()),
        frac_uint8_pixels_differing=float((q_out != q_ref).double().mean()),
        reference_frac_pixels_in_range=float((ref.abs() <= 1).double().mean()),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(fn, device: torch.device):
    """(result, milliseconds, peak bytes or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, float(start.elapsed_time(end)), int(torch.cuda.max_memory_allocated(device))
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3, None


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine_info(device: torch.device) -> dict:
    info = dict(
        device=str(device),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count,
                    gpu_count=torch.cuda.device_count())
    else:
        info.update(gpu=None)
    return info


def parse_batch_sizes(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "auto":
            out.append("auto")
            continue
        try:
            value = int(part)
        except ValueError:
            raise UsageError(f"--batch-sizes: {part!r} is neither a positive integer nor 'auto'") from None
        if not 1 <= value <= MAX_AUTO_BATCH:
            raise UsageError(f"--batch-sizes: {value} is not in 1..{MAX_AUTO_BATCH}")
        out.append(value)
    if not out:
        raise UsageError("--batch-sizes is empty")
    return out


def parse_options(text: str, with_compile: bool) -> list[Option]:
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
    else:
        names = [n for n in OPTION_NAMES if n not in COMPILE_OPTIONS or with_compile]
    unknown = [n for n in names if n not in OPTION_NAMES]
    if unknown:
        raise UsageError(f"--options: unknown option {unknown[0]!r}; known: {', '.join(OPTION_NAMES)}")
    if "float32" not in names:
        names.insert(0, "float32")  # the reference of every difference
    return [o for o in OPTIONS if o.name in names]


def resolve_device(args) -> torch.device:
    if args.device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if args.tiny:
            return torch.device("cpu")
        raise UsageError("this benchmark needs a CUDA GPU and none is available "
                         f"(torch {torch.__version__}); run `{COMMAND} --tiny --out DIR` for a quick CPU check")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {args.device!r} is not a device ({one_line(e)})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use --tiny --device cpu "
                             "for a CPU check")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif not args.tiny:
        raise UsageError(f"--device {args.device}: the full benchmark needs a CUDA GPU; use --tiny for a quick "
                         "check on another device")
    else:
        try:
            torch.zeros(1, device=device)
        except Exception as e:
            raise UsageError(f"--device {args.device} is not usable here ({one_line(e)})") from None
    return device


def prepare_out(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".bench_gpu_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or one_line(e)})") from None
    return path


# --------------------------------------------------------------------------------------------------
# The benchmark.


_NO_REFERENCE = dict(max_abs_diff_float=None, max_abs_diff_uint8=None, frac_uint8_pixels_differing=None,
                     reference_frac_pixels_in_range=None, reason="no float32 reference (float32 was skipped)")


class Benchmark:
    def __init__(self, args, device: torch.device, options: list[Option]):
        self.args = args
        self.device = device
        self.options = options
        self.start = time.monotonic()
        self.deadline = self.start + args.time_limit if args.time_limit > 0 else math.inf
        self.rows: list[dict] = []
        self.accuracy: list[dict] = []
        self.networks: dict[str, dict] = {}
        self.option_errors: dict[tuple, str] = {}
        self.log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    # -- set-up of one network: weights, grid, noise, batch sizes, wrapped denoisers -------------------------

    def setup_network(self, spec: NetSpec) -> dict:
        args, device = self.args, self.device
        resolve_spec(spec)
        t0 = time.monotonic()
        net = build_network(spec, device, args.seed)
        build_s = time.monotonic() - t0
        shape = (spec.channels, spec.resolution, spec.resolution)
        flops, flops_error = count_flops(spec)
        auto_uncapped = auto_batch_size(net, shape, device, limit=MAX_AUTO_BATCH, label_dim=spec.label_dim)
        max_batch = args.max_batch or spec.max_batch
        auto = min(auto_uncapped, max_batch)
        fixed = [b for b in (args.batch_sizes or list(spec.batches) + ["auto"])]
        batches = sorted({auto if b == "auto" else b for b in fixed})
        sigma_min, sigma_max = max(0.002, float(net.sigma_min)), min(80.0, float(net.sigma_max))
        n = args.num_steps

        def solver_grids(n):  # equal NFE: Heun's 2n - 1 evaluations, one per step for BDIA-DDIM
            edm_grid = karras_sigmas(n, sigma_min, sigma_max, round_sigma=net.round_sigma)
            ddim_grid = karras_sigmas(2 * n - 1, sigma_min, sigma_max, round_sigma=net.round_sigma)
            return {"edm": edm_grid, "bdia_edm": edm_grid, "bdia_ddim": ddim_grid}

        grids = solver_grids(n)
        accuracy_grids = solver_grids(args.accuracy_steps) if args.accuracy_steps else {}
        rows = max(batches + [args.accuracy_batch])
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        noise = torch.randn(rows, *shape, dtype=torch.float64, device=device, generator=gen)
        labels = None
        if spec.label_dim:
            classes = torch.randint(spec.label_dim, (rows,), device=device, generator=gen)
            labels = torch.nn.functional.one_hot(classes, spec.label_dim).to(torch.float32)
        info = dict(
            checkpoint=spec.checkpoint, preconditioner=spec.class_name, architecture=spec.kwargs["model_type"],
            constructor_kwargs=spec.kwargs, parameters=sum(p.numel() for p in net.parameters()),
            flops_per_image_nfe=flops, flops_error=flops_error, build_s=round(build_s, 3), image_shape=list(shape),
            label_dim=spec.label_dim, batch_sizes=batches, auto_batch=auto, auto_batch_uncapped=auto_uncapped,
            auto_batch_cap=max_batch, sigma_min=sigma_min, sigma_max=sigma_max,
            grids={k: [float(s) for s in v] for k, v in grids.items()},
            accuracy_grids={k: [float(s) for s in v] for k, v in accuracy_grids.items()},
            recommended_nfe=spec.recommended_nfe,
            tiny=spec.tiny,
        )
        self.networks[spec.key] = info
        self.log(f"[{spec.key}] {spec.class_name}/{info['architecture']} {info['parameters']:,} parameters, "
                 f"batches {batches} (auto {auto_uncapped} capped at {max_batch}), built in {build_s:.1f} s")
        return dict(spec=spec, net=net, grids=grids, accuracy_grids=accuracy_grids, noise=noise, labels=labels,
                    batches=batches, wrapped={}, reference={}, per_image_ms={}, last_warmup_s={})

    def wrapped(self, state: dict, option: Option):
        key = option.name
        if key not in state["wrapped"]:
            net = state["net"]
            if option.channels_last:
                net = copy.deepcopy(net)  # channels_last converts the weights in place
            state["wrapped"][key] = CountingDenoiser(with_speed(net, **option.speed_kwargs()))
        return state["wrapped"][key]

    # -- one cell: (network, option, batch) x solvers -------------------------------------------------------

    def base_row(self, spec: NetSpec, option: Option, batch: int, solver: str) -> dict:
        return dict(network=spec.key, option=option.name, precision=option.precision,
                    channels_last=option.channels_last, compile=option.compile, batch=batch,
                    auto_batch=batch == self.networks[spec.key]["auto_batch"], solver=solver,
                    gamma=DEFAULT_GAMMA.get(solver), status="skipped", reason=None)

    def skip_cell(self, spec, option, batch, reason):
        for solver in SOLVERS:
            self.rows.append(dict(self.base_row(spec, option, batch, solver), reason=reason))
        self.log(f"  skip {spec.key} {option.name} batch {batch}: {reason}")

    def run_cell(self, state: dict, option: Option, batch: int) -> None:
        spec, device, args = state["spec"], self.device, self.args
        key = (spec.key, option.name)
        if key in self.option_errors:
            return self.skip_cell(spec, option, batch, self.option_errors[key])
        now = time.monotonic()
        if now >= self.deadline:
            return self.skip_cell(spec, option, batch, f"time limit ({args.time_limit:g} s) reached")
        if key in state["per_image_ms"]:
            runs = 1 + args.repeats * len(SOLVERS)
            estimate = state["per_image_ms"][key] * batch * runs / 1e3 + state["last_warmup_s"].get(key, 0.0)
            if now + estimate > self.deadline:
                reason = (f"time limit ({args.time_limit:g} s): estimated {estimate:.0f} s, "
                          f"{max(self.deadline - now, 0):.0f} s left")
                return self.skip_cell(spec, option, batch, reason)
        x = state["noise"][:batch]
        labels = None if state["labels"] is None else state["labels"][:batch]
        try:
            den = self.wrapped(state, option)
            t0 = time.monotonic()
            grid = state["grids"]["edm"]
            sample(den, x * grid[0], grid, solver="edm", class_labels=labels)  # warm-up (cuDNN autotune, compile)
            synchronize(device)
            warmup_s = time.monotonic() - t0
        except Exception as e:
            reason = f"failed in warm-up: {one_line(e)}"
            if not isinstance(e, _OOM_ERRORS):  # out of memory: a smaller batch may still fit, so not per option
                self.option_errors[key] = reason
            free_memory(device)
            return self.skip_cell(spec, option, batch, reason)
        state["last_warmup_s"][key] = warmup_s if option.compile else 0.0

        times = {s: [] for s in SOLVERS}
        peaks = {s: [] for s in SOLVERS}
        nfes, first, last, failed = {}, {}, {}, {}
        for rep in range(args.repeats):
            for solver in SOLVERS:
                if solver in failed:
                    continue
                grid = state["grids"][solver]
                den.reset()

                def run(grid=grid, solver=solver):
                    return sample(den, x * grid[0], grid, solver=solver, class_labels=labels)

                try:
                    out, ms, peak = timed_run(run, device)
                except Exception as e:
                    failed[solver] = one_line(e)
                    free_memory(device)
                    continue
                times[solver].append(ms)
                peaks[solver].append(peak)
                nfes[solver] = den.nfe
                if rep == 0:
                    first[solver] = out
                last[solver] = out
        flops = self.networks[spec.key]["flops_per_image_nfe"]
        per_image = []
        for solver in SOLVERS:
            row = self.base_row(spec, option, batch, solver)
            if solver in failed:
                row.update(reason=f"failed: {failed[solver]}", repeats=len(times[solver]))
                self.rows.append(row)
                continue
            median_ms = statistics.median(times[solver])
            nfe = nfes[solver]
            out = last[solver]
            ref_key = (batch, solver)
            if option.name == "float32":
                state["reference"][ref_key] = first[solver]
            ref = state["reference"].get(ref_key)
            row.update(
                status="ok", repeats=len(times[solver]), nfe=nfe, times_ms=[round(t, 4) for t in times[solver]],
                median_ms=median_ms, ms_per_nfe=median_ms / nfe, images_per_s=batch / (median_ms / 1e3),
                images_per_s_at_recommended_nfe=batch / (median_ms / 1e3 * spec.recommended_nfe / nfe),
                recommended_nfe=spec.recommended_nfe,
                tflops=(flops * batch * nfe / (median_ms / 1e3) / 1e12) if flops else None,
                peak_memory_bytes=max(peaks[solver]) if peaks[solver][0] is not None else None,
                warmup_s=warmup_s,
                rerun_max_abs_diff_float=float((out - first[solver]).abs().max()),
                **(_NO_REFERENCE if ref is None else differences(out, ref)),
            )
            per_image.append(median_ms / batch)
            self.rows.append(row)
            self.log(f"  {spec.key:15s} {option.name:19s} b={batch:<5d} {solver:9s} {median_ms:9.2f} ms "
                     f"{row['images_per_s']:9.1f} img/s  diff {row['max_abs_diff_float']}")
        if per_image:
            state["per_image_ms"][key] = max(per_image)
        del first, last
        free_memory(device)

    def run_accuracy(self, state: dict) -> None:
        """Each option and solver once on ``--accuracy-batch`` images at the ``--accuracy-steps`` grid, against
        float32 with the same noise and labels. A separate pass because the short timing grid exaggerates the
        differences: its last Heun step ends at sigma_min = 0.002 from a level far above it, and the denoiser's
        error enters that step's second slope divided by sigma_min."""
        spec, device, args = state["spec"], self.device, self.args
        batch = args.accuracy_batch
        x = state["noise"][:batch]
        labels = None if state["labels"] is None else state["labels"][:batch]
        reference = {}
        for option in self.options:
            for solver in SOLVERS:
                grid = state["accuracy_grids"][solver]
                row = dict(network=spec.key, option=option.name, solver=solver, batch=batch,
                           num_steps=len(grid) - 1, status="skipped", reason=None)
                if time.monotonic() >= self.deadline:
                    self.accuracy.append(dict(row, reason=f"time limit ({args.time_limit:g} s) reached"))
                    continue
                try:
                    den = self.wrapped(state, option)
                    den.reset()
                    t0 = time.monotonic()
                    out = sample(den, x * grid[0], grid, solver=solver, class_labels=labels)
                    synchronize(device)
                except Exception as e:
                    free_memory(device)
                    self.accuracy.append(dict(row, reason=f"failed: {one_line(e)}"))
                    self.log(f"  accuracy {spec.key} {option.name} {solver}: failed: {one_line(e)}")
                    continue
                if option.name == "float32":
                    reference[solver] = out
                ref = reference.get(solver)
                row.update(status="ok", nfe=den.nfe, wall_s=time.monotonic() - t0,
                           **(_NO_REFERENCE if ref is None else differences(out, ref)))
                self.accuracy.append(row)
                self.log(f"  accuracy {spec.key:15s} {option.name:19s} {solver:9s} NFE {den.nfe}: max abs diff "
                         f"{row['max_abs_diff_float']}")
        free_memory(device)

    def run(self) -> None:
        args = self.args
        states = []
        for spec in net_specs(args.tiny):
            states.append(self.setup_network(spec))
        if args.accuracy_steps:
            for state in states:
                self.run_accuracy(state)
        depth = max(len(s["batches"]) for s in states)
        for i in range(depth):  # smallest batches first, so a time-limit overrun loses the largest
            for state in states:
                if i >= len(state["batches"]):
                    continue
                for option in self.options:
                    self.run_cell(state, option, state["batches"][i])
        self.wall_s = time.monotonic() - self.start


# --------------------------------------------------------------------------------------------------
# Output.


def _fmt(value, spec=".3g", none="-"):
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def render_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = ["# GPU benchmark: network speed options x BDIA solvers x batch sizes", ""]
    if s["tiny"]:
        lines += ["**Tiny mode** (`--tiny`): tiny networks of the two architectures, a smoke test of the script; the "
                  "numbers say nothing about GPU speed. `results/bench/gpu.md` and `gpu.json` await a run of "
                  f"`{COMMAND}` on a GPU.", ""]
    nfe = ", ".join(f"{k} {v}" for k, v in s["nfe"].items())
    lines += [
        f"Run it: `{COMMAND}` on one CUDA GPU ({EXPECTED_RUNTIME}); `--compile` adds bf16 + torch.compile (minutes "
        "more); `--tiny --out DIR` is a CPU smoke test. The docstring of `benchmarks/bench_gpu.py` explains every "
        "column and the choice of grids and batch sizes.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: **{m.get('gpu') or 'no GPU'}**"
        + (f" (compute capability {m['gpu_capability']}, {m['gpu_memory_gib']} GiB)" if m.get("gpu") else "")
        + f", device `{m['device']}`; torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}; "
        f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads. Started {result['started']}, took "
        f"{result['wall_s']:.0f} s.",
        "",
        f"Settings: timing grid --num-steps {s['num_steps']} (NFE {nfe}), {s['repeats']} timed repeats per solver "
        f"(median) after 1 warm-up run per cell; accuracy grid --accuracy-steps {s['accuracy_steps']} on "
        f"{s['accuracy_batch']} images; gamma bdia_edm {s['gamma']['bdia_edm']}, bdia_ddim "
        f"{s['gamma']['bdia_ddim']}; seed {s['seed']}; "
        + ("float32 = strict float32 (TF32 off), cudnn.benchmark on; " if s["strict_float32"] else "")
        + f"time limit {s['time_limit_s']:g} s (0 = none).",
        "",
        "## Networks (random weights, our code)",
        "",
        "| network | architecture of | class / U-Net | parameters | GFLOP per image-NFE | batch sizes | "
        "auto pick (uncapped -> cap) |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for key, n in result["networks"].items():
        gflop = _fmt(n["flops_per_image_nfe"] / 1e9 if n["flops_per_image_nfe"] else None, ".1f")
        batches = ", ".join(map(str, n["batch_sizes"]))
        lines.append(f"| {key} | `{n['checkpoint']}` | {n['preconditioner']} / {n['architecture']} | "
                     f"{n['parameters']:,} | {gflop} | {batches} | {n['auto_batch_uncapped']} -> {n['auto_batch']} |")
    lines.append("")

    ok = [r for r in result["rows"] if r["status"] == "ok"]
    accuracy = {(r["network"], r["option"], r["solver"]): r for r in result["accuracy"]}
    lines += ["## Summary (EDM solver; each option at its fastest batch size)", "",
              "Speed-up against float32 at the same batch size; differences from the accuracy pass.", "",
              "| network | option | batch | images/s | images/s at rec. NFE | x float32 | peak GiB | "
              "max abs diff float | max abs diff uint8 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in result["networks"]:
        for option in s["options"]:
            acc = accuracy.get((key, option, "edm"), {})
            diffs = f"{_fmt(acc.get('max_abs_diff_float'), '.2e')} | {_fmt(acc.get('max_abs_diff_uint8'), 'd')}"
            rows = [r for r in ok if r["network"] == key and r["option"] == option and r["solver"] == "edm"]
            if not rows:
                lines.append(f"| {key} | {option} | - | skipped | | | | {diffs} |")
                continue
            best = max(rows, key=lambda r: r["images_per_s"])
            base = next((r for r in ok if r["network"] == key and r["option"] == "float32" and r["solver"] == "edm"
                         and r["batch"] == best["batch"]), None)
            speedup = best["images_per_s"] / base["images_per_s"] if base else None
            lines.append(f"| {key} | {option} | {best['batch']} | {best['images_per_s']:.1f} | "
                         f"{best['images_per_s_at_recommended_nfe']:.2f} | {_fmt(speedup, '.2f')} | "
                         f"{_fmt(_gib(best['peak_memory_bytes']), '.2f')} | {diffs} |")
    lines.append("")

    if result["accuracy"]:
        lines += [f"## Accuracy against float32 ({s['accuracy_batch']} images, --accuracy-steps {s['accuracy_steps']}, "
                  f"NFE {', '.join(f'{k} {v}' for k, v in s['accuracy_nfe'].items())})", "",
                  "Same noise and labels for every option. Random weights: many pixels saturate in uint8 (in range: "
                  "the float32 image's values inside [-1, 1]), which hides differences there; the float column covers "
                  "all.", "",
                  "| network | option | solver | max abs diff float | max abs diff uint8 | uint8 values differing | "
                  "in range | status |", "|---|---|---|---:|---:|---:|---:|---|"]
        for r in result["accuracy"]:
            if r["status"] != "ok":
                lines.append(f"| {r['network']} | {r['option']} | {r['solver']} | | | | | skipped: {r['reason']} |")
                continue
            lines.append(f"| {r['network']} | {r['option']} | {r['solver']} | {_fmt(r['max_abs_diff_float'], '.2e')} | "
                         f"{_fmt(r['max_abs_diff_uint8'], 'd')} | {_fmt(r['frac_uint8_pixels_differing'], '.2%')} | "
                         f"{_fmt(r['reference_frac_pixels_in_range'], '.0%')} | ok |")
        lines.append("")

    for key, n in result["networks"].items():
        lines += [f"## {key}: every timing cell", "",
                  f"NFE {nfe} per run; images/s at rec. NFE: "
                  f"extrapolated linearly to NFE {n['recommended_nfe']} (the checkpoint's recommended grid).", "",
                  "| option | batch | solver | NFE | median ms | images/s | images/s at rec. NFE | TFLOPS | peak GiB | "
                  "warm-up s | status |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in result["rows"] if r["network"] == key):
            batch = f"{r['batch']}{' (auto)' if r['auto_batch'] else ''}"
            if r["status"] != "ok":
                lines.append(f"| {r['option']} | {batch} | {r['solver']} | | | | | | | | skipped: {r['reason']} |")
                continue
            lines.append(
                f"| {r['option']} | {batch} | {r['solver']} | {r['nfe']} | {r['median_ms']:.2f} | "
                f"{r['images_per_s']:.1f} | {r['images_per_s_at_recommended_nfe']:.2f} | {_fmt(r['tflops'], '.1f')} | "
                f"{_fmt(_gib(r['peak_memory_bytes']), '.2f')} | {r['warmup_s']:.2f} | ok |")
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- Timing runs use a short grid for the time budget; it exaggerates the differences (gpu.json keeps them per "
        f"timing cell), so the accuracy table uses its own grid (--accuracy-steps {s['accuracy_steps']}; 18 is EDM's "
        "CIFAR-10 grid).",
        "- float32 is strict (TF32 off). PyTorch's default allows TF32 in cuDNN convolutions, so an ordinary "
        "`precision: float32` run on an Ampere-or-later GPU is closer to the tf32 row in speed and accuracy.",
        "- Peak memory is `torch.cuda.max_memory_allocated` during one sampling run: it includes the weights, the "
        "stored images and the noise, not only the run's activations.",
        "",
    ]
    return "\n".join(lines)


def _gib(value):
    return None if value is None else value / 2**30


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    md, js = out / "gpu.md", out / "gpu.json"
    js.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    md.write_text(render_markdown(result))
    return md, js


# --------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench_gpu.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--tiny", action="store_true", help="tiny networks, a couple of steps (CPU by default): a smoke test")
    add("--device", default=None, help="torch device (default: cuda; --tiny: cpu)")
    add("--out", default=None,
        help=f"folder for gpu.md and gpu.json (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}; --tiny needs it)")
    add("--compile", action="store_true", help="add bf16 + torch.compile (mode default)")
    add("--options", default=None, help=f"comma-separated subset of {', '.join(OPTION_NAMES)} (float32 always runs)")
    add("--batch-sizes", default=None,
        help="comma-separated batch sizes and/or 'auto' for both networks (default: per network, see the docstring)")
    add("--max-batch", type=int, default=None, help="cap of the auto batch size (default: 512 DDPM++, 256 ADM; tiny 4)")
    add("--num-steps", type=int, default=None,
        help="Karras levels N of the EDM-type solvers in the timing pass; BDIA-DDIM gets 2N-1 (default 3; tiny 2)")
    add("--accuracy-steps", type=int, default=None,
        help="Karras levels N of the accuracy pass (default 18, EDM's CIFAR-10 grid, NFE 35; tiny 4; 0 = no pass)")
    add("--accuracy-batch", type=int, default=None, help="images in the accuracy pass (default 16; tiny 2)")
    add("--repeats", type=int, default=3, help="timed runs per solver and cell (median; default 3)")
    add("--seed", type=int, default=0, help="seed of the weights, noise and labels (default 0)")
    add("--time-limit", type=float, default=None,
        help="seconds after the start past which no timing cell starts (default 270; tiny: none; 0 = none)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--quiet", action="store_true", help="no progress lines")
    return p


def check_args(args) -> None:
    if args.tiny and args.out is None:
        raise UsageError("--tiny needs --out DIR (tiny results must not overwrite results/bench/gpu.*)")
    if args.num_steps is None:
        args.num_steps = 2 if args.tiny else 3
    if not 2 <= args.num_steps <= 1000:
        raise UsageError(f"--num-steps must be in 2..1000, got {args.num_steps}")
    if args.accuracy_steps is None:
        args.accuracy_steps = 4 if args.tiny else 18
    if args.accuracy_steps != 0 and not 2 <= args.accuracy_steps <= 1000:
        raise UsageError(f"--accuracy-steps must be 0 (no accuracy pass) or in 2..1000, got {args.accuracy_steps}")
    if args.accuracy_batch is None:
        args.accuracy_batch = 2 if args.tiny else 16
    if not 1 <= args.accuracy_batch <= MAX_AUTO_BATCH:
        raise UsageError(f"--accuracy-batch must be in 1..{MAX_AUTO_BATCH}, got {args.accuracy_batch}")
    if not 1 <= args.repeats <= 100:
        raise UsageError(f"--repeats must be in 1..100, got {args.repeats}")
    if args.max_batch is not None and not 1 <= args.max_batch <= MAX_AUTO_BATCH:
        raise UsageError(f"--max-batch must be in 1..{MAX_AUTO_BATCH}, got {args.max_batch}")
    if args.time_limit is None:
        args.time_limit = 0.0 if args.tiny else 270.0
    if not (math.isfinite(args.time_limit) and args.time_limit >= 0):
        raise UsageError(f"--time-limit must be a number >= 0, got {args.time_limit}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads must be in 1..1024, got {args.threads}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    args.batch_sizes = parse_batch_sizes(args.batch_sizes) if args.batch_sizes is not None else None
    args.option_list = parse_options(args.options, args.compile)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        device = resolve_device(args)
        out = prepare_out(Path(args.out).expanduser() if args.out else DEFAULT_OUT)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = dict(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = False  # strict float32 reference; bdia.speed's tf32 option turns both on
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    bench = Benchmark(args, device, args.option_list)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # set-up failures (building a network, out of memory): one line; BENCH_GPU_TRACEBACK=1 for more
        if os.environ.get("BENCH_GPU_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    nfe = {}
    for r in bench.rows:
        if r["status"] == "ok":
            nfe.setdefault(r["solver"], r["nfe"])
    result = dict(
        benchmark="bench_gpu", command=" ".join([COMMAND] + (sys.argv[1:] if argv is None else list(argv))),
        started=started, wall_s=bench.wall_s, machine=machine_info(device),
        settings=dict(
            tiny=args.tiny, device=str(device), options=[o.name for o in args.option_list],
            option_settings={o.name: o.speed_kwargs() for o in args.option_list}, solvers=list(SOLVERS),
            num_steps=args.num_steps, bdia_ddim_steps=2 * args.num_steps - 1, nfe=nfe,
            accuracy_steps=args.accuracy_steps, accuracy_batch=args.accuracy_batch,
            accuracy_nfe={r["solver"]: r["nfe"] for r in bench.accuracy if r["status"] == "ok"},
            gamma={k: v for k, v in DEFAULT_GAMMA.items()}, repeats=args.repeats, warmup_runs_per_cell=1,
            seed=args.seed, time_limit_s=args.time_limit, strict_float32=device.type == "cuda",
            cudnn_benchmark=torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            torch_defaults=defaults, batch_sizes_arg=args.batch_sizes, max_batch_arg=args.max_batch,
            timing="CUDA events" if device.type == "cuda" else "time.perf_counter",
        ),
        networks=bench.networks, rows=bench.rows, accuracy=bench.accuracy,
    )
    try:
        md, js = write_results(result, out)
    except OSError as e:
        print(f"error: cannot write the results to {out}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 1
    skipped = sum(r["status"] != "ok" for r in bench.rows)
    print(f"wrote {md} and {js} ({len(bench.rows)} rows, {skipped} skipped; {bench.wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
