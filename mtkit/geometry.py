"""View synthesis for self-supervised depth (paper sec. 3.2, after monodepth2's layers.py).

Conventions: camera x right, y down, z forward; K is (B, 4, 4) for the image size at hand; T_{t→t'} maps
points in camera t to camera t'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Homogeneous pixel coordinates (3, H*W): rows u (x), v (y), 1."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1), torch.ones_like(u).reshape(-1)], 0)


def backproject(depth: torch.Tensor, inv_k: torch.Tensor) -> torch.Tensor:
    """Depth (B, 1, H, W) and K⁻¹ (B, 4, 4) → homogeneous camera points (B, 4, H*W): X = d · K⁻¹ [u v 1]ᵀ."""
    b, _, h, w = depth.shape
    pix = pixel_grid(h, w, depth.device, depth.dtype)
    rays = inv_k[:, :3, :3] @ pix.unsqueeze(0)
    points = rays * depth.reshape(b, 1, -1)
    return torch.cat([points, torch.ones_like(points[:, :1])], 1)


def project(points: torch.Tensor, k: torch.Tensor, t: torch.Tensor, height: int, width: int,
            eps: float = 1e-7) -> torch.Tensor:
    """Camera-t points (B, 4, N) → sampling grid (B, H, W, 2) in [-1, 1] of camera t' via P = K·T_{t→t'}."""
    p = (k @ t)[:, :3, :]
    cam = p @ points
    pix = cam[:, :2] / (cam[:, 2:3] + eps)
    pix = pix.view(points.shape[0], 2, height, width).permute(0, 2, 3, 1)
    scale = torch.tensor([width - 1, height - 1], dtype=pix.dtype, device=pix.device)
    return (pix / scale - 0.5) * 2


def sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of x_{t'} at projected coordinates with border padding → x_{t'→t}."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp(source: torch.Tensor, depth: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_{t'→t}: the source frame x_{t'} resampled into frame t using depth d_t, intrinsics K and T_{t→t'}."""
    h, w = depth.shape[-2:]
    grid = project(backproject(depth, torch.linalg.inv(k)), k, t, h, w)
    return sample(source, grid)
