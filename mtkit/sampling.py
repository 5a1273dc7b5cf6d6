"""Which samples each training step sees: seeded per (seed, epoch) so an epoch's batches are known in advance
(exact resume), sharded over DDP ranks with ``DistributedSampler``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .runtime import Dist


def epoch_batches(n: int, batch: int, steps: int, seed: int, epoch: int, d: Dist) -> list[list[int]]:
    """This rank's index batches for one epoch: a DistributedSampler permutation (seeded by seed and epoch),
    cycled with fresh permutations when ``steps`` global batches need more samples than one pass gives."""
    local = batch // d.world
    out: list[int] = []
    rnd = 0
    while len(out) < steps * local:
        sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch * 1000 + rnd)
        out.extend(iter(sampler))
        rnd += 1
    return [out[i * local:(i + 1) * local] for i in range(steps)]


def batch_loader(dataset, batches: list[list[int]], workers: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    # a private generator: creating the iterator must not draw from the global RNG (exact resume)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                           generator=torch.Generator().manual_seed(seed)))
