"""Images per second of every network speed option (bdia.speed) on this CPU, relative to float32, for the embedded
digits model and a full-size CIFAR-10 DDPM++ (random weights).

    make bench                            # = OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_speed.py
    python benchmarks/bench_speed.py --threads 2 --repeats 7 --ddpmpp-repeats 5 --compile digits   # the defaults
    python benchmarks/bench_speed.py --compile all    # also compile the 55.7M-parameter DDPM++ (about 2 more minutes)

A benchmark, not a test: it writes ``<out-dir>/speed.{md,json}`` (default ``results/bench/``) and asserts nothing.

Each option wraps the network with :func:`bdia.speed.with_speed` and runs a whole ``bdia.sample`` (bdia_edm at its
defaults; solver state float64). All options of one model are timed round-robin in one process (the order rotates
every repeat), and the figure reported is the median; "ratio" = median over repeats of (float32 run time / option
run time), so > 1 is faster than float32. An option whose estimated run time (from one 1-image network call)
exceeds ``--max-run-seconds`` is not run in the round-robin; its images/s is that single call's (marked).
Options that change the network in place (channels_last) get their own copy of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.compile keeps generated code in an on-disk cache; a fresh one per run makes the first call's time the
# compilation a new user waits for (--warm-compile-cache keeps the usual cache).
_FRESH_CACHE = None
if "--warm-compile-cache" not in sys.argv:
    _FRESH_CACHE = tempfile.mkdtemp(prefix="bench_speed_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _FRESH_CACHE

import torch  # noqa: E402

import bdia  # noqa: E402
from bdia.imageio import StackedRandomGenerator, class_labels_for, seed_noise  # noqa: E402
from bdia.models import digits_network  # noqa: E402
from bdia.networks import EDMPrecond  # noqa: E402
from bdia.speed import with_speed  # noqa: E402

COMMAND = "make bench  (= OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_speed.py)"

# EDM's train.py --arch=ddpmpp, CIFAR-10 (55,735,299 parameters with 10 classes; bdia/networks/registry.py).
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])

#: name -> (precision, channels_last, compile)
OPTIONS = {
    "float32": ("float32", False, None),
    "tf32": ("tf32", False, None),
    "bf16": ("bf16", False, None),
    "fp16": ("fp16", False, None),
    "channels_last": ("float32", True, None),
    "channels_last + bf16": ("bf16", True, None),
    "compile (default)": ("float32", False, "default"),
}

COMPILE_SKIP_REASON = ("not run by default: compiling the full-size network takes minutes on a 2-core CPU (the first "
                       "call compiles), beyond this script's budget; `--compile all` measures it")


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": platform.processor() or platform.machine(),
    }
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["cpu"] in ("", platform.machine(), platform.processor()):
                    info["cpu"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # bf16 / fp16 hardware: AVX-512 BF16 (vdpbf16ps), AMX (tile matrix units, bf16 and int8), AVX-512 FP16.
    info["cpu_flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "f16c")}
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    info["onednn"] = onednn.group(1) if onednn else None
    try:
        info["gcc"] = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        info["gcc"] = None
    return info


def make_network(kind: str):
    if kind == "digits":
        return digits_network().eval().requires_grad_(False)
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.0, **DDPMPP).eval().requires_grad_(False)


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def too_slow(call, nfe: int, max_run_seconds: float) -> float:
    """Seconds of one network call, for deciding whether a whole run (``nfe`` calls) fits ``max_run_seconds``.

    A first call also sets kernels up (seconds on a busy CPU), so a call over the budget is timed a second time,
    unless it took over 10 s (then it is that slow: the set-up is not the reason)."""
    seconds, _, _ = timed(call)
    if max_run_seconds < seconds * nfe and seconds < 10:
        seconds, _, _ = timed(call)
    return seconds


def bench_model(kind: str, images: int, steps: int, repeats: int, compile_it: bool, max_run_seconds: float, log) -> dict:
    net = make_network(kind)
    params = sum(p.numel() for p in net.parameters())
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    nhwc = copy.deepcopy(net)  # channels_last converts its network in place
    sigmas = bdia.karras_sigmas(steps)
    seeds = list(range(images))
    x_init = seed_noise(seeds, shape, sigmas[0])
    rng = StackedRandomGenerator(seeds)
    _, labels = class_labels_for(rng, net.label_dim)
    counter = bdia.CountingDenoiser(lambda x, sigma, class_labels=None, **cond: torch.zeros_like(x))  # NFE, no network
    bdia.sample(counter, x_init, sigmas, solver="bdia_edm", class_labels=labels)
    nfe = counter.nfe

    rows: dict[str, dict] = {}
    denoisers = {}
    for name, (precision, channels_last, compile_mode) in OPTIONS.items():
        row = rows[name] = {"precision": precision, "channels_last": channels_last, "compile": compile_mode}
        if compile_mode and not compile_it:
            row["skipped"] = COMPILE_SKIP_REASON
            continue
        base = nhwc if channels_last else net
        try:
            denoiser = with_speed(base, precision, channels_last, compile_mode)
            with torch.inference_mode():
                # Only an option far slower than float32 (the reference, always timed in full) is measured from a
                # single call: its whole run would exceed max_run_seconds and one call takes > 4x float32's.
                single = None
                reference = name == "float32"
                if not compile_mode:  # one image, one call: about a lower bound on a whole run's time (NFE calls)
                    probe = too_slow(lambda: denoiser(x_init[:1], sigmas[1], None if labels is None else labels[:1]),
                                     nfe, max_run_seconds)
                    row["probe_seconds_one_image"] = probe
                    if not reference and probe * nfe > max_run_seconds and probe > 4 * rows["float32"]["probe_seconds_one_image"]:
                        single = (1, probe)
                if single is None:
                    warm, _, _ = timed(lambda: denoiser(x_init, sigmas[1], labels))  # compile happens here
                    if reference:  # the yardstick for the others: a second call, past the first call's set-up
                        warm = min(warm, timed(lambda: denoiser(x_init, sigmas[1], labels))[0])
                    if not (compile_mode or reference) and warm * nfe > max_run_seconds:
                        warm = too_slow(lambda: denoiser(x_init, sigmas[1], labels), nfe, max_run_seconds)
                        if warm * nfe > max_run_seconds and warm > 4 * rows["float32"]["warmup_seconds"]:
                            single = (images, warm)
            if single is not None:
                rows_, seconds = single
                row["single_call_only"] = (f"a whole run would take about {seconds / rows_ * images * nfe:.0f} s "
                                           f"(one {rows_}-image network call: {seconds:.1f} s); measured from that call")
                row["images_per_second_per_nfe"] = rows_ / seconds
                row["images_per_second"] = rows_ / (seconds * nfe)
                log(f"{kind} {name}: single {rows_}-image call {seconds:.2f} s")
                continue
            row["warmup_seconds"] = warm
            if compile_mode:
                row["compile_seconds_first_call"] = warm
                with torch.inference_mode():  # a whole run too: the solver's calls may compile once more
                    row["second_warmup_seconds_whole_run"], _, _ = timed(
                        lambda: bdia.sample(denoiser, x_init, sigmas, solver="bdia_edm", class_labels=labels))
            log(f"{kind} {name}: warm-up {warm:.2f} s")
        except Exception as e:  # a compile that fails on this machine: record it
            row["skipped"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log(f"{kind} {name}: {row['skipped']}")
            continue
        denoisers[name] = denoiser

    names = list(denoisers)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    finals = {}
    with torch.inference_mode():
        for r in range(repeats):
            k = r % len(names)
            order = names[k:] + names[:k]
            if r % 2:
                order = order[::-1]
            for n in order:
                w, c, out = timed(lambda: bdia.sample(denoisers[n], x_init, sigmas, solver="bdia_edm", class_labels=labels))
                wall[n].append(w)
                cpu[n].append(c)
                finals[n] = out
            log(f"{kind} repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in names))
    for n in names:
        row = rows[n]
        row["seconds"] = wall[n]
        row["cpu_seconds"] = cpu[n]
        row["median_seconds"] = statistics.median(wall[n])
        row["min_seconds"] = min(wall[n])
        row["spread"] = max(wall[n]) / min(wall[n])  # how much the shared machine disturbed this option's runs
        # images/s from the fastest run: other jobs on the machine only ever add time (the ratios use every run)
        row["images_per_second"] = images / row["min_seconds"]
        row["images_per_second_per_nfe"] = images * nfe / row["min_seconds"]
        if "float32" in wall:
            row["ratio_to_float32"] = statistics.median(a / b for a, b in zip(wall["float32"], wall[n]))
            row["cpu_time_ratio_to_float32"] = statistics.median(a / b for a, b in zip(cpu["float32"], cpu[n]))
            row["fastest_run_ratio_to_float32"] = min(wall["float32"]) / min(wall[n])
            row["max_abs_diff_vs_float32"] = float((finals[n] - finals["float32"]).abs().max())
    f32 = rows["float32"].get("images_per_second")
    for row in rows.values():
        if "single_call_only" in row and f32:
            row["ratio_to_float32"] = row["images_per_second"] / f32
    return {
        "model": kind, "parameters": params, "image_shape": list(shape), "images": images, "solver": "bdia_edm",
        "num_steps": steps, "nfe": nfe, "repeats": repeats, "options": rows,
    }


def _fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    flags = m["cpu_flags"]
    lines = [
        "# Network speed options on this CPU (bdia.speed)",
        "",
        f"Generated by `{report['command']}` in {report['seconds_total']:.0f} s; do not edit by hand. Raw numbers: `speed.json`.",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads "
        f"(ATen CPU capability {m['aten_cpu_capability']}, oneDNN {m['onednn']}); AVX-512 BF16 "
        f"{'present' if flags['avx512_bf16'] else 'absent'}, AMX {'present' if flags['amx_bf16'] else 'absent'}, "
        f"AVX-512 FP16 {'present' if flags['avx512_fp16'] else 'absent'}; {m['gcc'] or 'no gcc'}. Load average "
        f"(1 min) at the start / end: {report['load_average'][0]:.1f} / {report['load_average'][1]:.1f} (other "
        f"jobs share the CPU: see the spread column).",
        "",
        "Each run is a whole `bdia.sample` (bdia_edm defaults, float64 state) with the network wrapped by "
        "`bdia.speed.with_speed`; all options of a model are timed round-robin in one process (order rotated each "
        "repeat). **images/s** from the option's fastest run. **ratio** = median over repeats of (float32 time / option time): > 1 is "
        "faster. Cross-checks for a shared machine: the **fastest-run ratio** (float32's fastest run / the option's: "
        "other jobs only ever add time), the **CPU-time ratio** (this process's CPU seconds) and the **run-time "
        "spread** (slowest / fastest run of the option; 1.00 = undisturbed). "
        "**max |Δ|**: largest difference of the final float64 state from float32's (same seeds). "
        "**tf32 is float32 on a CPU** (TensorFloat-32 exists on CUDA only; the wrapper runs plain float32, so its "
        "output is bit-identical and its time the same).",
    ]
    for model in report["models"]:
        name = ("embedded digits model" if model["model"] == "digits" else "full-size CIFAR-10 DDPM++ (random weights)")
        lines += [
            "",
            f"## {name}: {model['parameters']:,} parameters, {model['images']} images of "
            f"{'x'.join(map(str, model['image_shape']))}, {model['num_steps']} steps (NFE {model['nfe']}), "
            f"{model['repeats']} repeats",
            "",
            "| option | images/s | image-NFE/s | ratio to float32 | fastest-run ratio | CPU-time ratio | run-time spread | "
            "max \\|Δ\\| vs float32 | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for opt, row in model["options"].items():
            if "skipped" in row:
                lines.append(f"| {opt} | — | — | — | — | — | — | — | skipped: {row['skipped']} |")
                continue
            note = []
            if "single_call_only" in row:
                note.append(row["single_call_only"])
            if row.get("compile_seconds_first_call") is not None:
                note.append(f"first call (compilation{', empty cache' if report['fresh_compile_cache'] else ''}) "
                            f"{row['compile_seconds_first_call']:.0f} s")
            if opt == "tf32":
                note.append("= float32 on a CPU")
            diff = row.get("max_abs_diff_vs_float32")
            lines.append(
                f"| {opt} | {_fmt(row['images_per_second'], 3 if row['images_per_second'] < 1 else 2)} | "
                f"{_fmt(row['images_per_second_per_nfe'], 3 if row['images_per_second_per_nfe'] < 1 else 1)} | "
                f"**{_fmt(row.get('ratio_to_float32'), 3 if (row.get('ratio_to_float32') or 1) < 0.1 else 2)}** | "
                f"{_fmt(row.get('fastest_run_ratio_to_float32'))} | {_fmt(row.get('cpu_time_ratio_to_float32'))} | "
                f"{_fmt(row.get('spread'))} | {'—' if diff is None else f'{diff:.1e}'} | {'; '.join(note)} |")
    lines += ["", "## What this says", ""] + [f"* {s}" for s in report["summary"]]
    return "\n".join(lines) + "\n"


def _vs(ratio) -> str:
    """'1.69x faster' / '0.73x (slower)' / 'no faster (1.01x)' for a ratio to float32."""
    if ratio is None:
        return "not measured"
    if ratio >= 1.05:
        return f"{ratio:.2f}x (faster)"
    if ratio > 0.95:
        return f"{ratio:.2f}x (no change)"
    return f"{ratio:.3f}x (slower)" if ratio < 0.1 else f"{ratio:.2f}x (slower)"


def summary(report: dict) -> list[str]:
    flags = report["machine"]["cpu_flags"]
    by = {m["model"]: m["options"] for m in report["models"]}
    r = lambda model, opt: by[model][opt].get("ratio_to_float32")  # noqa: E731
    hw = ("AVX-512 BF16 for bf16 dot products, no AMX" if flags["avx512_bf16"] and not flags["amx_bf16"]
          else "AMX" if flags["amx_bf16"] else "no bf16 instructions")
    out = [
        f"**What bf16 gains on this CPU** ({hw}): {_vs(r('ddpmpp', 'bf16'))} on the full-size DDPM++ (128-256 "
        f"channels), {_vs(r('digits', 'bf16'))} on the small digits model (16-32 channels). Autocast lowers only the "
        f"convolutions and matrix products; everything else (GroupNorm, SiLU, additions, and a cast in and out of "
        f"every lowered op, weights included: they need no gradient, so autocast does not cache them) stays "
        f"float32. Wide layers are dominated by the convolutions, which bf16 speeds up; narrow ones by the rest. "
        f"The images change: see `precision_quality.md`.",
        f"**fp16**: {_vs(r('digits', 'fp16'))} on the digits model, {_vs(r('ddpmpp', 'fp16'))} on DDPM++ "
        f"({'no' if not flags['avx512_fp16'] else 'with'} AVX-512 FP16). oneDNN runs no fp16 convolution here, so "
        f"ATen's generic fallback does (`_slow_conv2d_forward`, 87% of the time in a profile of the digits model). "
        f"fp16 is a GPU option.",
        f"**channels_last**: float32 {_vs(r('digits', 'channels_last'))} on digits, "
        f"{_vs(r('ddpmpp', 'channels_last'))} on DDPM++; with bf16 {_vs(r('digits', 'channels_last + bf16'))} and "
        f"{_vs(r('ddpmpp', 'channels_last + bf16'))}. The convolutions take NHWC well, but EDM's attention turns "
        f"channels_last activations into strided batched matrix products (`bmm`: the largest single cost in a "
        f"profile of the digits model, against 2% in NCHW) and GroupNorm slows down.",
    ]
    comp = []
    for m in by:
        row = by[m]["compile (default)"]
        if "skipped" in row:
            comp.append(f"{m}: {row['skipped']}")
        else:
            comp.append(f"{m}: {_vs(row.get('ratio_to_float32'))} once compiled; the first call (compilation) took "
                        f"{row['compile_seconds_first_call']:.0f} s")
    out.append("**torch.compile** (mode default): " + "; ".join(comp) + ". It pays only for long runs with one "
               "batch shape (every new shape compiles again).")
    best = []
    for m, options in by.items():
        measured = {o: row["ratio_to_float32"] for o, row in options.items()
                    if row.get("ratio_to_float32") is not None and "single_call_only" not in row}
        top = max(measured.values())
        near = sorted((o for o in measured if measured[o] >= 0.95 * top), key=measured.get, reverse=True)
        best.append(f"{'digits' if m == 'digits' else 'DDPM++'}: " + ", ".join(f"{o} ({measured[o]:.2f}x)" for o in near))
    out.append("Fastest here (options within 5% of the best, i.e. within the timing noise): " + "; ".join(best)
               + ". tf32 is float32 on a CPU (bit-identical output, same time).")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="round-robin repeats for the digits model")
    parser.add_argument("--ddpmpp-repeats", type=int, default=5)
    parser.add_argument("--digits-images", type=int, default=128)
    parser.add_argument("--digits-steps", type=int, default=6)
    parser.add_argument("--ddpmpp-images", type=int, default=2)
    parser.add_argument("--ddpmpp-steps", type=int, default=2)
    parser.add_argument("--compile", choices=("none", "digits", "all"), default="digits",
                        help="which models get the torch.compile option (DDPM++ compiles for about 2 minutes)")
    parser.add_argument("--max-run-seconds", type=float, default=8.0,
                        help="options whose whole run would take longer are measured from one 1-image call")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="use torch.compile's usual on-disk cache (default: an empty one, removed at the end)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results" / "bench")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - started:6.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    models = [
        bench_model("digits", args.digits_images, args.digits_steps, args.repeats, args.compile != "none",
                    args.max_run_seconds, log),
        bench_model("ddpmpp", args.ddpmpp_images, args.ddpmpp_steps, args.ddpmpp_repeats, args.compile == "all",
                    args.max_run_seconds, log),
    ]
    command = COMMAND if not argv else " ".join([".venv/bin/python benchmarks/bench_speed.py", *argv])
    report = {"command": command, "machine": machine_info(), "models": models,
              "seconds_total": time.perf_counter() - started, "load_average": [load_start, os.getloadavg()[0]],
              "fresh_compile_cache": _FRESH_CACHE is not None}
    if _FRESH_CACHE is not None:
        shutil.rmtree(_FRESH_CACHE, ignore_errors=True)
    report["summary"] = summary(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out_dir / "speed.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
