"""Memory and time of gradients through a whole sampling run: reversible backprop (bdia.sample_with_grad) vs plain
autograd vs per-step checkpointing, and how far the reversible gradients are from plain autograd's.

    make bench                          # = OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gradients.py
    python benchmarks/bench_gradients.py --steps 10,20,50,100 --ddpmpp-steps 10,20,50,100   # the defaults
    python benchmarks/bench_gradients.py --tiny --out-dir /tmp/g                           # seconds (a test runs it)

A benchmark, not a test: it writes ``<out-dir>/gradients.{md,json,png}`` (default ``results/bench/``) and asserts
nothing. The loss is ``sum(w * x_N)`` with fixed random ``w``; gradients w.r.t. the starting noise only (the
networks' weights do not require grad, as in noise optimisation).

Every (network, backprop, N) runs in a fresh Python process, so one run's freed memory cannot hide the next one's.
That process builds the network, draws the noise and warms up the run's code paths on a tiny network (the measured
network runs first in the measured run, so no memory it freed earlier can be reused unseen). Then:

1. **memory**, on the first full-size run of ``bdia.sample_with_grad`` + ``backward``:
   * CPU: **peak bytes allocated through malloc above those allocated before the run** (glibc's ``mallinfo2``,
     ``uordblks + hblkhd``: allocated memory, not memory the allocator keeps for reuse), sampled after every call
     of the network (when a step's graph is complete) and at the end; it includes autograd's saved tensors, one
     step's recomputed graph, the gradients. Also the peak resident set size above the baseline (VmHWM - VmRSS, the
     peak reset by writing 5 to /proc/self/clear_refs; Linux only), which freed memory the allocator keeps (from
     building the network, say) can hide: shown, not used for the conclusions;
   * CUDA (when ``--device cuda`` or a GPU is present): ``torch.cuda.max_memory_allocated`` above the allocation
     before the run;
   * both: the bytes autograd saves for the backward pass during the forward pass (``saved_tensors_hooks``; each
     storage once; the network's own parameters left out) -- exact, independent of the allocator.
2. **time**, on warm runs (``--repeats``, median): ``bdia.sample`` without autograd (the "sampling" time the ratios
   divide by), then ``bdia.sample_with_grad`` + ``backward``. On a CPU the times are the process's **CPU time**
   (``time.process_time``, all threads): on a shared machine other jobs inflate wall time, and so wall-time ratios,
   by whatever share of the cores they take meanwhile; on CUDA, wall time after synchronising. With 0 repeats
   (DDPM++'s default: a run takes minutes) the memory run is timed, against a sampling run just after it (the memory run pays the network's
   kernels' set-up once).

Plain autograd that would need more than ``--max-autograd-gib`` (extrapolated linearly in N from its measured row
with fewer steps; for the first row, one network call's saved activations times images and calls) is not run; its
row says what it would need.

The accuracy table runs the embedded digits network (float32, as shipped) through bdia_edm at the app's setting
(N = 18, 35 NFE) with float64 and float32 solver states and several gamma, comparing the reversible gradient with
plain autograd's in the same precision, and reporting the recovery error the backward pass measures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bdia  # noqa: E402
from bdia.models import digits_network  # noqa: E402
from bdia.networks import EDMPrecond  # noqa: E402
from bdia.reversible import ReversibleGradientWarning  # noqa: E402

COMMAND = "make bench  (= OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gradients.py)"
METHODS = ("reversible", "checkpoint", "autograd")

# EDM's train.py --arch=ddpmpp, CIFAR-10 (bdia/networks/registry.py), unconditional here; random weights.
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
TINY_UNET = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
                 channel_mult_noise=1, resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4])

#: network name -> (what, solver, gamma); bdia_ddim (1 NFE per step) keeps the full-size network affordable on a CPU
NETWORKS = {
    "digits": ("embedded digits network (0.32M parameters, 1x16x16)", "bdia_edm", 0.96),
    "ddpmpp": ("DDPM++ CIFAR-10 architecture (55.7M parameters, 3x32x32), random weights", "bdia_ddim", 0.96),
    "tiny": ("tiny SongUNet (random weights, 1x8x8)", "bdia_edm", 0.96),
}


def build_network(name: str, device: str):
    if name == "digits":
        net = digits_network()
    elif name == "ddpmpp":
        torch.manual_seed(0)
        net = EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, dropout=0.0, **DDPMPP)
    else:
        torch.manual_seed(0)
        net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, dropout=0.0, **TINY_UNET)
    return net.eval().requires_grad_(False).to(device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: ``uordblks`` + ``hblkhd``): what is
    allocated, not what the process keeps for reuse (main arena: run with one thread)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


class PeakMemory:
    """Peak memory of a block above what was in use when it started.

    CPU: bytes allocated through malloc (:func:`_malloc_in_use`), sampled after every call of the network (a forward
    hook: the moment a step's graph is complete) and at the end; and peak resident set size (VmHWM - VmRSS), which
    freed memory the allocator keeps for reuse can hide. CUDA: ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device: str, net):
        self.device, self.net = device, net

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.in_use = _malloc_in_use()
        self.base, self.top = self.in_use(), 0
        self.hook = self.net.register_forward_hook(lambda *args: self._sample())
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.rss_base = _status_kib("VmRSS") * 1024
        return self

    def _sample(self):
        self.top = max(self.top, self.in_use())

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            self.rss_peak = None
            return False
        self._sample()
        self.hook.remove()
        self.peak = self.top - self.base
        self.rss_peak = _status_kib("VmHWM") * 1024 - self.rss_base
        return False


def saved_bytes_hooks(net):
    """Hooks counting the bytes of the tensors autograd saves (each storage once), leaving out the network's own
    parameters and buffers (saved for the backward pass, but no new memory)."""
    own = {(t.untyped_storage().data_ptr(), t.device.type) for t in [*net.parameters(), *net.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key not in own:
            storages[key] = storage.nbytes()
        return t

    return storages, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(spec: dict) -> dict:
    """One (network, backprop, N) run in this process; see the module notes."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    what, solver, gamma = NETWORKS[spec["network"]]
    net = build_network(spec["network"], device)
    shape = (spec["batch"], net.img_channels, net.img_resolution, net.img_resolution)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    weights = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    sigmas = bdia.karras_sigmas(spec["num_steps"])
    warnings.simplefilter("ignore", ReversibleGradientWarning)
    # CPU: the process's CPU time (all its threads), which other work on a shared machine does not inflate the way it
    # inflates wall time; CUDA: wall time after synchronising.
    clock = time.perf_counter if device == "cuda" else time.process_time

    def sample():
        counted = bdia.CountingDenoiser(net)
        bdia.sample(counted, noise * sigmas[0], sigmas, solver=solver, gamma=gamma)
        return counted.nfe

    def forward_backward(hooks=None):
        x = (noise * sigmas[0]).requires_grad_(True)
        started = clock()
        with hooks or contextlib.nullcontext():
            out = bdia.sample_with_grad(net, x, sigmas, solver=solver, gamma=gamma, backprop=spec["backprop"])
        _sync(device)
        forward_s = clock() - started
        (weights * out).sum().backward()
        _sync(device)
        return forward_s, clock() - started, x.grad

    # Warm-up: every code path of the run (lazy imports, autograd, checkpointing) on the tiny network. The measured
    # network itself runs first in the measured run, so nothing it allocates (and frees for reuse) precedes it.
    tiny = build_network("tiny", device)
    warm_sigmas = bdia.karras_sigmas(2)
    warm = torch.randn(1, 1, 8, 8, dtype=torch.float64, device=device).mul(warm_sigmas[0]).requires_grad_(True)
    bdia.sample_with_grad(tiny, warm, warm_sigmas, solver=solver, gamma=gamma, backprop=spec["backprop"]).sum().backward()

    nfe = None
    if spec["backprop"] == "autograd" and spec.get("max_autograd_bytes"):
        nfe = 2 * spec["num_steps"] - 1 if solver == "bdia_edm" else spec["num_steps"]
        need = spec.get("estimated_bytes")  # extrapolated from a measured row with fewer steps, when there is one
        if need is None:  # else: one network call's saved activations on one image, times images and calls
            storages, hooks = saved_bytes_hooks(net)
            x = noise[:1].float().requires_grad_(True)
            with hooks:
                net(x, torch.tensor(1.0, device=device))
            need = sum(storages.values()) * spec["batch"] * nfe
        if need > spec["max_autograd_bytes"]:
            how = "extrapolated from the row with fewer steps" if spec.get("estimated_bytes") else "estimated"
            return dict(spec, nfe=nfe, skipped=f"would need ~{need / 2**30:.1f} GiB ({how}; > --max-autograd-gib "
                        f"{spec['max_autograd_bytes'] / 2**30:g})")

    def timed_sample():
        _sync(device)
        started = clock()
        calls = sample()
        _sync(device)
        return calls, clock() - started

    # 1. Memory, on the first full-size run (nothing of its size allocated before in this process). With
    #    repeats = 0 its time is the one reported, against a sampling run just after it.
    storages, hooks = saved_bytes_hooks(net)
    with PeakMemory(device, net) as memory:
        forward_s, total_s, grad = forward_backward(hooks)
    if spec["repeats"] == 0:
        nfe, sample_s = timed_sample()
    # 2. Time, on warm runs: sampling without autograd, then forward + backward, `repeats` times (median ratio).
    timings = []
    for _ in range(spec["repeats"]):
        nfe, sample_s = timed_sample()
        forward_s, total_s, _ = forward_backward()
        timings.append((total_s / sample_s, sample_s, forward_s, total_s))
    if timings:
        _, sample_s, forward_s, total_s = sorted(timings)[len(timings) // 2]
    return dict(spec, nfe=nfe, sample_s=sample_s, forward_s=forward_s, backward_s=total_s - forward_s, total_s=total_s,
                peak_bytes=memory.peak, rss_peak_bytes=memory.rss_peak, saved_bytes=sum(storages.values()),
                grad_norm=float(grad.norm()))


def _extrapolated(rows, network, method, num_steps) -> int | None:
    """Peak memory of ``method`` at ``num_steps``, extrapolated linearly in N from its measured row with the most
    steps below it (plain autograd's memory grows with the number of network calls); ``None`` without one."""
    done = [r for r in rows if r["network"] == network and r["backprop"] == method and "peak_bytes" in r
            and r["num_steps"] < num_steps]
    if not done:
        return None
    last = max(done, key=lambda r: r["num_steps"])
    return int(last["peak_bytes"] * num_steps / last["num_steps"])


def run_worker(spec: dict, timeout: float) -> dict:
    """``worker(spec)`` in a fresh interpreter (its own memory); a failure becomes the row's ``error``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])[:300]
        return dict(spec, error=f"exit status {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Accuracy of the reversible gradients (one process, small batch).


def accuracy_rows(threads: int, num_steps: int, gammas, batch: int, tiny: bool) -> list[dict]:
    torch.set_num_threads(threads)
    net = build_network("tiny" if tiny else "digits", "cpu")
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    weights = torch.randn(shape, generator=g, dtype=torch.float64)
    sigmas = bdia.karras_sigmas(num_steps)
    rows = []
    for dtype in (torch.float64, torch.float32):
        for gamma in gammas:
            grads, reports = {}, []
            for backprop in ("autograd", "reversible"):
                x = (noise * sigmas[0]).to(dtype).requires_grad_(True)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ReversibleGradientWarning)
                    out = bdia.sample_with_grad(net, x, sigmas, solver="bdia_edm", gamma=gamma, dtype=dtype,
                                                backprop=backprop, on_backward=reports.append)
                    (weights.to(dtype) * out).sum().backward()
                grads[backprop] = x.grad.double()
                warned = any(issubclass(w.category, ReversibleGradientWarning) for w in caught)
            ref = grads["autograd"]
            rows.append(dict(
                dtype=str(dtype).replace("torch.", ""), gamma=gamma, num_steps=num_steps,
                gradient_error=float((grads["reversible"] - ref).abs().max() / ref.abs().max()),
                recovery_error=reports[0]["recovery_error"], predicted_error=reports[0]["predicted_error"],
                warned=warned,
            ))
    return rows


# --------------------------------------------------------------------------------------------------
# Report.


def fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def fmt_saved(row) -> str:
    return "n/a" if row["backprop"] == "checkpoint" else f"{row['saved_bytes'] / 2**10:,.0f}"


def flatness(rows, network, method, key="peak_bytes"):
    values = [(r["num_steps"], r[key]) for r in rows if r["network"] == network and r["backprop"] == method and key in r]
    if len(values) < 2:
        return None
    values.sort()
    first, last = values[0][1], values[-1][1]
    return (last - first) / first if first > 0 else None


def write_markdown(path: Path, result: dict) -> None:
    rows, info = result["rows"], result["machine"]
    lines = [
        "# Gradients through the sampler: memory and time",
        "",
        f"Generated by `{COMMAND}`; machine: {info['platform']}, torch {info['torch']}, {info['torch_threads']} "
        f"threads, device {result['device']}. Loss `sum(w * x_N)`, gradient w.r.t. the starting noise (weights "
        "frozen). Every row is a fresh process.",
        "",
        f"Memory: **{result['memory_measure']}**; \"saved\" = bytes autograd keeps for the backward pass during "
        "the forward pass (each storage once, the network's own weights left out; checkpoint's own stored step inputs "
        "are hidden from these hooks: n/a). "
        f"Times: {result['time_measure']}; \"sampling\" = `bdia.sample` without autograd in the same process; "
        "ratios divide by it.",
        "",
    ]
    for network in result["networks"]:
        what, solver, gamma = NETWORKS[network]
        batch = result["batch"][network]
        repeats = result["repeats"][network]
        timing = f"times: median of {repeats} warm run(s)" if repeats else "times: the memory run's"
        lines += [f"## {what}", "", f"{solver}, gamma {gamma}, batch {batch}, float64 states, float32 network; {timing}.", "",
                  "| backprop | N | NFE | peak memory (MiB) | RSS (MiB) | saved (KiB) | sampling (s) | forward (s) | "
                  "backward (s) | total / sampling | backward / sampling |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["network"] != network:
                continue
            head = f"| {r['backprop']} | {r['num_steps']} | {r.get('nfe', '—')} |"
            if "error" in r or "skipped" in r:
                lines.append(f"{head} not run: {r.get('error') or r.get('skipped')} | | | | | | | |")
                continue
            lines.append(
                f"{head} {fmt_bytes(r['peak_bytes'])} | {fmt_bytes(r.get('rss_peak_bytes'))} | {fmt_saved(r)} | "
                f"{r['sample_s']:.2f} | "
                f"{r['forward_s']:.2f} | {r['backward_s']:.2f} | {r['total_s'] / r['sample_s']:.2f} | "
                f"{r['backward_s'] / r['sample_s']:.2f} |")
        growth = {m: flatness(rows, network, m) for m in METHODS}
        steps = sorted({r["num_steps"] for r in rows if r["network"] == network})
        shown = ", ".join(f"{m} {g * 100:+.0f} %" for m, g in growth.items() if g is not None)
        if shown:
            lines += ["", f"Peak memory from N = {steps[0]} to N = {steps[-1]}: {shown}."]
        lines.append("")
    acc = result["accuracy"]
    if acc:
        lines += ["## Reversible gradients vs plain autograd", "",
                  f"{result['accuracy_network']}, bdia_edm, N = {acc[0]['num_steps']} ({2 * acc[0]['num_steps'] - 1} "
                  f"NFE), batch {result['accuracy_batch']}; the network runs in float32 in both. gradient error = "
                  "max |reversible - autograd| / max |autograd| (same dtype); recovery error = the largest relative "
                  "error of the recovered start state the backward pass measures; predicted = its round-off model; "
                  "warned = a ReversibleGradientWarning was raised.", "",
                  "| states | gamma | gradient error | recovery error | predicted | warned |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in acc:
            lines.append(f"| {r['dtype']} | {r['gamma']} | {r['gradient_error']:.1e} | {r['recovery_error']:.1e} | "
                         f"{r['predicted_error']:.1e} | {'yes' if r['warned'] else 'no'} |")
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = result["networks"]
    fig, axes = plt.subplots(2, len(networks), figsize=(5.2 * len(networks), 7.2), squeeze=False)
    colors = {"reversible": "tab:red", "checkpoint": "tab:blue", "autograd": "black"}
    for col, network in enumerate(networks):
        for method in METHODS:
            done = sorted((r["num_steps"], r) for r in result["rows"]
                          if r["network"] == network and r["backprop"] == method and "peak_bytes" in r)
            if not done:
                continue
            steps = [n for n, _ in done]
            axes[0][col].plot(steps, [r["peak_bytes"] / 2**20 for _, r in done], "o-", color=colors[method], label=method)
            axes[1][col].plot(steps, [r["total_s"] / r["sample_s"] for _, r in done], "o-", color=colors[method],
                              label=method)
        axes[0][col].set_title(NETWORKS[network][0].split(" (")[0] + f" ({NETWORKS[network][1]})", fontsize=10)
        axes[0][col].set_ylabel(f"peak memory above baseline (MiB)\n[{result['memory_measure_short']}]")
        axes[1][col].set_ylabel(f"forward + backward / sampling\n[{'wall' if result['device'] == 'cuda' else 'CPU'} time]")
        axes[1][col].set_xlabel("number of steps N")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_yscale("log")
    fig.suptitle("Gradients through the whole sampler: reversible (BDIA's exact inverse) vs checkpoint vs autograd",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--steps", default="10,20,50,100", help="N for the digits network")
    parser.add_argument("--ddpmpp-steps", default="10,20,50,100", help="N for DDPM++ ('' skips it)")
    parser.add_argument("--digits-batch", type=int, default=16)
    parser.add_argument("--ddpmpp-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-autograd-gib", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3, help="digits: timed runs per row after the memory run "
                        "(median); 0: time the memory run")
    parser.add_argument("--ddpmpp-repeats", type=int, default=0, help="the same for DDPM++ (a run takes minutes)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--accuracy-steps", type=int, default=18)
    parser.add_argument("--accuracy-gammas", default="0.5,0.9,0.96,1.0")
    parser.add_argument("--tiny", action="store_true", help="a tiny network and few steps: checks the script runs")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("error: the CPU memory measure needs Linux's /proc/self/clear_refs")
    if args.tiny:
        plan = {"tiny": ([3, 6], 2, 1)}
    else:
        plan = {"digits": ([int(s) for s in args.steps.split(",") if s], args.digits_batch, args.repeats)}
        if args.ddpmpp_steps.strip():
            plan["ddpmpp"] = ([int(s) for s in args.ddpmpp_steps.split(",") if s], args.ddpmpp_batch,
                              args.ddpmpp_repeats)
    rows = []
    started = time.perf_counter()
    for network, (steps, batch, repeats) in plan.items():
        for num_steps in steps:
            for method in METHODS:
                spec = dict(network=network, backprop=method, num_steps=num_steps, batch=batch, threads=args.threads,
                            device=device, max_autograd_bytes=int(args.max_autograd_gib * 2**30),
                            repeats=repeats, estimated_bytes=_extrapolated(rows, network, method, num_steps))
                row = run_worker(spec, args.timeout)
                rows.append(row)
                shown = row.get("error") or row.get("skipped") or (
                    f"peak {fmt_bytes(row['peak_bytes'])} MiB, saved {fmt_saved(row)} KiB, "
                    f"total/sampling {row['total_s'] / row['sample_s']:.2f}")
                print(f"[{time.perf_counter() - started:6.0f} s] {network} {method:10s} N={num_steps:<4d} {shown}",
                      flush=True)
    gammas = [float(g) for g in args.accuracy_gammas.split(",") if g]
    accuracy_batch = 2 if args.tiny else 4
    accuracy = accuracy_rows(args.threads, 4 if args.tiny else args.accuracy_steps, gammas, accuracy_batch, args.tiny)
    measure = ("CUDA max_memory_allocated above the allocation before the run" if device == "cuda" else
               "peak bytes allocated through malloc (glibc mallinfo2, sampled after every network call and at the "
               "end) above those allocated before the run, fresh process per row; \"RSS\" = peak resident set size "
               "above VmRSS before the run, which freed memory kept by the allocator can hide")
    result = dict(
        command=COMMAND, device=device, networks=list(plan), batch={n: b for n, (_, b, _) in plan.items()},
        repeats={n: r for n, (_, _, r) in plan.items()},
        memory_measure=measure, memory_measure_short="CUDA allocator" if device == "cuda" else "CPU, malloc",
        time_measure="wall time (CUDA synchronised)" if device == "cuda" else "CPU time of the process (time.process_time)",
        machine=dict(platform=platform.platform(), torch=torch.__version__, torch_threads=args.threads,
                     cpu_count=os.cpu_count(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS")),
        rows=rows, accuracy=accuracy, accuracy_batch=accuracy_batch,
        accuracy_network=NETWORKS["tiny" if args.tiny else "digits"][0],
        flatness={n: {m: flatness(rows, n, m) for m in METHODS} for n in plan},
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gradients.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out_dir / "gradients.md", result)
    write_plot(out_dir / "gradients.png", result)
    print(f"wrote {out_dir / 'gradients.md'}, gradients.json, gradients.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
