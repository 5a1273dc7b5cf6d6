"""Helpers of the benchmarks (imported by name: ``from bench_support import make_trainer``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZES = {"quick": (64, 192), "paper": (192, 640)}


def rounds(benchmark, n: int) -> int:
    """Rounds of a side-by-side comparison: n when benchmarking, 1 when the suite only checks that it runs."""
    return 1 if benchmark.disabled else n


@dataclass
class Setup:
    trainer: object
    seg: dict[str, torch.Tensor]
    dep: dict[str, torch.Tensor] | None
    images: int


def make_trainer(size: str, multitask: bool) -> Setup:
    from mtkit.recipe import validate
    from mtkit.train import Trainer

    h, w = SIZES[size]
    ds = {"name": "synthetic", "height": h, "width": w}
    recipe = validate({
        "name": "bench", "device": "cpu",
        "data": {"segmentation": ds, "segmentation_val": ds, "depth": {**ds, "name": "synthetic_video"}},
        "train": {"amp": "off", "channels_last": "off"},
        "models": [{"name": "m", "tasks": ["segmentation", "depth"] if multitask else ["segmentation"],
                    "lambda": 0.1}],
    })
    trainer = Trainer(recipe, recipe.models[0], "unused", progress=False)
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
    return Setup(trainer, seg, dep, b_seg + trainer.depth_batch)
