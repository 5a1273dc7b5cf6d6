"""CosPGD (Agnihotri and Keuper, ICML 2024): PGD on the cross-entropy scaled per pixel by the cosine similarity
of the prediction and the one-hot label.
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
    clip_image,
    pgd_iterations,
    project,
)

from .common import labels_required


def cospgd_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """CosPGD's loss (Agnihotri, Jung and Keuper, ICML 2024, Algorithm 1): each pixel's cross-entropy L_i scaled
    by the cosine similarity between its softmax prediction and its one-hot label, a constant of the step (no
    gradient flows through it), so pixels the model still gets right weigh most, and pixels already fooled
    little; summed over the labelled pixels over their count.

    L_i is the (class-weighted, as eq. 1 of Klingner et al.) cross-entropy; void pixels are left out.
    """
    per_pixel = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE_INDEX, reduction="none")
    valid = y != IGNORE_INDEX
    target = F.one_hot(torch.where(valid, y, 0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    scale = F.cosine_similarity(logits.softmax(1), target, dim=1).detach()
    # void pixels masked, not indexed out: boolean indexing reads the count back (a sync per iteration)
    return torch.where(valid, scale * per_pixel, 0.0).sum() / valid.sum().clamp_min(1)


def cospgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
           iterations: int | None = None, random_start: bool = True) -> torch.Tensor:
    """CosPGD: from a uniform random start in the L∞ ε-ball (each image's own draw, ``ctx.image_noise``: the
    same whatever the batch, the ranks or the device), signed steps of ``step`` gray values on ``cospgd_loss``,
    each projected onto the ε-ball and [0, 255]; Kurakin's iteration count by default."""
    iterations = pgd_iterations(eps) if iterations is None else iterations
    x_adv = x.clone()
    if random_start:
        x_adv = clip_image(x + (2 * ctx.image_noise(x, "rand", "cospgd", eps) - 1) * eps)
    for _ in range(iterations):
        grad = ctx.gradient(x_adv, lambda logits: cospgd_loss(logits, y, ctx.class_weights))
        x_adv = project(x_adv + step * torch.sign(grad), x, eps)
    return x_adv


class CosPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: int | None = Field(None, ge=1, description="null: ceil(min(ε+4, 1.25ε))")
    random_start: bool = Field(True, description="start at a uniform random point of the ε-ball (the paper's)")


class CosPGD(Perturbation):
    """CosPGD (Agnihotri et al. 2024): PGD on the pixel-wise cross-entropy scaled by the cosine similarity of the
    prediction to the label; options step (1), iterations, random_start (true)."""

    Options = CosPGDOptions
    needs_gradient = True
    epsilon_meaning = "L∞ bound ε: every element within ±ε, so RMS ≤ ε, measured below"
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = labels_required(y, "cospgd")
        o = self.options
        return {e: cospgd(ctx, x, y, e, o.step, o.iterations, o.random_start) for e in epsilons}
