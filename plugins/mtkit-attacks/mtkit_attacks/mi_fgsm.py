"""MI-FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018) on mtkit's ε axis.
"""

from __future__ import annotations

import torch

from mtkit.plugin_api import (
    AttackContext,
    Field,
    Perturbation,
    PerturbationOptions,
    fgsm_direction,
    project,
)

from .common import labels_required


def mifgsm(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, iterations: int = 10,
           decay: float = 1.0) -> torch.Tensor:
    """MI-FGSM (Dong et al., CVPR 2018): g ← μ·g + ∇/‖∇‖₁ (per image), x ← Π_ε(x + α·sign(g)), α = ε/T."""
    alpha = eps / iterations
    g = torch.zeros_like(x)
    x_adv = x.clone()
    for _ in range(iterations):
        grad = ctx.input_gradient(x_adv, y)
        g = decay * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        x_adv = project(x_adv + alpha * fgsm_direction(g), x, eps)
    return x_adv


class MIFGSMOptions(PerturbationOptions):
    iterations: int = Field(10, ge=1)
    decay: float = Field(1.0, ge=0)


class MIFGSM(Perturbation):
    """MI-FGSM (Dong et al. 2018): momentum iterative FGSM; options iterations (10), decay (1.0)."""

    Options = MIFGSMOptions
    needs_gradient = True
    epsilon_meaning = "L∞ bound ε: every element within ±ε, so RMS ≤ ε, measured below"
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = labels_required(y, "mifgsm")
        return {e: mifgsm(ctx, x, y, e, self.options.iterations, self.options.decay) for e in epsilons}
