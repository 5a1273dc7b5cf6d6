"""mtkit-edges: a self-supervised edge-detection task (an example of a plugin that adds a task).

The head is mtkit's monodepth2-style decoder with one output channel; the target is the Sobel gradient magnitude
of the input's gray image, so the task needs no labels and trains on the segmentation batch's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkit.plugin_api import AuxiliaryTask, RegistryView, SegmentationDecoder, hookimpl

__version__ = "0.1.0"

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def edge_target(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the mean-over-channels image in [0, 1], scaled by 4 and clipped to [0, 1]."""
    gray = images.float().mean(1, keepdim=True) / 255.0
    kx = SOBEL_X.to(gray).view(1, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))
    return (4 * torch.sqrt(gx**2 + gy**2 + 1e-12)).clamp(0, 1)


class EdgeTask(AuxiliaryTask):
    """Self-supervised edges: predict the Sobel magnitude of the input (L1 on a sigmoid output)."""

    def build_head(self, enc_channels, cfg):
        return SegmentationDecoder(enc_channels, num_classes=1)

    def loss(self, output, images):
        return (torch.sigmoid(output) - edge_target(images)).abs().mean()


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    registry.add("task", "edges", EdgeTask)
