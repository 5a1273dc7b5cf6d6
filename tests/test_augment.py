"""The batched augmentation on the device draws from the same distributions as torchvision's per-sample
ColorJitter and a fair flip, and its pixels equal torchvision's per-sample functions with the same parameters."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import ColorJitter

from mtkit.core.schema import AugmentConfig
from mtkit.data.augment import augment_segmentation, augment_video, colour_jitter, draw_params

N = 4000


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_drawn_parameters_follow_torchvision_colorjitter_and_a_fair_flip():
    cfg = AugmentConfig()
    p = draw_params(cfg, N, torch.Generator().manual_seed(0))
    jitter = ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    torch.manual_seed(1)
    ref = [ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
           for _ in range(N)]
    ref_flip = torch.tensor([random.Random(i).random() < 0.5 for i in range(N)])  # today's coin per sample
    # KS critical value at alpha = 0.001 for n = m = 4000: 1.95 * sqrt(2 / 4000) = 0.044
    for which in range(4):
        ours, theirs = p.factors[which], torch.tensor([r[1 + which] for r in ref])
        assert _ks(ours, theirs) < 0.044, which
        lo, hi = (-0.1, 0.1) if which == 3 else (0.8, 1.2)
        assert lo <= float(ours.min()) and float(ours.max()) <= hi
    assert abs(p.flip.float().mean() - ref_flip.float().mean()) < 0.05
    # the order: every one of the 24 permutations about equally often (chi-square, 23 dof, p = 1e-4: 53.5)
    perms = list(itertools.permutations(range(4)))
    for orders in (p.order.tolist(), [r[0].tolist() for r in ref]):
        counts = torch.tensor([orders.count(list(q)) for q in perms], dtype=torch.float64)
        assert float(((counts - N / 24) ** 2 / (N / 24)).sum()) < 53.5
    off = draw_params(AugmentConfig(hflip=False, brightness=0, hue=0), 64, torch.Generator().manual_seed(0))
    assert not off.flip.any() and off.factors[0] is None and off.factors[3] is None
    assert jitter.brightness is not None and ColorJitter(0, 0.2, 0.2, 0).brightness is None  # torchvision skips too


def _torchvision_reference(x: torch.Tensor, order: list[int], factors: list[float | None]) -> torch.Tensor:
    """Today's per-sample colour jitter: torchvision's functions, one sample at a time."""
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    y = x / 255.0
    for which in order:
        if factors[which] is not None:
            y = fns[which](y, factors[which])
    return y.clamp(0, 1) * 255.0


@pytest.mark.parametrize("shape", [(6, 3, 12, 20), (4, 3, 3, 10, 16)], ids=["images", "triplets"])
def test_batched_jitter_equals_torchvision_per_sample(shape, device):
    """On every device, the batched jitter equals torchvision's per-sample ColorJitter on the CPU."""
    torch.manual_seed(0)
    x = torch.rand(shape) * 255
    p = draw_params(AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), shape[0],
                    torch.Generator().manual_seed(3))
    out = colour_jitter(x.to(device), p.to(device))
    assert out.device.type == device.type
    out = out.cpu()
    assert len({tuple(o) for o in p.order.tolist()}) > 1  # several orders in one batch
    for i in range(shape[0]):
        ref = _torchvision_reference(x[i], p.order[i].tolist(), [float(f[i]) for f in p.factors])
        assert torch.allclose(out[i], ref, atol=2e-3), (i, float((out[i] - ref).abs().max()))


def test_flip_keeps_labels_aligned_and_raw_frames_uncoloured(device):
    image = torch.zeros(8, 3, 8, 10, dtype=torch.uint8)
    image[..., :3] = 255
    label = (image[:, 0] > 0).to(torch.uint8)
    p = draw_params(AugmentConfig(), 8, torch.Generator().manual_seed(0))
    out = {k: v.cpu() for k, v in augment_segmentation(image.to(device), label.to(device), p).items()}
    assert out["label"].dtype == torch.int64 and 0 < int(p.flip.sum()) < 8
    for i in range(8):
        bright = out["image"][i].mean(0) > out["image"][i].mean()
        assert torch.equal(bright.long(), out["label"][i])  # the label follows the image's flip
        assert torch.equal(out["label"][i], label[i].long().flip(-1) if p.flip[i] else label[i].long())
    frames = (torch.rand(8, 3, 3, 6, 10) * 255).to(torch.uint8)
    k = torch.eye(4).repeat(8, 1, 1)
    k[:, 0, 2] = 3.0
    v = {n: t.cpu() for n, t in augment_video(frames.to(device), k.to(device), p).items()}
    for i in range(8):
        f = frames[i].float().flip(-1) if p.flip[i] else frames[i].float()
        assert torch.equal(v["frames_raw"][i], f)  # the photometric loss sees the frames without colour change
        assert not torch.allclose(v["frames"][i], f)  # the network sees jittered colours
        assert torch.allclose(v["frames"][i, 0], _torchvision_reference(
            f[0], p.order[i].tolist(), [float(x[i]) for x in p.factors]), atol=2e-3)
        assert float(v["K"][i, 0, 2]) == (9 - 3.0 if p.flip[i] else 3.0)  # c_x -> (W - 1) - c_x
