"""Helpers of the benchmarks (imported by name: ``from bench_support import make_trainer``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mtkit.bench.runner import bench_device

SIZES = {"quick": (64, 192), "paper": (192, 640)}


DEVICE = bench_device()  # MTKIT_BENCH_DEVICE, else a GPU when present


def sync() -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a timer must not stop before them)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def synced(fn):
    """``fn`` followed by ``sync()``: what a benchmark times on any device."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out
    return call


def device_name() -> str:
    """The benchmarked device in words (the GPU's name, or the CPU with its thread count)."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({torch.get_num_threads()} threads)"


def rounds(benchmark, n: int) -> int:
    """Rounds of a side-by-side comparison: n when benchmarking, 1 when the suite only checks that it runs."""
    return 1 if benchmark.disabled else n


@dataclass
class Setup:
    trainer: object
    seg: dict[str, torch.Tensor]
    dep: dict[str, torch.Tensor] | None
    images: int


def make_trainer(size: str, multitask: bool, **train) -> Setup:
    """The toolkit's trainer for the benchmark device (``DEVICE``; fp32, no channels_last unless ``train`` says
    otherwise) and random batches of the right shapes already on it (a step's time excludes the copy)."""
    from mtkit.recipe.load import validate
    from mtkit.training.step import StepEngine

    h, w = SIZES[size]
    ds = {"name": "synthetic", "height": h, "width": w}
    recipe = validate({
        "name": "bench", "device": str(DEVICE),
        "data": {"segmentation": ds, "segmentation_val": ds, "depth": {**ds, "name": "synthetic_video"}},
        "train": {"amp": "off", "channels_last": False, **train},
        "models": [{"name": "m", "tasks": ["segmentation", "depth"] if multitask else ["segmentation"],
                    "lambda": 0.1}],
    })
    trainer = StepEngine(recipe, recipe.models[0])
    trainer.build(torch.ones(19))
    g = torch.Generator().manual_seed(0)
    b_seg = trainer.seg_batch
    seg = {"image": torch.rand(b_seg, 3, h, w, generator=g) * 255,
           "label": torch.randint(0, 19, (b_seg, h, w), generator=g)}
    dep = None
    if multitask:
        b = trainer.depth_batch
        frames = torch.rand(b, 3, 3, h, w, generator=g) * 255
        k = torch.eye(4).repeat(b, 1, 1)
        k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = 0.58 * w, 1.92 * h, w / 2, h / 2
        dep = {"frames": frames, "frames_raw": frames.clone(), "K": k}
    seg = {n: t.to(DEVICE) for n, t in seg.items()}
    dep = None if dep is None else {n: t.to(DEVICE) for n, t in dep.items()}
    return Setup(trainer, seg, dep, b_seg + trainer.depth_batch)


def count_flops(fn, *args) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by torch's own ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def input_gradient_flops(segmenter, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one attack gradient pass (forward, loss, backward to the input only) over the batch ``x``.
    Counted through ``.backward()`` with the weights frozen: FlopCounterMode's module tracker cannot follow the
    ``torch.autograd.grad`` that attacks call."""
    from mtkit.ops.losses import weighted_cross_entropy

    frozen = [p for p in segmenter.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        xr = x.clone().requires_grad_(True)
        return count_flops(lambda: weighted_cross_entropy(segmenter(xr), y, None).backward())
    finally:
        for p in frozen:
            p.requires_grad_(True)


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                rounds: int = 5) -> float:
    """The device's achievable matmul rate in FLOP/s: the best of ``rounds`` n x n matmuls (2n³ FLOPs each),
    measured in this run, so a fraction of it is comparable across machines of different speed."""
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def record_flops(benchmark, flops: int, peak: float) -> None:
    """FLOPs per call, achieved FLOP/s at the median time and its fraction of the measured matmul peak."""
    benchmark.extra_info.update(flops=flops, peak_flop_per_s=peak)
    if benchmark.stats:
        achieved = flops / benchmark.stats.stats.median
        benchmark.extra_info.update(flop_per_s=achieved, peak_fraction=achieved / peak)
