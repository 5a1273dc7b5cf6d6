"""Helpers the attacks share: labels that must be given, and the multi-task or plain prediction.
"""

from __future__ import annotations

import torch

from mtkit.plugin_api import (
    AttackContext,
    MtkitError,
)


def labels_required(y: torch.Tensor | None, name: str) -> torch.Tensor:
    if y is None:
        raise MtkitError(f"{name} needs ground-truth labels; this evaluation dataset gives none")
    return y


def predict(ctx: AttackContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = ctx.model(x)
    return logits, logits.argmax(1)
