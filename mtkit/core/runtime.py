"""Devices, distributed set-up (torchrun / torch.distributed), seeding, precision and the CUDA math policy."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import random
import warnings
from collections.abc import Iterator
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


# ------------------------------------------------------------------------------------- precision and compilation
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a model runs: autocast dtype (None: fp32), channels_last memory format, torch.compile backend (None:
    eager), and on CUDA whether fp32 matmuls and convolutions may use TF32 (``tf32``; see ``math_mode``).
    ``resolve_precision`` turns a recipe's ``amp`` / ``channels_last`` / ``compile`` / ``tf32`` keys into one."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: str | None = None
    device_type: str = "cpu"
    tf32: bool = False

    def autocast(self):
        """The autocast context of a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return fp32(self.device_type)
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
                      where: str = "train", tf32: bool = False) -> Precision:
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
                     device.type, bool(tf32))


# ------------------------------------------------------------------------------------------ the CUDA math policy
def tf32_flags(new: tuple[bool, bool] | None = None) -> tuple[bool, bool]:
    """Whether CUDA fp32 (matmuls, cuDNN convolutions) may use TF32; with ``new``, set them (the previous pair is
    returned).

    Set through the ``allow_tf32`` flags, PyTorch's first API, on purpose: on torch 2.13 every getter, old and
    new, answers after it (``allow_tf32``, ``torch.get_float32_matmul_precision()``, which inductor's autotuning
    reads, and the ``fp32_precision`` attributes), whereas a policy set through ``fp32_precision`` makes the
    ``allow_tf32`` getters and ``get_float32_matmul_precision()`` raise ("a mix of the legacy and new APIs"). A
    state that another library left mixed is read through the new attributes."""
    b = torch.backends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy flags warn that a newer API exists
        try:
            old = (bool(b.cuda.matmul.allow_tf32), bool(b.cudnn.allow_tf32))
        except RuntimeError:
            old = (b.cuda.matmul.fp32_precision == "tf32", b.cudnn.conv.fp32_precision in ("tf32", "none"))
        if new is not None:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = bool(new[0]), bool(new[1])
    return old


def fp32(device_type: str):
    """Autocast off on ``device_type``: the regions that stay fp32 under autocast (attack gradients, the pose,
    the disparity). A no-op on the ``meta`` device, which has no autocast backend: the device stand-in of the test
    suite (``tests/test_device_discipline.py``) runs the same code there."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


@contextlib.contextmanager
def math_mode(tf32: bool, deterministic: bool = False) -> Iterator[dict[str, object]]:
    """The CUDA math policy of one phase (training or evaluation), restored on exit; yields it as a dict (what
    ``environment.json`` records). No effect on CPU results.

    - ``tf32``: fp32 matmuls and convolutions may run in TF32 (10-bit mantissa; ~8x the fp32 rate on an H100).
      Training allows it by default (its forward runs in bf16 anyway); evaluation does not, so its "fp32" numbers
      and the fp32 attack gradients are IEEE fp32 (``train.tf32`` / ``robustness.tf32``).
    - ``deterministic``: cuDNN picks deterministic algorithms, cudnn.benchmark is off, cuBLAS gets a fixed
      workspace, and ``torch.use_deterministic_algorithms(True, warn_only=True)`` warns about the operations that
      stay nondeterministic on CUDA (the backward passes of grid_sample, bilinear upsampling and reflection
      padding accumulate with atomics). Otherwise cudnn.benchmark is on: the fastest algorithm per input shape.
    """
    b = torch.backends.cudnn
    old = (tf32_flags((bool(tf32), bool(tf32))), b.benchmark, b.deterministic,
           torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    b.benchmark, b.deterministic = not deterministic, deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield {"tf32": bool(tf32), "cudnn_benchmark": not deterministic, "deterministic": deterministic}
    finally:
        tf32_flags(old[0])
        b.benchmark, b.deterministic = old[1], old[2]
        torch.use_deterministic_algorithms(old[3], warn_only=old[4])
        if old[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
