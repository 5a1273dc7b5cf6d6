"""Devices, distributed set-up (torchrun / torch.distributed), seeding."""

from __future__ import annotations

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


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str = "auto") -> torch.device:
    """The recipe's ``device``: ``auto`` (the local rank's GPU when there is one, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; a name that is no device, or a GPU this machine lacks, is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MtkitError(f"device '{name}' is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MtkitError(f"device '{name}' asked for, but this machine has no CUDA GPU: use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MtkitError(f"device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise MtkitError(f"device '{name}' is not supported: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------- precision and compilation
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a model runs: autocast dtype (None: fp32), channels_last memory format, torch.compile backend (None:
    eager). ``resolve_precision`` turns a recipe's ``amp`` / ``channels_last`` / ``compile`` keys into one."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: str | None = None
    device_type: str = "cpu"

    def autocast(self):
        """The autocast context of a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in the model's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def apply(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module in the memory format; compiled when asked (returns the compiled wrapper, which shares the
        module's parameters)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile is not None:
            return torch.compile(module, backend=self.compile)
        return module


def resolve_precision(amp: str, channels_last: bool | str, compile: bool | str, device: torch.device,
                      where: str = "train") -> Precision:
    """A recipe's precision keys on ``device``: ``amp`` bf16 | fp16 | off | auto (auto: bf16 on CUDA, fp32 on the
    CPU), ``channels_last`` true | false | auto (auto: on CUDA), ``compile`` false | true (inductor) | a backend
    name of ``torch._dynamo.list_backends`` (e.g. aot_eager, to tell a compiler bug from a model bug)."""
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = "bf16" if cuda else "off"
    if amp not in ("off", *AMP_DTYPES):
        raise MtkitError(f"{where}.amp: '{amp}' is no precision; use bf16, fp16, off or auto")
    backend: str | None = None
    if compile is True:
        backend = "inductor"
    elif isinstance(compile, str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if compile not in known:
            raise MtkitError(f"{where}.compile: no torch.compile backend '{compile}'; use true (inductor), false or "
                             f"one of {', '.join(sorted(known))}")
        backend = compile
    return Precision(AMP_DTYPES.get(amp), channels_last is True or (channels_last == "auto" and cuda), backend,
                     device.type)


def resolve_pin_memory(setting: bool | str, device: torch.device) -> bool:
    """``data.pin_memory``: true, false or auto (on when the batches go to a GPU)."""
    return setting if setting != "auto" else device.type == "cuda"


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


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` summed over the ranks (in place; unchanged in a single process). Integer counts sum exactly."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's MemAvailable (Linux), else its total."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
