"""Joining and leaving a torchrun process group (bdia.distributed) on the CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each rank joins through bdia, then imports what a run imports after joining (transformers' model code, which
# imports torch.distributed.nn.functional, and torch's optimisers and FSDP, whose functions default to the
# world group), gathers once, leaves through the exit handler, and lists its threads.
_RANK_SCRIPT = r"""
import glob, importlib, os
import bdia.distributed as bd

ctx, _ = bd.init_distributed("cpu")
assert ctx.enabled and ctx.backend == "gloo", ctx
import torch.distributed as dist
for name in ["transformers.modeling_utils", "torch.distributed.optim", "torch.distributed.fsdp"]:
    importlib.import_module(name)
bd.gather(ctx, ctx.rank)
bd._destroy()
threads = sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm"))
os.write(1, f"rank {ctx.rank} initialized={dist.is_initialized()} threads={threads}\n".encode())  # one write per line
"""


def test_leaving_the_group_stops_gloo_threads_even_after_later_imports(tmp_path):
    """A group still referenced after ``destroy_process_group`` keeps gloo's threads alive into interpreter
    teardown, which aborted a few torchrun exits in a hundred with "terminate called without an active
    exception". Leaving must stop them, whatever the run imported after joining."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [line.split()[1] for line in lines] == ["0", "1"], result.stdout
    for line in lines:
        assert "initialized=False" in line, line
        assert "gloo" not in line, line  # gloo_tcp_loop / pt_gloo_runloop outliving the group
