"""Deterministic, resumable data streams for an iteration-based trainer.

Each stream (labelled, unlabelled, CutMix partner) yields one batch per iteration forever.
Its order is a pure function of ``(seed, epoch)`` and every sample's augmentation is drawn
from its own seed ``f(seed, epoch, position)``, so:

* the batches at iteration ``i`` do not depend on how many worker processes load them;
* resuming at iteration ``i`` only needs ``i``: the stream restarts at epoch ``i // epoch_len``
  and batch ``i % epoch_len`` without loading the skipped samples;
* under ``torchrun`` each rank takes every ``world_size``-th index of the epoch's permutation
  (as ``DistributedSampler`` does), so ranks see disjoint samples and the order is re-drawn
  every epoch.
"""

from __future__ import annotations

import random
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from semiseg.errors import ConfigError

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample, well spread over (seed, epoch, position)."""
    h = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & (2**64 - 1)
    h ^= h >> 31
    h = (h * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return h >> 1


class SeededDataset(Dataset):
    """Wraps a dataset: item ``(index, seed)`` seeds ``random``, numpy and torch, loads the
    sample, then restores the previous generator states (so the trainer's own randomness in
    the main process is left untouched when ``workers == 0``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class EpochBatchSampler(Sampler):
    """Batches of ``(index, seed)`` for one epoch of one rank, from batch ``start`` on."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        per_rank = max(num_samples // world_size, 1)
        self.batches_per_epoch = max(per_rank // batch_size, 1)

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        need = self.batches_per_epoch * self.batch_size * self.world_size
        order: list[int] = []
        while len(order) < need:  # a set smaller than one global batch is cycled
            order += torch.randperm(self.n, generator=g).tolist()
        order = order[:need]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self.epoch_indices(self.epoch)
        for b in range(self.start, self.batches_per_epoch):
            positions = range(b * self.batch_size, (b + 1) * self.batch_size)
            # Seeds depend on the global position so that ranks draw different augmentations.
            yield [(idx[p], sample_seed(self.seed, self.epoch, p * self.world_size + self.rank)) for p in positions]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def ignore_sigint(_worker_id: int) -> None:
    """``worker_init_fn`` of every loader: Ctrl-C is the main process's to handle (it finishes
    the step and saves); a worker that died of it would break the next batch instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Stream:
    """An endless, resumable batch stream over a dataset."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, workers: int = 0, rank: int = 0,
                 world_size: int = 1, name: str = "data", pin_memory: bool = False):
        if len(dataset) == 0:
            raise ConfigError(f"the {name} set is empty")
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=ignore_sigint if workers > 0 else None,
            pin_memory=pin_memory,
            generator=torch.Generator(),  # the loader's base seed must not consume the global RNG
        )

    @property
    def epoch_length(self) -> int:
        return self.sampler.batches_per_epoch

    def close(self) -> None:
        """Stop the worker processes now. Left to the garbage collector, a loader whose workers
        persist is finalised together with its queues in an arbitrary order: the stop message can
        then never reach the workers, and each one holds the collecting thread for the loader's
        5-second join timeout before it is killed (4 workers: a 20-second stall at some later,
        random point of the program)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def iterate_from(self, iteration: int) -> Iterator[dict]:
        epoch, start = divmod(iteration, self.epoch_length)
        while True:
            self.sampler.set_position(epoch, start)
            yield from self.loader
            epoch, start = epoch + 1, 0
