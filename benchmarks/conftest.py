"""Fixtures of the throughput benchmarks: the toolkit's trainer and model at the quickstart size (64x192) and at
the paper's size (192x640, batch 12 single-task / 6 + 6 multi-task), random batches of the right shapes.

``MTKIT_BENCH_INJECT_SLOWDOWN=<factor>`` makes the photometric-loss benchmark compute its loss ``factor`` times per
call, a slowdown relative to this machine's own speed: the test of ``mtkit bench --compare`` uses it to prove that
a regression is caught.
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_support import DEVICE, SIZES, device_name, matmul_peak

torch.set_num_threads(int(os.environ.get("MTKIT_BENCH_THREADS", "2")))


@pytest.fixture(scope="session")
def peak() -> float:
    """The matmul peak in FLOP/s of the benchmark device (``MTKIT_BENCH_DEVICE``, default a GPU when present),
    measured once per run: fp32 on a CPU, bf16 on a GPU (its tensor cores' rate, what training under autocast
    can reach), so every benchmark's fraction of peak is against the device it ran on."""
    if DEVICE.type == "cuda":
        return matmul_peak(DEVICE, torch.bfloat16, 8192)
    return matmul_peak("cpu", torch.float32, 2048)


#: the benchmarks of the training phase (``test_train_step*``, the depth loss): timed under training's CUDA math
#: policy; every other one (inference, the attacks) under the evaluation's, as ``mtkit run`` enters them
TRAINING_BENCHMARKS = ("test_train_step", "test_photometric_loss")


def phase_policy(name: str) -> tuple[str, bool, bool]:
    """The phase a benchmark measures and that phase's default policy (tf32, deterministic) from the recipe
    schema: training allows TF32 (``train.tf32``), the evaluation does not (``robustness.tf32``)."""
    from mtkit.core.schema import RobustnessConfig, TrainConfig

    if name.startswith(TRAINING_BENCHMARKS):
        return "train", TrainConfig().tf32, TrainConfig().deterministic
    return "evaluation", RobustnessConfig().tf32, False


@pytest.fixture(autouse=True)
def _device_info(request):
    """Every benchmark records the device it ran on, and runs under the math policy of the phase it measures
    (``math_mode``), which it records too (``extra_info["math"]``)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    from mtkit.core.precision import math_mode

    info = request.getfixturevalue("benchmark").extra_info
    info["device"] = device_name()
    phase, tf32, deterministic = phase_policy(request.node.name)
    with math_mode(tf32, deterministic) as mode:
        info["math"] = {"phase": phase, **mode}
        yield


@pytest.fixture(scope="session")
def trained_segmenter():
    """A segmenter (random weights: throughput does not depend on them) with images and labels at quickstart size."""
    from mtkit.core.schema import ModelConfig
    from mtkit.recipe.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval().to(DEVICE)
    h, w = SIZES["quick"]
    x = torch.rand(8, 3, h, w) * 255
    y = torch.randint(0, 19, (8, h, w))
    return model.segmenter().eval(), x.to(DEVICE), y.to(DEVICE)


@pytest.fixture
def injected_slowdown():
    """Wraps a benchmarked callable so that each call runs it ``MTKIT_BENCH_INJECT_SLOWDOWN`` times (1 unless set):
    the median grows by that factor on any machine."""
    factor = int(os.environ.get("MTKIT_BENCH_INJECT_SLOWDOWN", "1"))

    def wrap(fn):
        def repeated(*args, **kwargs):
            for _ in range(factor - 1):
                fn(*args, **kwargs)
            return fn(*args, **kwargs)
        return repeated
    return wrap
