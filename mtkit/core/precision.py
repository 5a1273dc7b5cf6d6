"""Precision and the CUDA math policy: the autocast dtype, channels_last and torch.compile of a phase
(``Precision``, ``resolve_precision``), TF32 and determinism (``math_mode``), the fp32 regions under autocast
(``fp32``), CUDA graphs (``resolve_cuda_graphs``) and pinned memory."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import MtkitError

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


def resolve_cuda_graphs(setting: bool | str, device: torch.device, distributed: bool) -> tuple[bool, str]:
    """``train.cuda_graphs``: whether the step is captured as CUDA graphs, and why. ``auto`` is on for one CUDA
    process (the training crops have static shapes: one capture serves every step) and off elsewhere; ``true``
    falls back to eager under DDP (its gradient all-reduce runs in hooks outside a captured graph) and is an
    error on a device without CUDA."""
    if setting is False:
        return False, "off (train.cuda_graphs: false)"
    if device.type != "cuda":
        if setting is True:
            raise MtkitError(f"train.cuda_graphs: true needs a CUDA device, this run is on {device}: set it to auto "
                             "(on for CUDA) or false")
        return False, f"off on {device.type} (CUDA graphs are CUDA's)"
    if distributed:
        return False, "off under DDP (its gradient all-reduce runs outside a captured graph): the eager step"
    return True, "on: forward, losses and backward captured and replayed (torch.compile mode reduce-overhead)"


def resolve_pin_memory(setting: bool | str, device: torch.device) -> bool:
    """``data.pin_memory``: true, false or auto (on when the batches go to a GPU)."""
    return setting if setting != "auto" else device.type == "cuda"
