"""Which samples each training step sees: seeded per (seed, epoch) so an epoch's batches are known in advance
(exact resume), sharded over DDP ranks with ``DistributedSampler``."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .errors import MtkitError
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


def batch_loader(dataset, batches: list[list[int]], workers: int, seed: int, pin_memory: bool = False
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """The batches, loaded by ``workers`` processes; a user error raised in a worker (a corrupt image) surfaces as
    its own one-line message, not as the worker's traceback."""
    # a private generator: creating the iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    return unwrap_worker_errors(iter(loader))


def unwrap_worker_errors(iterator: Iterator) -> Iterator:
    """Re-raise an ``MtkitError`` from a DataLoader worker with its own message (torch wraps it in a traceback)."""
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except MtkitError as exc:
            raise type(exc)(worker_message(str(exc))) from None
        yield item


def worker_message(text: str) -> str:
    """The original message inside torch's 'Caught X in DataLoader worker process N ... Original Traceback'."""
    if "Original Traceback" not in text:
        return text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    start = next((i for i in range(len(lines) - 1, -1, -1) if re.match(r"^[\w.]*Error: ", lines[i])), len(lines) - 1)
    return re.sub(r"^[\w.]*Error: ", "", "\n".join(lines[start:]))
