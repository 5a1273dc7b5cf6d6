"""SegPGD (Gu et al., ECCV 2022): PGD on a loss that shifts its weight from the correctly to the wrongly
classified pixels over the iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkit.plugin_api import (
    IGNORE_INDEX,
    AttackContext,
    Field,
    Perturbation,
    PerturbationOptions,
    fgsm_direction,
    pgd_iterations,
    project,
)

from .common import labels_required


def segpgd_loss(logits: torch.Tensor, y: torch.Tensor, lam: float, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """SegPGD's loss (Gu et al., ECCV 2022, eq. 5): (1-λ)/|I|·Σ_{correct} L_i + λ/|I|·Σ_{wrong} L_i.

    L_i is the (class-weighted, as eq. 1 of Klingner et al.) cross-entropy of pixel i; void pixels are left out.
    """
    per_pixel = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE_INDEX, reduction="none")
    valid = y != IGNORE_INDEX
    correct = (logits.argmax(1) == y) & valid
    wrong = ~correct & valid
    n = valid.sum().clamp_min(1)  # masks as factors, not indices: nothing read back from a GPU
    return ((1 - lam) * (per_pixel * correct).sum() + lam * (per_pixel * wrong).sum()) / n


def segpgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
           iterations: int | None = None) -> torch.Tensor:
    """SegPGD: PGD steps on ``segpgd_loss`` with λ_t = (t-1)/(2T), t = 1..T, L∞ projection and clipping."""
    iterations = pgd_iterations(eps) if iterations is None else iterations
    x_adv = x.clone()
    for t in range(iterations):
        lam = t / (2 * iterations)
        grad = ctx.gradient(x_adv, lambda logits, lam=lam: segpgd_loss(logits, y, lam, ctx.class_weights))
        x_adv = project(x_adv + step * fgsm_direction(grad), x, eps)
    return x_adv


class SegPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: int | None = Field(None, ge=1, description="null: ceil(min(ε+4, 1.25ε))")


class SegPGD(Perturbation):
    """SegPGD (Gu et al. 2022): PGD re-weighting correct/wrong pixels; options step (1), iterations."""

    Options = SegPGDOptions
    needs_gradient = True
    epsilon_meaning = "L∞ bound ε: every element within ±ε, so RMS ≤ ε, measured below"
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = labels_required(y, "segpgd")
        return {e: segpgd(ctx, x, y, e, self.options.step, self.options.iterations) for e in epsilons}
