"""Tasks: what a model learns besides segmentation. ``segmentation`` (eq. 1) and ``depth`` (eq. 2-4, with its
own video batch and pose network) are built into the trainer; any other task is an ``AuxiliaryTask`` that a
plugin registers in the ``task`` registry and a recipe names in ``models[].tasks``.

An auxiliary task gets its own head on the shared encoder, fed by the segmentation batch's features. Its gradient
is scaled where it meets the encoder like the depth task's (eq. 5 generalised): by ``models[].task_scales[name]``,
default 1-λ, so the encoder receives λ·g_seg + (1-λ)·g_depth + Σ_k s_k·g_k while each head trains unscaled.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.schema import ModelConfig

BUILTIN_TASKS = ("segmentation", "depth")


class AuxiliaryTask:
    """Base class of a plugin task: ``build_head`` (a module mapping encoder features and the image size to an
    output) and ``loss`` (a scalar from that output and the input images in gray values 0..255)."""

    def build_head(self, enc_channels: list[int], cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
