"""Pose network (monodepth2's separate pose net): a ResNet encoder on two frames stacked along channels and a
decoder predicting axis-angle rotation and translation, turned into 4x4 transforms T_{t→t'}."""

from __future__ import annotations

import torch
from torch import nn

from .decoders import at_least_fp32


def rot_from_axisangle(vec: torch.Tensor) -> torch.Tensor:
    """Axis-angle (B, 3) → rotation matrices (B, 4, 4) (Rodrigues' formula), assembled with one ``stack`` (no
    slice assignments: each would be a copy in the forward and in the backward pass)."""
    angle = vec.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    axis = vec / angle
    ca, sa = torch.cos(angle), torch.sin(angle)
    c1 = 1 - ca
    x, y, z = axis[..., 0:1], axis[..., 1:2], axis[..., 2:3]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    return torch.stack([ca + x * x * c1, x * y * c1 - z * sa, x * z * c1 + y * sa, zero,
                        y * x * c1 + z * sa, ca + y * y * c1, y * z * c1 - x * sa, zero,
                        z * x * c1 - y * sa, z * y * c1 + x * sa, ca + z * z * c1, zero,
                        zero, zero, zero, one], -1).view(-1, 4, 4)


def translation_matrix(t: torch.Tensor) -> torch.Tensor:
    """Translation vectors (B, 3) → (B, 4, 4)."""
    eye = torch.eye(4, 3, dtype=t.dtype, device=t.device).expand(t.shape[0], 4, 3)
    column = torch.cat([t, torch.ones_like(t[:, :1])], 1).unsqueeze(-1)
    return torch.cat([eye, column], -1)


def transformation_from_parameters(axisangle: torch.Tensor, translation: torch.Tensor,
                                   invert: bool = False) -> torch.Tensor:
    """4x4 transform from axis-angle and translation; ``invert`` gives the inverse motion (monodepth2)."""
    r = rot_from_axisangle(axisangle)
    t = translation
    if invert:
        r = r.transpose(1, 2)
        t = -t
    tm = translation_matrix(t)
    return r @ tm if invert else tm @ r


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
    """Separate pose network: an encoder on 6 channels (two frames; built by ``mtkit.build.build_pose_net``), the
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
        motion inverted for a past frame, as in monodepth2. The transforms are fp32 even under autocast: a bf16
        rotation (8-bit mantissa) would shift far points by pixels."""
        pair = torch.cat([frame_other, frame_t] if other_is_past else [frame_t, frame_other], 1)
        feature = self.encoder((pair - self.mean) / self.std)[-1]
        axisangle, translation = self.decoder(feature)
        with torch.autocast(pair.device.type, enabled=False):
            return transformation_from_parameters(at_least_fp32(axisangle), at_least_fp32(translation),
                                                  invert=other_is_past)
