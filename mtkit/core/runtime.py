"""Devices, distributed set-up (torchrun / torch.distributed), seeding, precision and the CUDA math policy."""

from __future__ import annotations

import datetime
import itertools
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import MtkitError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def node_jobs() -> int:
    """``mtkit run --jobs`` processes running at once on this node (``MTKIT_JOBS``, set for each job; 1 otherwise):
    each takes its share of the cores for loader and prepare workers."""
    return max(1, int(os.environ.get("MTKIT_JOBS", "1")))


def memory_share() -> float:
    """This process's share of its GPU's memory (``MTKIT_MEMORY_SHARE``, set for each ``--jobs`` process: one
    over the jobs on that GPU; 1 otherwise): what the attack passes size themselves to."""
    share = float(os.environ.get("MTKIT_MEMORY_SHARE", "1"))
    return share if 0 < share <= 1 else 1.0


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend of a run on ``device``: ``MTKIT_DIST_BACKEND`` when set; else nccl when
    every process of the node has a GPU of its own (``device`` is the local rank's), gloo on the CPU or when
    processes share a GPU (NCCL refuses two ranks on one GPU; gloo takes CUDA tensors too)."""
    if os.environ.get("MTKIT_DIST_BACKEND"):
        return os.environ["MTKIT_DIST_BACKEND"]
    if device.type == "cuda" and local_world() <= torch.cuda.device_count() and device.index == local_rank():
        return "nccl"
    return "gloo"


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), on ``backend_for(device)``. On CUDA the
    process's GPU becomes its current device first, so NCCL and the object collectives use that GPU and not
    cuda:0 on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank())


def resolve_device(name: str = "auto") -> torch.device:
    """The recipe's ``device``: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    a name that is no device, or a GPU this machine lacks, is a one-line error. ``auto`` and ``cuda`` without an
    index take the local rank's GPU under torchrun (LOCAL_RANK modulo the GPU count: with more processes than
    GPUs, processes share them), cuda:0 otherwise; ``cuda:N`` is that GPU on every rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MtkitError(f"device '{name}' is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MtkitError(f"device '{name}' asked for, but this machine has no CUDA GPU: use device: auto or cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MtkitError(f"device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise MtkitError(f"device '{name}' is not supported: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------- distributed helpers
def current_dist() -> Dist:
    """The process group this process is in (set up by ``init_distributed``), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if d.enabled:
        dist.barrier()


_WAITS: dict[int, itertools.count] = {}
#: how long the other ranks wait for rank 0 to prepare the data (``MTKIT_PREPARE_TIMEOUT`` seconds, default 24 h):
#: a first paper-size run decodes Cityscapes and KITTI for far longer than NCCL's 10-minute collective timeout
PREPARE_TIMEOUT_S = 24 * 3600


def after_rank0(d: Dist, name: str, work, others: bool = True, store=None):
    """``work()`` on rank 0 while the other ranks wait, then (``others``) ``work()`` on them, which then finds rank
    0's result, a complete cache; without ``others`` they return None. The wait is on the process group's store
    with its own timeout (``PREPARE_TIMEOUT_S``, or ``MTKIT_PREPARE_TIMEOUT``), not a collective bound by the
    backend's timeout (NCCL's default: 10 minutes). A single process just works."""
    if not d.enabled:
        return work()
    store = store if store is not None else dist.distributed_c10d._get_default_store()
    key = f"mtkit/{name}/{next(_WAITS.setdefault(d.rank, itertools.count()))}"  # each rank counts its waits alike
    if d.main:
        try:
            return work()
        finally:  # released also when rank 0 fails, so that the others stop with their own error
            store.set(key, "1")
    seconds = float(os.environ.get("MTKIT_PREPARE_TIMEOUT", PREPARE_TIMEOUT_S))
    store.wait([key], datetime.timedelta(seconds=seconds))
    return work() if others else None


def collective_device() -> torch.device:
    """Where the process group's backend reduces: NCCL on this process's GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` summed over the ranks (in place, on whatever device ``t`` is; unchanged in a single process). Integer
    counts sum exactly. A CPU tensor under NCCL travels through this process's GPU, a GPU tensor under gloo
    through the CPU."""
    if d.enabled:
        where = collective_device()
        if where == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(where)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
    return t


def all_gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: on a GPU its free memory plus what this process's caching allocator holds
    without using (memory that training in the same process has released to the cache is available to the next
    phase), else the host's MemAvailable (Linux), else its total."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
