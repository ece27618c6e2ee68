"""Data streams: order is a function of (seed, epoch); resuming at iteration i replays exactly."""

import itertools
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from semiseg.engine.sampling import EpochBatchSampler, Stream


class Noisy(Dataset):
    """Returns its index and a random draw from each generator (as augmentations would)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"i": torch.tensor(i), "r": torch.tensor(random.random()), "n": torch.tensor(np.random.rand()),
                "t": torch.rand(())}


def take(stream, start, n):
    return [b for b in itertools.islice(stream.iterate_from(start), n)]


def test_resume_replays_identical_batches():
    full = take(Stream(Noisy(), 3, seed=5), 0, 9)
    resumed = take(Stream(Noisy(), 3, seed=5), 4, 5)
    for a, b in zip(full[4:], resumed):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_workers_do_not_change_the_data():
    a = take(Stream(Noisy(), 3, seed=1, workers=0), 0, 4)
    b = take(Stream(Noisy(), 3, seed=1, workers=2), 0, 4)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k])


def test_epochs_reshuffle_and_cover():
    s = EpochBatchSampler(10, 3, seed=0)
    assert s.batches_per_epoch == 3
    e0 = s.epoch_indices(0)
    e1 = s.epoch_indices(1)
    assert len(set(e0)) == 9 and e0 != e1


def test_ranks_are_disjoint():
    idx = [EpochBatchSampler(12, 2, seed=3, rank=r, world_size=3).epoch_indices(0) for r in range(3)]
    flat = sum(idx, [])
    assert len(flat) == len(set(flat)) == 12


def test_small_set_is_cycled_to_fill_a_batch():
    s = EpochBatchSampler(3, 8, seed=0)
    assert s.batches_per_epoch == 1
    assert len(s.epoch_indices(0)) == 8


def test_loading_leaves_main_process_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(Stream(Noisy(), 3, seed=9), 0, 2)
    assert torch.equal(torch.rand(3), expected)


def test_fit_stops_the_loader_workers_before_it_returns(train_run):
    """With ``data.workers`` > 0 the persistent loader processes are gone when ``fit`` returns,
    not left to the garbage collector (which, finalising a loader and its queues in an arbitrary
    order, held the program for 5 s per worker at some later point)."""
    import multiprocessing

    from conftest import tiny

    before = set(multiprocessing.active_children())  # any other test's, left to their own end
    train_run(tiny("data.workers=1", "method.name=fixmatch"), "workers")
    assert set(multiprocessing.active_children()) - before == set()
