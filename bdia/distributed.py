"""Process groups for sampling and evaluating on several processes, started by an existing engine (no
home-made launcher). The one place that knows about ranks: the sampling apps, the metrics and the loggers all
use it.

* ``torchrun --standalone --nproc_per_node=K scripts/sample.py ...`` sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) for each of its K processes;
* a SLURM job array task started by Hydra's submitit launcher with ``tasks_per_node > 1`` gets the same
  variables from :class:`submitit.helpers.TorchDistributedEnvironment` (exported here).

:func:`init_distributed` reads them and joins the process group once per process (NCCL for CUDA devices,
gloo on the CPU); without them a run is one process (rank 0 of 1). A sampling run then shards its seeds
with :func:`shard` (rank r takes ``seeds[r::K]``), meets at :func:`barrier`, and rank 0 writes what needs
every rank's results (:func:`gather`). Metrics take the joined group's context (:func:`current`), evaluate
their :func:`shard_indices` and put per-image rows back in order (:func:`gather_rows`); loggers that start
before any group is joined ask :func:`launch_rank`.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DistContext", "context_from_env", "init_distributed", "barrier", "gather", "shard", "resolve_device",
           "current", "is_main_process", "launch_context", "launch_rank", "shard_indices", "gather_rows"]

MODES = ("auto", "required", "off")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" / "gloo" once a process group is joined, else None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's shared outputs, logs, and draws progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one process is in use."""
        return self.backend is not None and self.world_size > 1


def _int_env(env, key):
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _export_slurm_env(env) -> None:
    """Inside a multi-task SLURM job (submitit launcher, tasks_per_node > 1), export torch.distributed's
    variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) as submitit computes them."""
    if "RANK" in env or _int_env(env, "SLURM_NTASKS") in (None, 1) or "SLURM_JOB_ID" not in env:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:  # not a submitit job: leave the environment alone, run as one process
        return


def context_from_env(env=None) -> DistContext:
    """The rank layout the environment describes (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), without
    joining any process group. Missing variables mean a single process."""
    env = os.environ if env is None else env
    world_size = _int_env(env, "WORLD_SIZE") or 1
    rank = _int_env(env, "RANK") or 0
    local_rank = _int_env(env, "LOCAL_RANK")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent RANK={rank} / WORLD_SIZE={world_size} in the environment")
    return DistContext(rank=rank, world_size=world_size, local_rank=rank if local_rank is None else local_rank)


def resolve_device(device, local_rank: int | None = None) -> torch.device:
    """``"auto"`` (or ``None``): CUDA if available, else CPU. A CUDA device without an index becomes
    ``cuda:<local_rank>`` (one GPU per process under torchrun; default: ``LOCAL_RANK`` from the environment).
    Raises ``ValueError`` for unknown or unavailable devices."""
    if local_rank is None:
        local_rank = context_from_env().local_rank
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available here; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def launch_context(mode: str = "auto") -> DistContext:
    """This process's place among the processes torchrun (or a multi-task SLURM job) started, without joining
    a process group. ``mode``: ``"auto"`` reads the environment; ``"required"`` raises ``ValueError`` when no
    launcher started this process (``launcher=torchrun`` without torchrun); ``"off"``: one process."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return DistContext()
    _export_slurm_env(os.environ)
    ctx = context_from_env()
    if mode == "required" and ctx.world_size == 1 and "RANK" not in os.environ:
        raise ValueError(
            "distributed=required (launcher=torchrun) but this process was not started by torchrun; run "
            "`torchrun --standalone --nproc_per_node=K scripts/<app>.py ...` or drop launcher=torchrun"
        )
    return ctx


def init_distributed(device="auto", mode: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group that torchrun (or a multi-task SLURM job) describes, once per process.

    ``mode``: ``"auto"`` joins when the environment names more than one process; ``"required"`` raises
    ``ValueError`` when it does not (``launcher=torchrun`` started without torchrun); ``"off"`` ignores it.
    Returns the context and the device this process samples on (``cuda:<local_rank>`` for CUDA).
    The backend is NCCL for CUDA devices and gloo otherwise. The group is destroyed at interpreter exit.
    """
    ctx = launch_context(mode)
    device = resolve_device(device, ctx.local_rank)
    if mode == "off":
        return ctx, device
    if ctx.world_size == 1:
        return ctx, device
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _import_modules_that_default_to_the_world_group()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
        atexit.register(_destroy)
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, dist.get_backend()), device


# torch modules whose functions take ``group=dist.group.WORLD`` as a default argument: the default is evaluated
# when the module is imported, so importing one after the group is joined (transformers imports the first one
# when it loads a model) keeps a reference to the group that ``destroy_process_group`` cannot drop. The gloo
# backend's threads then outlive it and are torn down with the interpreter, which aborted 3 of 30 two-rank exits
# in a test ("terminate called without an active exception", exit -6, after the run's files are written).
# Imported before the group exists, their defaults are ``None``.
_WORLD_DEFAULT_MODULES = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
)


def _import_modules_that_default_to_the_world_group() -> None:
    import importlib

    for name in _WORLD_DEFAULT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a torch build without that part cannot capture the group either
            pass


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if ctx.enabled:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def gather(ctx: DistContext, obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for a single process."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def current() -> DistContext:
    """The context of the process group this process has joined (rank 0 of 1 when it has joined none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    local_rank = _int_env(os.environ, "LOCAL_RANK")
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), rank if local_rank is None else local_rank, dist.get_backend())


def is_main_process() -> bool:
    """Rank 0 of the joined process group (or a single process)."""
    return current().is_main


def launch_rank(env=None) -> int:
    """This process's rank as its launcher announced it (torchrun's ``RANK``, SLURM's ``SLURM_PROCID``), before
    any process group is joined; 0 when neither is set or readable."""
    env = os.environ if env is None else env
    for var in ("RANK", "SLURM_PROCID"):
        value = env.get(var)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def shard_indices(n: int, ctx: DistContext | None = None) -> range:
    """The indices of ``n`` items (images to evaluate) rank ``r`` of ``K`` handles: ``range(r, n, K)``."""
    ctx = current() if ctx is None else ctx
    return range(ctx.rank, int(n), ctx.world_size)


def gather_rows(rows: torch.Tensor, n: int, ctx: DistContext | None = None) -> torch.Tensor:
    """Reassemble per-item rows computed on :func:`shard_indices` shards into ``[n, ...]`` in item order, on
    every rank (CPU tensors; a single process gets ``rows`` back as is)."""
    ctx = current() if ctx is None else ctx
    if not ctx.enabled:
        return rows
    parts = gather(ctx, rows.detach().cpu())
    out = torch.empty((int(n), *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        out[r :: ctx.world_size] = part
    return out


def shard(seeds: Sequence[int], ctx: DistContext) -> list[int]:
    """The seeds rank ``r`` of ``K`` samples: ``seeds[r::K]``. (EDM's ``generate.py`` deals out whole batches
    round-robin instead.) Which rank draws an image does not change it: every image has its own generator."""
    return list(seeds[ctx.rank :: ctx.world_size])
