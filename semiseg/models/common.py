"""Two torch helpers every layer above shares: a network in eval mode for the length of a block,
and the rows of every process gathered into one tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (BatchNorm running statistics, no dropout); after
    it, also after an error, every submodule gets back its own train/eval mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def gather_from_ranks(rows: torch.Tensor) -> torch.Tensor:
    """All rows of every process, rank 0's first: ``(sum_r n_r, ...)``; ``rows`` itself when
    ``torch.distributed`` is not initialised or has one process.

    The row counts may differ between ranks, and ``all_gather`` needs equal shapes: the counts are
    gathered first, every rank pads its rows to the largest count, and the padding is cut off
    after the gather. Every rank returns the same tensor, so memories fed from it stay identical.
    No gradient flows through (memories take detached features only).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)])
