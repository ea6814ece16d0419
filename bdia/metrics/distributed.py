"""torchrun helpers for metric evaluation: who am I, which images are mine, and putting rows back together.

Images are sharded by index, rank ``r`` of ``W`` taking ``r, r + W, r + 2W, …``; statistics are reduced
in float64 (:meth:`bdia.metrics.FeatureStats.all_reduce`), per-image rows (features for KID, CLIP scores)
are gathered back into the original order with :func:`gather_rows`.
"""

from __future__ import annotations

import os

import torch

__all__ = ["init_distributed", "rank_and_world", "shard_indices", "gather_rows", "is_main_process", "barrier"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment) unless already in
    one; ``backend`` defaults to nccl with CUDA, else gloo. Returns ``(rank, world_size)`` ((0, 1) alone)."""
    import torch.distributed as dist

    if _dist() is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> range:
    """The indices of ``n`` items this rank handles: ``range(rank, n, world)``."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return range(rank, int(n), world)


def gather_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble per-item rows computed on :func:`shard_indices` shards into ``[n, ...]`` in item order, on
    every rank (CPU tensors; without a process group ``rows`` is returned as is)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, rows.detach().cpu())
    out = torch.empty((int(n), *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
