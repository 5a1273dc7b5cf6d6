"""CPU-side proxies of GPU speed: the aten operators a call dispatches (a ``TorchDispatchMode``), the ones that
launch a kernel, the host synchronisations and the small-matrix products over many points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: aten operators that make the host wait for the device (reading a value back, or a data-dependent shape)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "_linalg_check_errors", "equal", "item",
                      "masked_select", "unique_dim", "_unique2", "bincount"})
#: Tensor methods that copy to the host (invisible to a dispatch mode on the CPU, where they are no copy at all)
SYNC_METHODS = ("tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__", "__index__")
#: matrix products whose one side is a small matrix (≤ 4 rows or columns) and the other more than this many points
#: belong in elementwise math (a 3x3 times 122,880 points ran as a 1.1 ms fp32 gemm on an H100)
LARGE_SMALL_MATMUL = 10_000


#: operators that only make a view or read metadata (no kernel on a GPU)
VIEW_OPS = frozenset({"detach", "view", "_unsafe_view", "slice", "select", "expand", "unbind", "alias", "as_strided",
                      "t", "transpose", "permute", "unsqueeze", "squeeze", "reshape", "_reshape_alias", "split",
                      "split_with_sizes", "chunk", "narrow", "movedim", "lift_fresh", "unfold", "diagonal", "empty",
                      "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_to_copy_view", "view_as"})


@dataclass
class OpCount:
    """What one call dispatched: every aten operator (``ops``), the ones that synchronise the host with the
    device (``syncs``: operators and host-copy Tensor methods), and the small-matrix products over many points
    (``small_matmuls``, shapes)."""

    ops: dict[str, int]
    syncs: dict[str, int]
    small_matmuls: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """The operators that run a kernel on a GPU (all but views, metadata and allocation)."""
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)


def count_ops(fn, *args, **kwargs) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` under a ``TorchDispatchMode`` that counts the aten operators it dispatches
    (forward and backward), and with the host-copy Tensor methods wrapped: the CPU-side proxy of a GPU step's
    kernel launches and host synchronisations."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    ops: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    small: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            ops[name] += 1
            if name in SYNC_OPS:
                syncs[name] += 1
            elif name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                    if i is not None):
                syncs[f"{name} (boolean mask)"] += 1  # a data-dependent shape: nonzero inside
            if name in ("bmm", "mm", "addmm", "baddbmm", "matmul") and len(args) >= 2:
                a, b = (x for x in args[-2:])
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    (m, k), n = a.shape[-2:], b.shape[-1]
                    if min(m, k, n) <= 4 and max(m, n) > LARGE_SMALL_MATMUL:
                        small.append((name, tuple(a.shape), tuple(b.shape)))
            return func(*args, **(kwargs or {}))

    originals = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

    def counting(method: str):
        real = originals[method]

        def call(self, *a, **k):
            syncs[f"Tensor.{method}"] += 1
            return real(self, *a, **k)
        return call

    try:
        for m in SYNC_METHODS:
            setattr(torch.Tensor, m, counting(m))
        with Mode():
            out = fn(*args, **kwargs)
    finally:
        for m, real in originals.items():
            setattr(torch.Tensor, m, real)
    return out, OpCount(dict(ops), dict(syncs), small)


# ------------------------------------------------------------------------------------------ projection of a run
