"""The paper's training augmentation (sec. 4) as batched tensor operations on the training device.

Loader workers only slice uint8 arrays from the prepared cache (``data.cache``); after the batch is assembled and
moved to the device, ``augment_segmentation`` and ``augment_video`` apply a horizontal flip (labels and intrinsics
follow) and colour jitter, each sample with its own parameters. The parameters are drawn ahead, per epoch, from a
generator seeded by (seed, epoch, rank, dataset) (``draw_params``), so a resumed run sees the same draws.

The distributions are those of torchvision's per-sample ``ColorJitter`` (a random order of the four adjustments,
factors uniform in [max(0, 1 - v), 1 + v], hue uniform in [-v, v]) and a fair coin for the flip; the pixel
operations are torchvision's own (``torchvision.transforms.v2.functional``) with a factor per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.schema import AugmentConfig

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter order indices


@dataclass(frozen=True)
class AugmentParams:
    """One draw per sample: ``flip`` (N,) bool, ``order`` (N, 4) a permutation of the four adjustments, and the
    factors (N,) for brightness, contrast, saturation and hue (``None`` where the recipe switches one off)."""

    flip: torch.Tensor
    order: torch.Tensor
    factors: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    #: ``order`` as Python tuples, read on the host when the parameters are drawn (once per epoch): the jitter
    #: groups the samples by it without reading anything back from the device
    orders: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.orders is None:
            object.__setattr__(self, "orders", tuple(map(tuple, self.order.cpu().tolist())))

    def __getitem__(self, sl: slice) -> AugmentParams:
        return AugmentParams(self.flip[sl], self.order[sl], tuple(None if f is None else f[sl] for f in self.factors),
                             self.orders[sl] if self.orders is not None else None)

    def to(self, device: torch.device) -> AugmentParams:
        return AugmentParams(self.flip.to(device), self.order.to(device),
                             tuple(None if f is None else f.to(device) for f in self.factors), self.orders)


def factor_ranges(cfg: AugmentConfig) -> list[tuple[float, float] | None]:
    """ColorJitter's ranges: [max(0, 1 - v), 1 + v] for brightness, contrast, saturation, [-v, v] for hue; None
    for an adjustment switched off (v = 0), which torchvision skips too."""
    ranges: list[tuple[float, float] | None] = [
        (max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None for v in (cfg.brightness, cfg.contrast, cfg.saturation)]
    ranges.append((-cfg.hue, cfg.hue) if cfg.hue > 0 else None)
    return ranges


def draw_params(cfg: AugmentConfig | None, n: int, generator: torch.Generator) -> AugmentParams:
    """``n`` independent draws of flip and jitter parameters from ``generator`` (no augmentation: ``cfg`` None)."""
    flip = torch.rand(n, generator=generator) < 0.5
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # a uniformly random permutation per sample
    draws = torch.rand(4, n, generator=generator)
    if cfg is None:
        return AugmentParams(torch.zeros(n, dtype=torch.bool), order, (None, None, None, None))
    factors = tuple(None if r is None else r[0] + (r[1] - r[0]) * draws[i] for i, r in enumerate(factor_ranges(cfg)))
    return AugmentParams(flip & cfg.hflip, order, factors)  # type: ignore[arg-type]


def _per_sample(f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return f.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (a * ratio + b * (1.0 - ratio)).clamp(0, 1)


def _adjust(x: torch.Tensor, which: int, f: torch.Tensor) -> torch.Tensor:
    """One of ColorJitter's adjustments of images (N, ..., 3, H, W) in [0, 1], factor ``f`` (N,) per sample."""
    import torchvision.transforms.v2.functional as TF  # a second to import: only when training runs
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    r = _per_sample(f, x)
    if which == BRIGHTNESS:
        return (x * r).clamp(0, 1)
    if which == CONTRAST:  # blend with the mean gray value of each image
        return _blend(x, TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), r)
    if which == SATURATION:
        return _blend(x, TF.rgb_to_grayscale(x), r)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + r.squeeze(-3)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def colour_jitter(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Colour jitter of images (N, ..., 3, H, W) in gray values 0..255, each sample with its own order and factors
    (every frame of a triplet with its sample's); the result is float in 0..255.

    At each of the four positions of the order, the samples are grouped by the adjustment they take there, from
    the orders read on the host when the parameters were drawn (``AugmentParams.orders``), and each group is
    adjusted through index tensors sent to the device without waiting: no boolean mask and nothing read back from
    a GPU. The parameters stay where they were drawn (the CPU)."""
    x = images.float() / 255.0
    n = x.shape[0]
    assert p.orders is not None
    for position in range(4):
        groups: dict[int, list[int]] = {}
        for i, o in enumerate(p.orders):
            groups.setdefault(o[position], []).append(i)
        for which, members in sorted(groups.items()):
            f = p.factors[which]
            if f is None:
                continue
            if len(members) == n:
                x = _adjust(x, which, f.to(x.device, non_blocking=True))
                continue
            rows = torch.tensor(members)
            index = rows.to(x.device, non_blocking=True)
            factor = f[rows].to(x.device, non_blocking=True)
            x = x.index_copy(0, index, _adjust(x.index_select(0, index), which, factor))
    return x.clamp(0, 1) * 255.0


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.reshape(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def flip_intrinsics(k: torch.Tensor, flip: torch.Tensor, width: int) -> torch.Tensor:
    """Intrinsics (N, 4, 4) of the horizontally flipped images: c_x → (W - 1) - c_x where ``flip``."""
    k = k.clone()
    k[:, 0, 2] = torch.where(flip, (width - 1) - k[:, 0, 2], k[:, 0, 2])
    return k


def augment_segmentation(images: torch.Tensor, labels: torch.Tensor, p: AugmentParams
                         ) -> dict[str, torch.Tensor]:
    """A batch of uint8 crops (N, 3, H, W) and labels (N, H, W) → ``image`` float 0..255 flipped and jittered,
    ``label`` int64 flipped alike."""
    flip = p.flip.to(images.device, non_blocking=True)
    return {"image": colour_jitter(_flip(images, flip), p),
            "label": _flip(labels, flip).long()}


def augment_video(frames: torch.Tensor, k: torch.Tensor, p: AugmentParams) -> dict[str, torch.Tensor]:
    """A batch of uint8 triplets (N, 3, 3, H, W) with intrinsics (N, 4, 4) → ``frames`` flipped and jittered (the
    same jitter for the three frames of a sample), ``frames_raw`` flipped only (for the photometric loss), ``K``."""
    flip = p.flip.to(frames.device, non_blocking=True)
    raw = _flip(frames, flip).float()
    return {"frames": colour_jitter(raw, p), "frames_raw": raw,
            "K": flip_intrinsics(k.float(), flip, frames.shape[-1])}
