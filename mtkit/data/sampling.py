"""Which samples each training step sees: seeded per (seed, epoch) so an epoch's batches are known in advance
(exact resume), sharded over DDP ranks with ``DistributedSampler``."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..core.errors import MtkitError
from ..core.runtime import Dist


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


def evaluation_batches(n: int, batch: int, d: Dist) -> list[list[int]]:
    """This rank's batches of an evaluation set of ``n`` samples: the set in order, cut into batches of ``batch``,
    batch k to rank k mod world. Every sample is counted once (no padding, unlike ``DistributedSampler``), and each
    batch holds the same images as in a single process, so sharded results equal one process's exactly."""
    return [list(range(s, min(s + batch, n))) for k, s in enumerate(range(0, n, batch)) if k % d.world == d.rank]


class EpochLoader:
    """One DataLoader for a whole training run: each epoch hands it that epoch's batches of keys (``epoch``), so
    ``persistent_workers`` keeps the worker processes between epochs. A user error raised in a worker (a corrupt
    file) surfaces as its own one-line message, not as the worker's traceback."""

    def __init__(self, dataset: Dataset, workers: int, pin_memory: bool = False, persistent: bool = True) -> None:
        self.batches: list[list] = []
        self.loader = DataLoader(dataset, batch_sampler=self, num_workers=workers, pin_memory=pin_memory,
                                 persistent_workers=persistent and workers > 0)

    def __iter__(self) -> Iterator[list]:  # the batch sampler: the current epoch's batches
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, batches: list[list]) -> Iterator[dict[str, torch.Tensor]]:
        self.batches = batches
        return unwrap_worker_errors(iter(self.loader))


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
