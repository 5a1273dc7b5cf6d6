"""Gradient scaling where the decoders meet the shared encoder (paper eq. 5)."""

from __future__ import annotations

import torch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass.

    Inserted on every encoder→decoder connection with ``scale = λ`` for segmentation and ``1-λ`` for depth, so the
    encoder receives g_total = (1-λ)·g_depth + λ·g_seg (eq. 5) while each decoder trains on its unscaled gradient.
    """
    if scale == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, float(scale))


def scale_features(features: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """``scale_grad`` on each feature map (bottleneck and every skip connection)."""
    return [scale_grad(f, scale) for f in features]
