"""View synthesis for self-supervised depth (paper sec. 3.2, eq. 2; after monodepth2's layers.py).

Conventions: camera x right, y down, z forward; K is (B, 4, 4) for the image size at hand; T_{t→t'} maps
points in camera t to camera t'.

The products of a 3x3 (or 3x4) matrix with every pixel are written out as broadcast elementwise math: a batched
matrix product over H·W points runs as a slow small-matrix GEMM on a GPU (1.1 ms per call at 640x192 on an H100),
while nine fused multiply-adds are memory-bound and cheap. The rays K⁻¹·[u v 1]ᵀ depend on K only, and
R·K⁻¹·[u v 1]ᵀ on K and the pose only, so one warp's work is shared by every scale (``rotated_rays``), and all
warps of a loss go through one ``grid_sample`` (``sampling_grid`` takes any leading shape).
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


def inverse(k: torch.Tensor) -> torch.Tensor:
    """K⁻¹ (B, 4, 4) without the error check of ``torch.linalg.inv``, which reads a flag back from the device (a
    host synchronisation per call); intrinsics are invertible by construction."""
    return torch.linalg.inv_ex(k)[0]


def apply_matrix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m (..., 3, 3) times points x (..., 3, N) as broadcast elementwise math: Σ_j m[..., i, j] · x[..., j, :]."""
    return m[..., 0:1] * x[..., 0:1, :] + m[..., 1:2] * x[..., 1:2, :] + m[..., 2:3] * x[..., 2:3, :]


def camera_rays(inv_k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """K⁻¹ [u v 1]ᵀ for every pixel (B, 3, H*W): the ray through each pixel at depth 1."""
    pix = pixel_grid(height, width, inv_k.device, inv_k.dtype).unsqueeze(0)
    return apply_matrix(inv_k[..., :3, :3], pix)


def backproject(depth: torch.Tensor, inv_k: torch.Tensor) -> torch.Tensor:
    """Depth (B, 1, H, W) and K⁻¹ (B, 4, 4) → homogeneous camera points (B, 4, H*W): X = d · K⁻¹ [u v 1]ᵀ."""
    b, _, h, w = depth.shape
    points = camera_rays(inv_k, h, w) * depth.reshape(b, 1, -1)
    return torch.cat([points, torch.ones_like(points[:, :1])], 1)


def projection(k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """P = K·T_{t→t'} (..., 3, 4): camera-t points to pixels of camera t' (a 4x4 product per sample)."""
    return (k @ t)[..., :3, :]


def rotated_rays(p: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
    """P[..., :3] · rays (..., 3, N): what every depth map multiplies, so that P·[d·ray; 1] = d · (P[:3] · ray) +
    P[:, 3]; shared by every scale of a warp."""
    return apply_matrix(p[..., :3], rays)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor of ``values`` on ``like``'s device and dtype, copied there once and reused: a
    tensor made from host values on every call would be a blocking host-to-device copy per call on a GPU."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def sampling_grid(depth: torch.Tensor, rays_p: torch.Tensor, p: torch.Tensor, height: int, width: int,
                  eps: float = 1e-7) -> torch.Tensor:
    """Sampling grid (..., B, H, W, 2) in [-1, 1] of camera t' for flat depths (..., B, 1, H*W): the camera-t'
    point cam = d · ``rays_p`` + P[..., 3] (``rotated_rays``), then the perspective division. ``rays_p``
    (..., B, 3, N) and ``p`` (..., B, 3, 4) broadcast against ``depth`` (leading dimensions: scales, sources)."""
    return _normalise(depth * rays_p + p[..., 3:], height, width, eps)


def _normalise(cam: torch.Tensor, height: int, width: int, eps: float) -> torch.Tensor:
    """Camera points (..., 3, H*W) → pixel coordinates divided by depth, scaled to [-1, 1], (..., H, W, 2)."""
    pix = cam[..., :2, :] / (cam[..., 2:3, :] + eps)
    pix = pix.reshape(*pix.shape[:-1], height, width).movedim(-3, -1)
    scale = device_constant((width - 1, height - 1), pix)  # copied to the device once per size, not per call
    return (pix / scale - 0.5) * 2


def project(points: torch.Tensor, k: torch.Tensor, t: torch.Tensor, height: int, width: int,
            eps: float = 1e-7) -> torch.Tensor:
    """Camera-t points (B, 4, N) → sampling grid (B, H, W, 2) in [-1, 1] of camera t' via P = K·T_{t→t'}."""
    p = projection(k, t)
    return _normalise(apply_matrix(p[..., :3], points[:, :3]) + p[..., 3:] * points[:, 3:4], height, width, eps)


def sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of x_{t'} at projected coordinates with border padding → x_{t'→t}."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp(source: torch.Tensor, depth: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_{t'→t}: the source frame x_{t'} resampled into frame t using depth d_t, intrinsics K and T_{t→t'}."""
    h, w = depth.shape[-2:]
    grid = project(backproject(depth, inverse(k)), k, t, h, w)
    return sample(source, grid)
