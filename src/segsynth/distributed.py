"""torch.distributed glue: rank and world size from torchrun, sharding, barriers.

Everything works unchanged in a single process (no torchrun): rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that locks and writes shared outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if world_size > 1 and device == "cpu":
        # Share the cores instead of oversubscribing them (2 procs x N threads on N cores thrash).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier, then tear down: without the barrier gloo may abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(items: list, rank: int, world_size: int) -> list:
    """Disjoint, covering, order-preserving shard: item i goes to rank i % world_size."""
    return items[rank::world_size]
