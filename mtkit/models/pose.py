"""Pose network (monodepth2's separate pose net): a ResNet encoder on two frames stacked along channels and a
decoder predicting axis-angle rotation and translation, turned into 4x4 transforms T_{t→t'}."""

from __future__ import annotations

import torch
from torch import nn

from ..core.precision import fp32
from ..ops.geometry import device_constant
from .decoders import at_least_fp32

# skew(a) = a @ CROSS viewed (3, 3): the cross-product matrix [[0, -z, y], [z, 0, -x], [-y, x, 0]]
CROSS = ((0, 0, 0, 0, 0, -1, 0, 1, 0),
         (0, 0, 1, 0, 0, 0, -1, 0, 0),
         (0, -1, 0, 1, 0, 0, 0, 0, 0))


def rotation_from_axisangle(vec: torch.Tensor) -> torch.Tensor:
    """Axis-angle (B, 3) → rotation matrices (B, 3, 3) by Rodrigues' formula R = cos θ·I + sin θ·[a]ₓ +
    (1 - cos θ)·a·aᵀ (θ = ‖vec‖, a = vec/θ), in a handful of whole-tensor operations (monodepth2's
    ``rot_from_axisangle`` writes out the nine entries: each a separate operation forward and backward)."""
    angle = vec.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    axis = vec / angle
    ca, sa = torch.cos(angle).unsqueeze(-1), torch.sin(angle).unsqueeze(-1)
    skew = (axis @ device_constant(CROSS, axis)).view(-1, 3, 3)  # the constant copied to the device once
    outer = axis.unsqueeze(-1) * axis.unsqueeze(-2)
    return ca * torch.eye(3, dtype=vec.dtype, device=vec.device) + sa * skew + (1 - ca) * outer


def transformation_from_parameters(axisangle: torch.Tensor, translation: torch.Tensor,
                                   invert: bool | torch.Tensor = False) -> torch.Tensor:
    """4x4 transform (B, 4, 4) from axis-angle and translation (B, 3): T = [[R, t], [0, 1]] (monodepth2's
    translation·rotation); ``invert`` gives the inverse motion Rᵀ·translation(-t) = [[Rᵀ, -Rᵀt], [0, 1]], for all
    rows (a bool) or for the rows a (B,) bool tensor marks."""
    r = rotation_from_axisangle(axisangle)
    t = translation.unsqueeze(-1)
    if isinstance(invert, torch.Tensor):
        rt, mask = r.transpose(1, 2), invert.view(-1, 1, 1)
        r, t = torch.where(mask, rt, r), torch.where(mask, -(rt @ t), t)
    elif invert:
        r = r.transpose(1, 2)
        t = -(r @ t)
    last_row = device_constant((0.0, 0.0, 0.0, 1.0), r).expand(r.shape[0], 1, 4)  # copied once per device
    return torch.cat([torch.cat([r, t], -1), last_row], 1)


class PoseDecoder(nn.Module):
    """monodepth2's PoseDecoder for one frame pair: 6 numbers (axis-angle, translation), scaled by 0.01."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 256, 1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 6, 1),
        )

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = 0.01 * self.net(feature).mean((2, 3))
        return out[:, :3], out[:, 3:]


class PoseNet(nn.Module):
    """Separate pose network: an encoder on 6 channels (two frames; built by ``mtkit.recipe.build.build_pose_net``), the
    pose decoder; inputs in gray values 0..255."""

    def __init__(self, encoder: nn.Module, mean: tuple[float, ...] = (123.675, 116.28, 103.53),
                 std: tuple[float, ...] = (58.395, 57.12, 57.375)) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = PoseDecoder(self.encoder.channels[-1])
        self.register_buffer("mean", torch.tensor(mean * 2).view(1, 6, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std * 2).view(1, 6, 1, 1), persistent=False)

    def forward(self, frame_t: torch.Tensor, frame_other: torch.Tensor, other_is_past: bool) -> torch.Tensor:
        """T_{t→t'} (B, 4, 4): maps points in camera t to camera t'. Frames are fed in temporal order and the
        motion inverted for a past frame, as in monodepth2."""
        return self.transforms(torch.cat([frame_other, frame_t] if other_is_past else [frame_t, frame_other], 1),
                               other_is_past)

    def around(self, prev: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor) -> dict[int, torch.Tensor]:
        """{-1: T_{t→t-1}, 1: T_{t→t+1}} in one pass over the 2B frame pairs (one encoder call instead of one per
        pair: half the launches). monodepth2 runs the pose net once per pair; in training mode BatchNorm's batch
        statistics here cover both pairs' 2B samples, which is the only difference (equal in eval mode)."""
        b = cur.shape[0]
        pairs = torch.cat([torch.cat([prev, cur], 1), torch.cat([cur, nxt], 1)])
        t = self.transforms(pairs, torch.arange(2 * b, device=cur.device) < b)
        return {-1: t[:b], 1: t[b:]}

    def transforms(self, pairs: torch.Tensor, invert: bool | torch.Tensor) -> torch.Tensor:
        """Transforms (N, 4, 4) of frame pairs stacked along channels (N, 6, H, W), inverted where ``invert``
        says (``transformation_from_parameters``). They are fp32 even under autocast: a bf16 rotation (8-bit
        mantissa) would shift far points by pixels."""
        feature = self.encoder((pairs - self.mean) / self.std)[-1]
        axisangle, translation = self.decoder(feature)
        with fp32(pairs.device.type):
            return transformation_from_parameters(at_least_fp32(axisangle), at_least_fp32(translation), invert)
