"""torchrun helpers. Single-process runs take the same code path with world size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        chosen = torch.device("cuda", torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # MEMSEG_DIST_BACKEND=gloo runs several processes on one GPU (NCCL refuses that).
        backend = os.environ.get("MEMSEG_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, chosen)


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def mean_across_ranks(values: dict[str, torch.Tensor], info: Dist) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over ranks in one all-reduce."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    stacked /= info.world_size
    return dict(zip(keys, stacked.unbind(), strict=True))


def gather_objects(value, info: Dist) -> list:
    """Every rank's picklable `value`, in rank order (a one-element list in a single process)."""
    if not info.enabled:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def gather_rows(tensors: list[torch.Tensor], info: Dist) -> list[torch.Tensor]:
    """Concatenate per-rank row tensors in rank order, identically on every rank. Every rank must
    pass tensors of the same shapes (the memory candidates are a fixed C x k rows per rank), so no
    row count is exchanged and nothing waits on the host."""
    if not info.enabled:
        return tensors
    gathered = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        gathered.append(torch.cat(parts))
    return gathered


def broadcast_state(module: torch.nn.Module, info: Dist, buffers_only: bool = False) -> None:
    """Make every rank hold rank 0's parameters (unless buffers_only) and buffers."""
    if not info.enabled:
        return
    tensors = list(module.buffers())
    if not buffers_only:
        tensors = list(module.parameters()) + tensors
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(module: torch.nn.Module, info: Dist) -> None:
    """Average gradients over ranks in one flat all-reduce. Methods call their sub-modules
    directly (student, heads, selectors), so synchronisation is explicit rather than through a
    DistributedDataParallel wrapper; parameters without a gradient reduce zeros."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone()
        offset += size
