"""The base of the registry's perturbations: typed options, the flags the evaluation reads, ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from .context import AttackContext


class PerturbationOptions(BaseModel):
    """Base of a perturbation's typed options (unknown keys are refused); the base takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Targets:
    """What a targeted attack aims at in a batch, per pixel. ``labels`` (B, H, W): each pixel's target label
    (``IGNORE_INDEX`` where it has none). ``kind``: "static" (a fixed target segmentation, Metzen et al.),
    "per_pixel" (a target label per pixel, DAG) or "dynamic" (hide class ``hidden``, keep the rest as the clean
    prediction ``reference`` (B, H, W) had it). The evaluation reports the share of pixels that take their target,
    and for "dynamic" the share of the hidden class's pixels removed and of the other pixels kept."""

    labels: torch.Tensor
    kind: str = "static"
    hidden: int | None = None
    reference: torch.Tensor | None = None


class Perturbation:
    """Base class of the registry's perturbations. Subclasses set ``needs_gradient`` and ``Options`` and
    implement ``sweep``; ``self.options`` holds the validated options."""

    Options: ClassVar[type[BaseModel]] = PerturbationOptions
    #: gradient attacks run with autograd; noise types run under ``torch.no_grad``
    needs_gradient = False
    #: an iterative attack on each image: the gradient-masking checks expect it at least as strong as FGSM
    iterative = False
    #: what the sweep's keys are: "epsilon" (requested RMS ε in gray values, eq. 7) or another level such as a
    #: corruption's "severity", whose ε is only measured (recorded per row as ``epsilon_measured``)
    level_kind = "epsilon"
    #: a targeted attack (``targets`` says at what): the evaluation reports its success beside the mIoU, and keeps
    #: it out of the worst case and the gradient-masking checks, which judge attacks that lower the mIoU
    targeted = False
    #: what ε means for this perturbation, one line for the report's notes and ``mtkit list``: its relation to the
    #: RMS of eq. 7 (equal RMS ε means equal SNR)
    epsilon_meaning: ClassVar[str] = "not stated by the perturbation: compare its measured ε (the RMS, eq. 7)"

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def levels(self, epsilons: list[float]) -> list[float]:
        """The keys this perturbation's ``sweep`` returns for the recipe's ε list (by default the ε list)."""
        return list(epsilons)

    def sweep(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None,
              epsilons: list[float]) -> dict[float, torch.Tensor]:
        raise NotImplementedError

    def targets(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None) -> Targets:
        """A targeted attack's targets for this batch (the same its ``sweep`` aims at)."""
        raise NotImplementedError

    def targets_of(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None) -> Targets:
        """``targets`` once per batch: the first caller (the attack's own ``sweep``) computes them, the next (the
        evaluation, which counts how many pixels took them) reuses them from ``ctx.memo``, without a second
        forward pass. ``ctx`` is one batch's context; a loop over batches calls ``targets``."""
        key = ("targets", id(self))
        if key not in ctx.memo:
            ctx.memo[key] = self.targets(ctx, x, y)
        return ctx.memo[key]
