"""Data parallelism for `opd train` under torchrun: each rank samples and scores its own shard.

    torchrun --nproc_per_node 8 -m opd.client.cli train --student ... --teacher-url ...

Every rank takes the same seeded prompt order and keeps every world_size-th prompt of each
step, samples its rollouts (its own RNG stream: seed + rank), and scores them through its own
teacher client, so teacher traffic grows with the ranks. The student is wrapped in
DistributedDataParallel; the loss is the token mean over *all* ranks' tokens (DDP averages
gradients, so each rank scales its sum by world_size / global tokens). Rank 0 logs and writes
checkpoints; scalar metrics are averaged over ranks, per-depth metrics are rank 0's shard.
Communication is tensors only (gloo on CPU, nccl on GPU): no pickled objects between ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def join_single_rank(device: str) -> bool:
    """Under `torchrun --nproc_per_node 1` (it sets MASTER_ADDR and friends), join the one-rank
    process group that FSDP2 needs even alone (init_from_env joins only when WORLD_SIZE > 1,
    where DDP needs it). Returns whether a process group is now there."""
    if dist.is_initialized():
        return True
    if "MASTER_ADDR" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True


def device_for(device: str, info: DistInfo) -> str:
    """cuda -> cuda:<local_rank> under torchrun; anything else unchanged."""
    return f"cuda:{info.local_rank}" if info.enabled and device == "cuda" else device


def all_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_sum_array(values: np.ndarray, info: DistInfo) -> np.ndarray:
    """Element-wise sum of a float64 vector over ranks (every rank passes the same length)."""
    if not info.enabled:
        return values
    t = torch.from_numpy(np.asarray(values, dtype=np.float64).copy())
    dist.all_reduce(t)
    return t.numpy()


def mean_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average the scalar metrics every rank has (keys without '@'); keep rank 0's per-depth
    and per-teacher ones (`teacher/<name>/...`: a rank may hold no rollout of a teacher).
    All ranks must call it with the same other keys, which the trainer guarantees."""
    if not info.enabled:
        return metrics
    keys = sorted(k for k in metrics if "@" not in k and not k.startswith("teacher/"))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= info.world_size
    out = dict(metrics)
    out.update({k: float(v) for k, v in zip(keys, t.tolist(), strict=True)})
    return out


def gather_rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state, for rank 0's checkpoint (exact resume of each stream)."""
    state = torch.get_rng_state()
    if not info.enabled:
        return {"torch_cpu_rank0": state}
    states = [torch.empty_like(state) for _ in range(info.world_size)]
    dist.all_gather(states, state)
    return {f"torch_cpu_rank{r}": s for r, s in enumerate(states)}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
