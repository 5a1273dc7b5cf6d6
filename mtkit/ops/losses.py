"""Losses of the paper: weighted cross-entropy (eq. 1), photometric (eq. 2), smoothness (eq. 3), depth (eq. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import register
from . import geometry

IGNORE_INDEX = 255


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """J^ce of eq. 1: -1/|I| Σ_i Σ_s w_s ȳ_{i,s} log y_{i,s}, averaged over the labelled (non-void) pixels.

    Void pixels (``ignore_index``) are left out of both sum and count. The normalisation is 1/|I| (the pixel
    count), not PyTorch's default Σ w of the weighted mean, as eq. 1 writes it.
    """
    per_pixel = F.cross_entropy(logits, labels, weight=weights, ignore_index=ignore_index, reduction="none")
    valid = (labels != ignore_index).sum().clamp_min(1)
    return per_pixel.sum() / valid


def weighted_cross_entropy_per_image(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """J^ce of eq. 1 of each image on its own (B,): ``weighted_cross_entropy`` of logits[i], labels[i] for every
    i at once (each image's sum over its labelled pixels over their count)."""
    per_pixel = F.cross_entropy(logits, labels, weight=weights, ignore_index=ignore_index, reduction="none")
    valid = (labels != ignore_index).flatten(1).sum(1).clamp_min(1)
    return per_pixel.flatten(1).sum(1) / valid


def enet_class_weights(class_counts: torch.Tensor, c: float = 1.02) -> torch.Tensor:
    """ENet class weights w_s = 1 / ln(c + p_s), p_s the class frequency over the training labels (eq. 1)."""
    p = class_counts.double() / class_counts.sum().clamp_min(1)
    return (1.0 / torch.log(c + p)).float()


def _pool3(t: torch.Tensor) -> torch.Tensor:
    """3x3 mean with reflection padding of images (..., C, H, W) (any leading dimensions)."""
    lead = t.shape[:-3]
    flat = F.pad(t.reshape(-1, *t.shape[-3:]), (1, 1, 1, 1), mode="reflect")
    return F.avg_pool2d(flat, 3, 1).view(*lead, *t.shape[-3:])


def ssim(x: torch.Tensor, y: torch.Tensor, c1: float = 0.01**2, c2: float = 0.03**2) -> torch.Tensor:
    """Per-pixel, per-channel SSIM on 3x3 patches with reflection padding, images in [0, 1] (eq. 2), in [-1, 1].

    ``x`` (..., C, H, W) and ``y`` broadcast against each other: a target x and a stack of its warped sources y
    (K, B, C, H, W) pool x's statistics once. Reflection padding commutes with the elementwise products, so
    pooling pad(x·y) equals pooling pad(x)·pad(y) exactly.
    Not clamped: the loss term (1 - SSIM) / 2 is clamped instead (``dssim``), as in the authors' code base
    (SGDepth) and monodepth2, so that pixels with negative SSIM keep their loss and their gradient.
    """
    mu_x = _pool3(x)
    mu_y = _pool3(y)
    sigma_x = _pool3(x * x) - mu_x**2
    sigma_y = _pool3(y * y) - mu_y**2
    sigma_xy = _pool3(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2)
    return num / den


def dssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The structural term of eq. 2 per pixel and channel: (1 - SSIM) / 2 clamped to [0, 1] (SGDepth,
    monodepth2's ``SSIM`` module)."""
    return ((1 - ssim(x, y)) / 2).clamp(0, 1)


def photometric_error(target: torch.Tensor, pred: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """Per-pixel α·(1 - SSIM)/2 + (1-α)·1/C·‖x_t - x_{t'→t}‖₁ (the term inside eq. 2), (..., 1, H, W).

    The SSIM term is clamped per channel (``dssim``) and averaged over channels; images in [0, 1], (..., C, H, W);
    ``pred`` may stack several warps of ``target`` in front (K, B, C, H, W).
    """
    l1 = (target - pred).abs().mean(-3, keepdim=True)
    return alpha * dssim(target, pred).mean(-3, keepdim=True) + (1 - alpha) * l1


def min_reprojection(errors: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Per-pixel minimum over the source frames t' (eq. 2): ``errors`` holds each source's photometric error along
    its first dimension (a list of (…, 1, H, W) maps is stacked); the result drops that dimension."""
    return (torch.stack(errors) if isinstance(errors, list) else errors).min(0).values


def smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness J^sm of eq. 3 on the mean-normalized inverse depth ρ̄ = ρ / mean(ρ)."""
    rho = disp / disp.mean((2, 3), keepdim=True).clamp_min(1e-7)
    dx_rho = (rho[..., :, :-1] - rho[..., :, 1:]).abs()
    dy_rho = (rho[..., :-1, :] - rho[..., 1:, :]).abs()
    dx_img = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    dy_img = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (dx_rho * torch.exp(-dx_img)).mean() + (dy_rho * torch.exp(-dy_img)).mean()


def image_pyramid(image: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The images for the smoothness term of each scale (eq. 3): each level resized from the one before with an
    antialiasing filter, as monodepth2's data pyramid (torchvision's antialiased resize)."""
    import torchvision.transforms.v2.functional as TF  # torchvision costs a second to import: only when used

    levels = []
    for size in sizes:
        prev = levels[-1] if levels else image
        levels.append(prev if tuple(prev.shape[-2:]) == tuple(size)
                      else TF.resize(prev, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
    return levels


@dataclass
class DepthLossOutput:
    total: torch.Tensor
    photometric: torch.Tensor
    smoothness: torch.Tensor


@register("loss", "monodepth")
class MonodepthLoss(nn.Module):
    """J^depth = J^ph + β J^sm (eq. 4) on ``num_scales`` decoder scales, averaged over scales.

    Each scale's disparity is upsampled to the input resolution before warping (monodepth2). The photometric
    loss uses the un-augmented frames. The smoothness of scale s is computed at that scale against the image
    of an antialiased pyramid (``image_pyramid``) and weighted β / 2^s (monodepth2's weighting), then averaged
    over scales like J^ph.
    ``automask`` adds monodepth2's identity reprojection (off in the paper's eq. 2).
    """

    def __init__(self, alpha: float = 0.85, smoothness_weight: float = 1e-3, num_scales: int = 4,
                 automask: bool = False, min_depth: float = 0.1, max_depth: float = 100.0,
                 scales_per_pass: int | None = None) -> None:
        super().__init__()
        self.scales_per_pass = scales_per_pass
        self.alpha = alpha
        self.beta = smoothness_weight
        self.num_scales = num_scales
        self.automask = automask
        self.min_depth = min_depth
        self.max_depth = max_depth

    def forward(self, disps: dict[int, torch.Tensor], frames: list[torch.Tensor], k: torch.Tensor,
                poses: dict[int, torch.Tensor]) -> DepthLossOutput:
        """disps: scale → scaled inverse depth aσ+b; frames: un-augmented [x_{t-1}, x_t, x_{t+1}] in 0..255;
        k: (B, 4, 4) at input resolution; poses: {-1: T_{t→t-1}, 1: T_{t→t+1}}.

        The 2 sources × ``num_scales`` warps and their photometric errors run batched (on a GPU all in one
        ``grid_sample`` and one SSIM; ``scales_per_pass``); the rays and each source's projection are computed
        once."""
        prev, cur, nxt = (f / 255.0 for f in frames)
        b, _, h, w = cur.shape
        n = self.num_scales
        sources = torch.stack([prev, nxt])  # (O, B, 3, H, W): t-1, t+1
        # every scale's depth at the input resolution (monodepth2), flat: (S, 1, B, 1, H·W)
        depth = torch.stack([1.0 / F.interpolate(disps[s], size=(h, w), mode="bilinear", align_corners=False)
                             for s in range(n)]).reshape(n, 1, b, 1, h * w)
        rays = geometry.camera_rays(geometry.inverse(k), h, w)  # (B, 3, H·W)
        p = torch.stack([geometry.projection(k, poses[-1]), geometry.projection(k, poses[1])])  # (O, B, 3, 4)
        rays_p = geometry.rotated_rays(p, rays)
        # the scales in chunks of ``scales_per_pass`` (all of them on a GPU: one launch per kernel; one on a CPU,
        # where a batch of every warp outgrows the caches and runs 2.5x slower); equal values either way
        chunk = self.scales_per_pass or (n if cur.device.type == "cuda" else 1)
        errors = torch.cat([self._reprojection(depth[s0:s0 + chunk], rays_p, p, sources, cur)
                            for s0 in range(0, n, chunk)])  # (S, O, B, 1, H, W): eq. 2 inside the min
        if self.automask:
            identity = min_reprojection(photometric_error(cur, sources, self.alpha))
            identity = identity + torch.randn_like(identity) * 1e-5  # break ties as monodepth2
            errors = torch.cat([errors, identity.expand(n, 1, b, 1, h, w)], 1)
        # per-pixel minimum over the sources (eq. 2), each scale's mean, averaged over scales (equal sizes)
        ph = min_reprojection(errors.movedim(1, 0)).mean()
        pyramid = image_pyramid(cur, [tuple(disps[s].shape[-2:]) for s in range(n)])
        sm = sum(smoothness(disps[s], pyramid[s]) / (2**s) for s in range(n)) / n
        return DepthLossOutput(ph + self.beta * sm, ph, sm)

    def _reprojection(self, depth: torch.Tensor, rays_p: torch.Tensor, p: torch.Tensor, sources: torch.Tensor,
                      cur: torch.Tensor) -> torch.Tensor:
        """The photometric errors (S, O, B, 1, H, W) of every source warped with each of S flat depth maps
        (S, 1, B, 1, H·W), in one ``grid_sample`` and one SSIM."""
        n, o, (b, _, h, w) = depth.shape[0], sources.shape[0], cur.shape
        grid = geometry.sampling_grid(depth, rays_p, p, h, w)  # (S, O, B, H, W, 2)
        warped = geometry.sample(sources.expand(n, o, b, 3, h, w).reshape(-1, 3, h, w), grid.reshape(-1, h, w, 2))
        return photometric_error(cur, warped.view(n * o, b, 3, h, w), self.alpha).view(n, o, b, 1, h, w)


@register("loss", "weighted_ce")
class WeightedCrossEntropy(nn.Module):
    """Weighted cross-entropy of eq. 1 with class weights (ENet by default), void pixels ignored."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy(logits, labels, self.weights)

    def per_image(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of each image on its own, batched (what attacks that track each image use)."""
        return weighted_cross_entropy_per_image(logits, labels, self.weights)


@register("loss", "cross_entropy")
class CrossEntropy(nn.Module):
    """Plain cross-entropy without class weights, averaged over the labelled (non-void) pixels."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        super().__init__()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy(logits, labels, None)

    def per_image(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy_per_image(logits, labels, None)
