"""Process-group set-up for one process or `torchrun`, and the run's seed policy.

`init()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (only when called, never at import),
picks NCCL on CUDA and gloo on CPU, and is a no-op for a single process. Model init is
identical on every rank (same seed); data order comes from the loaders, not from the seed.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise UserError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    if str(device).startswith("cuda"):
        index = int(str(device).split(":", 1)[1]) if ":" in str(device) else local
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} visible CUDA "
                            f"device(s); use --device cpu, or run where that GPU exists.")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for one process)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean_(tensors, world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world_size)


def broadcast_from_main(info: DistInfo, obj):
    """Rank 0's `obj` on every rank (other ranks pass anything); a plain return for one process."""
    if info.world_size == 1 or not dist.is_initialized():
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
