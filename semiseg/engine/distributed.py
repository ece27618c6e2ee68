"""torch.distributed set-up for ``torchrun``; a plain process is world size 1.

Gradients are averaged explicitly after ``backward`` (:func:`average_gradients`) instead of
wrapping the network in DistributedDataParallel: methods call the network several times per
step (eval-mode passes for pseudo labels, UniPerb's feature-perturbation pass, strong views),
which DDP's forward hooks do not model, and an explicit all-reduce keeps every method correct
unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL when the process will train on CUDA, gloo otherwise (the CPU case).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def resolve_device(pref: str, info: DistInfo) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    if pref.startswith("cuda") and not torch.cuda.is_available():
        from semiseg.errors import ConfigError

        raise ConfigError(f"config error: key 'train.device': {pref!r} requested but CUDA is not available")
    return torch.device(pref)


def average_in_place(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` over ranks in place, with one all-reduce of a flat buffer."""
    if world_size <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params, world_size: int) -> None:
    average_in_place([p.grad for p in params if p.grad is not None], world_size)


def average_batchnorm_stats(module: torch.nn.Module, world_size: int) -> None:
    """Average BatchNorm running statistics over ranks.

    On CUDA, SyncBatchNorm already keeps them equal; on the CPU (gloo) each rank would
    otherwise drift with its own batches, and eval-mode passes (pseudo labels, evaluation)
    would differ between ranks.
    """
    stats = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, torch.nn.SyncBatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    average_in_place(stats, world_size)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def all_reduce_means(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over ranks (every rank must pass the same keys)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
