"""Throughput benchmarks (pytest-benchmark). ``mtkit bench`` runs them with timing on, saves and compares; the
test suite runs them once with ``--benchmark-disable`` so they keep working.

Side-by-side comparisons are measured in the same run, interleaved, and reported as ratios in ``extra_info``:
the toolkit's training step vs a hand-written plain-PyTorch step of the same network and losses, the FGSM sweep
vs 7 independent FGSM runs, and PGD vs torchattacks' PGD on the same model and inputs.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from bench_support import (
    DEVICE,
    SIZES,
    count_flops,
    input_gradient_flops,
    make_trainer,
    record_flops,
    rounds,
    sync,
    synced,
)

from mtkit.bench.ops import count_ops
from mtkit.models.decoders import disp_to_depth
from mtkit.models.pose import transformation_from_parameters
from mtkit.ops.losses import IGNORE_INDEX, MonodepthLoss
from mtkit.perturbations import FGSM, PGD, AttackContext, fgsm, fgsm_direction, pgd

EPSILONS = [0.25, 0.5, 1, 2, 4, 8, 16]


class UnitRange(torch.nn.Module):
    """The segmenter on images in [0, 1] (torchattacks' convention); mtkit's attacks use gray values 0..255."""

    def __init__(self, segmenter: torch.nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.segmenter(z * 255.0)


def _median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(a, b, n: int) -> tuple[float, float]:
    """Median seconds of a and b, measured alternately (after a warm-up call each when n > 1), so drift hits
    both alike."""
    if n > 1:
        a(), b()
    ta, tb = [], []
    for _ in range(n):
        ta.append(_median_seconds(a, 1))
        tb.append(_median_seconds(b, 1))
    return statistics.median(ta), statistics.median(tb)


def plain_pytorch_step(model, depth_loss: MonodepthLoss, optimizer, seg, dep, lam: float, cw) -> float:
    """The same network and losses, written by hand: one encoder pass over both batches, gradient hooks for eq. 5,
    weighted cross-entropy (eq. 1), the depth loss (eq. 2-4), Adam."""
    x, y = seg["image"], seg["label"]
    n = x.shape[0]
    size = tuple(x.shape[-2:])
    inputs = x if dep is None else torch.cat([x, dep["frames"][:, 1]])
    feats = model.encoder(model.normalize(inputs))
    seg_feats = [f[:n] for f in feats]
    if dep is not None:
        for f in seg_feats:
            f.register_hook(lambda g: g * lam)
    logits = model.seg_head(seg_feats, size)
    ce = F.cross_entropy(logits, y, weight=cw, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = ce / (y != IGNORE_INDEX).sum().clamp_min(1)
    if dep is not None:
        depth_feats = [f[n:] for f in feats]
        for f in depth_feats:
            f.register_hook(lambda g: g * (1 - lam))
        sigmas = model.depth_head(depth_feats, size)
        disp = {s: disp_to_depth(v, model.cfg.min_depth, model.cfg.max_depth)[0] for s, v in sigmas.items()}
        frames = dep["frames"]
        b = frames.shape[0]  # both frame pairs in one pass of the pose net, in temporal order; the past one inverted
        pairs = torch.cat([frames[:, 0:2].flatten(1, 2), frames[:, 1:3].flatten(1, 2)])
        pose = model.pose_net
        aa, tt = pose.decoder(pose.encoder((pairs - pose.mean) / pose.std)[-1])
        poses = {-1: transformation_from_parameters(aa[:b], tt[:b], invert=True),
                 1: transformation_from_parameters(aa[b:], tt[b:])}
        raw = dep["frames_raw"]
        loss = loss + depth_loss(disp, [raw[:, 0], raw[:, 1], raw[:, 2]], dep["K"], poses).total
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@pytest.mark.parametrize("size", ["quick", "paper"])
@pytest.mark.parametrize("multitask", [True, False], ids=["multitask", "single"])
def test_train_step(benchmark, size, multitask, peak):
    """One training step of the toolkit's trainer (images/s, FLOP/s and its fraction of the matmul peak); ratio
    vs the plain-PyTorch step of the same net."""
    if benchmark.disabled and size == "paper":
        pytest.skip("paper size only under mtkit bench (the suite checks that the step runs at the quick size)")
    s = make_trainer(size, multitask)
    tr = s.trainer
    n = 5 if size == "quick" else 2
    toolkit, plain = _interleaved(lambda: tr.train_step(s.seg, s.dep),
                                  lambda: plain_pytorch_step(tr.model, tr.depth_loss, tr.optimizer, s.seg, s.dep,
                                                             tr.spec.lam, tr.seg_loss.weights),
                                  rounds(benchmark, 3 * n))
    benchmark.extra_info.update(images_per_step=s.images, overhead_vs_plain_pytorch=toolkit / plain - 1,
                                plain_pytorch_images_per_s=s.images / plain)
    # the reference computes the toolkit's loss: one step of each on fresh, identical models and the same batch
    a, b = make_trainer(size, multitask), make_trainer(size, multitask)
    terms = a.trainer.train_step(a.seg, a.dep)
    ours = terms["seg"] + terms.get("depth", 0.0)
    theirs = plain_pytorch_step(b.trainer.model, b.trainer.depth_loss, b.trainer.optimizer, b.seg, b.dep,
                                b.trainer.spec.lam, b.trainer.seg_loss.weights)
    assert float(ours) == pytest.approx(theirs, rel=1e-5)
    flops = count_flops(tr.train_step, s.seg, s.dep)
    _, ops = count_ops(tr.train_step, s.seg, s.dep)  # the CPU-side proxy of kernel launches and host syncs
    benchmark.extra_info.update(aten_ops=ops.total, kernel_ops=ops.kernels, host_syncs=sum(ops.syncs.values()))
    benchmark.pedantic(synced(tr.train_step), args=(s.seg, s.dep), rounds=n, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = s.images / benchmark.stats.stats.median if benchmark.stats else None
    record_flops(benchmark, flops, peak)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["bf16", "channels_last", "compile"])
def test_train_step_precision(benchmark, mode, peak):
    """The multi-task step at the quickstart size in bf16 autocast / channels_last / torch.compile (inductor) vs
    fp32 eager, interleaved in the same run (ratio of medians; > 1: faster). Only under mtkit bench (compiling
    takes minutes on a CPU; ``MTKIT_BENCH_PRECISION_SIZE=paper`` measures at 640x192, which a GPU wants)."""
    if benchmark.disabled:
        pytest.skip("timing only: the suite proves these modes in tests/test_scale.py")
    size = os.environ.get("MTKIT_BENCH_PRECISION_SIZE", "quick")
    base = make_trainer(size, True)
    s = make_trainer(size, True, **{"bf16": {"amp": "bf16"}, "channels_last": {"channels_last": True},
                                    "compile": {"compile": True}}[mode])
    s.trainer.train_step(s.seg, s.dep)  # compiles
    eager, other = _interleaved(lambda: base.trainer.train_step(base.seg, base.dep),
                                lambda: s.trainer.train_step(s.seg, s.dep), 3)
    benchmark.extra_info.update(images_per_step=s.images, speedup_vs_fp32_eager=eager / other, size=size)
    benchmark.pedantic(synced(s.trainer.train_step), args=(s.seg, s.dep), rounds=3, iterations=1, warmup_rounds=0)
    record_flops(benchmark, count_flops(base.trainer.train_step, base.seg, base.dep), peak)


def test_segmenter_inference(benchmark, trained_segmenter, peak):
    """Segmentation network inference at the quickstart size (images/s, FLOP/s)."""
    seg, x, _ = trained_segmenter

    def infer():
        with torch.inference_mode():
            return seg(x)

    out = benchmark(synced(infer))
    assert out.shape == (x.shape[0], 19, *x.shape[-2:])
    benchmark.extra_info["images"] = x.shape[0]
    with torch.no_grad():
        record_flops(benchmark, count_flops(seg, x), peak)


def test_pgd_sweep_batched(benchmark, trained_segmenter, peak):
    """PGD over the paper's 7 ε with every ε copy in one batch (pgd_sweep) vs one ε after another (pgd), same
    iterations (1, 1, 2, 3, 5, 10, 20 capped at 3 here to keep the run short), interleaved; identical outputs."""
    seg, x, y = trained_segmenter
    x, y = x[:2], y[:2]
    ctx = AttackContext(seg, None, torch.Generator().manual_seed(0))
    iters = {e: min(3, max(1, math.ceil(min(e + 4, 1.25 * e)))) for e in EPSILONS}
    attack = PGD(PGD.Options(iterations=iters))

    def per_epsilon():
        return {e: pgd(ctx, x, y, e, iterations=iters) for e in EPSILONS}

    batched, single = _interleaved(lambda: attack.sweep(ctx, x, y, EPSILONS), per_epsilon, rounds(benchmark, 3))
    benchmark.extra_info.update(images=x.shape[0], speedup_batched_vs_per_epsilon=single / batched)
    out = benchmark.pedantic(synced(attack.sweep), args=(ctx, x, y, EPSILONS), rounds=rounds(benchmark, 3),
                             iterations=1)
    ref = per_epsilon()
    assert all(torch.equal(out[e], ref[e]) for e in EPSILONS)
    record_flops(benchmark, input_gradient_flops(seg, x, y) * sum(iters.values()), peak)


def test_photometric_loss(benchmark, injected_slowdown, peak):
    """The depth loss alone (eq. 2-4, 4 scales, two source frames) at the quickstart size, batch 6."""
    h, w = SIZES["quick"]
    g = torch.Generator().manual_seed(0)
    b = 6
    disps = {s: (torch.rand(b, 1, h // 2**s, w // 2**s, generator=g) + 0.1).to(DEVICE) for s in range(4)}
    frames = [(torch.rand(b, 3, h, w, generator=g) * 255).to(DEVICE) for _ in range(3)]
    k = torch.eye(4).repeat(b, 1, 1)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = 0.58 * w, 1.92 * h, w / 2, h / 2
    k = k.to(DEVICE)
    pose = torch.eye(4).repeat(b, 1, 1)
    pose[:, 2, 3] = 0.5
    pose = pose.to(DEVICE)
    loss = MonodepthLoss()
    out = benchmark(injected_slowdown(synced(loss)), disps, frames, k, {-1: pose, 1: pose})
    assert torch.isfinite(out.total)
    record_flops(benchmark, count_flops(loss, disps, frames, k, {-1: pose, 1: pose}), peak)


def test_fgsm_sweep(benchmark, trained_segmenter, peak):
    """One FGSM sweep over the paper's 7 ε (one backward pass) vs 7 independent FGSM runs (7 backward passes)."""
    seg, x, y = trained_segmenter
    ctx = AttackContext(seg, None, torch.Generator().manual_seed(0))

    def independent():
        return {e: fgsm(x, fgsm_direction(ctx.input_gradient(x, y)), e).clamp(0, 255) for e in EPSILONS}

    sweep, seven = _interleaved(lambda: FGSM().sweep(ctx, x, y, EPSILONS), independent, rounds(benchmark, 3))
    benchmark.extra_info["speedup_vs_7_independent_runs"] = seven / sweep
    out = benchmark(synced(FGSM().sweep), ctx, x, y, EPSILONS)
    ref = independent()  # one gradient shared by the seven ε gives the seven runs' images exactly
    assert sorted(out) == EPSILONS and all(torch.equal(out[e], ref[e]) for e in EPSILONS)
    record_flops(benchmark, input_gradient_flops(seg, x, y), peak)


def test_pgd_iteration(benchmark, trained_segmenter, peak):
    """One PGD iteration (forward, backward, projection); ratio vs torchattacks' PGD when it is installed."""
    seg, x, y = trained_segmenter
    ctx = AttackContext(seg, None, torch.Generator().manual_seed(0))
    eps = 4.0
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    if torchattacks is not None:
        # torchattacks works on images in [0, 1] with nn.CrossEntropyLoss (no void label): same model, same step
        # the wrapper in eval mode: torchattacks restores the mode it found after each call, and a fresh module is in
        # training mode, which would switch the segmenter's BatchNorm to batch statistics from then on
        attack = torchattacks.PGD(UnitRange(seg).eval(), eps=eps / 255, alpha=1 / 255, steps=1, random_start=False)
        y_valid = y.clamp_max(18)
        ours, theirs = _interleaved(lambda: pgd(ctx, x, y_valid, eps, iterations=1),
                                    lambda: attack(x / 255.0, y_valid), rounds(benchmark, 5))
        benchmark.extra_info["ratio_vs_torchattacks"] = ours / theirs
        # the same step: a sign step of 1 gray value from the clean image (the losses differ by a positive factor
        # only, so their gradients' signs agree but where a gradient is ~0 and rounding decides)
        same = ((pgd(ctx, x, y_valid, eps, iterations=1) - attack(x / 255.0, y_valid) * 255).abs() < 1e-3)
        assert same.float().mean() > 0.999, float(same.float().mean())
    assert not seg.training
    out = benchmark(synced(pgd), ctx, x, y, eps, 1.0, 1)
    assert (out - x).abs().max() <= eps + 1e-4
    record_flops(benchmark, input_gradient_flops(seg, x, y), peak)
