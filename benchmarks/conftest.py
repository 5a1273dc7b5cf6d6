"""Fixtures of the throughput benchmarks: the toolkit's trainer and model at the quickstart size (64x192) and at
the paper's size (192x640, batch 12 single-task / 6 + 6 multi-task), random batches of the right shapes.

``MTKIT_BENCH_INJECT_SLEEP=<seconds>`` makes the photometric-loss benchmark sleep that long per call: the test of
``mtkit bench --compare`` uses it to prove that a regression is caught.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MTKIT_BENCH_THREADS", "2")))

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
    from mtkit.config import validate
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


@pytest.fixture(scope="session")
def trained_segmenter():
    """A segmenter (random weights: throughput does not depend on them) with images and labels at quickstart size."""
    from mtkit.config import ModelConfig
    from mtkit.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    h, w = SIZES["quick"]
    x = torch.rand(8, 3, h, w) * 255
    y = torch.randint(0, 19, (8, h, w))
    return model.segmenter().eval(), x, y


@pytest.fixture
def injected_sleep(monkeypatch):
    """Seconds of sleep injected into the photometric loss (0 unless MTKIT_BENCH_INJECT_SLEEP is set)."""
    seconds = float(os.environ.get("MTKIT_BENCH_INJECT_SLEEP", "0"))
    if seconds > 0:
        import mtkit.losses as losses

        real = losses.photometric_error

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(losses, "photometric_error", slow)
    return seconds
