"""``dag``: Xie, Wang, Zhang, Zhou, Xie, Yuille, "Adversarial Examples for Semantic Segmentation and Object
Detection" (ICCV 2017), Algorithm 1: each labelled pixel gets a target label other than its own (the label set
randomly permuted, as theirs, per image); at every step
only the pixels still predicted as their true label are active (T_m); r_m = Σ_{n ∈ T_m} ∇(f_{t_n} − f_{l_n}),
the step γ · r_m / ‖r_m‖_∞; a pixel that reached its target (or any other label) leaves T_m, and an image with
no active pixel stops. Projected onto mtkit's L∞ ε-ball (theirs is unbounded).
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt

from mtkit.plugin_api import (
    IGNORE_INDEX,
    AttackContext,
    Field,
    MtkitError,
    Perturbation,
    PerturbationOptions,
    Targets,
    project,
)

from .common import predict


def dag_objective(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """DAG's objective per image (B,) and its active pixels (B, H, W): Σ_{n ∈ T} f_{t_n}(x) − f_{l_n}(x) over the
    pixels T still predicted as their true label (and with a target)."""
    active = (logits.argmax(1) == labels) & (targets != IGNORE_INDEX)
    safe_t, safe_l = targets.clamp(0, logits.shape[1] - 1), labels.clamp(0, logits.shape[1] - 1)
    margin = logits.gather(1, safe_t.unsqueeze(1)) - logits.gather(1, safe_l.unsqueeze(1))
    return (margin.squeeze(1) * active).flatten(1).sum(1), active


# ------------------------------------------------------------------------------------------------------ DAG
class DAGOptions(PerturbationOptions):
    gamma: float = Field(0.5, gt=0, description="γ: the largest change of a pixel per step, in gray values "
                                                "(Xie et al. use 0.5)")
    iterations: PositiveInt = Field(50, description="the steps; an image takes none after no pixel is "
                                                    "active (Xie et al. allow 200)")


class DAG(Perturbation):
    """Dense Adversary Generation (Xie et al. 2017): each labelled pixel pushed to a target label other than its
    own (a per-image random permutation of the classes without fixed points), only pixels still predicted as
    their label active, normalised steps of γ; within the ε-ball."""

    Options = DAGOptions
    needs_gradient = True
    epsilon_meaning = "L∞ bound ε: every element within ±ε, so RMS ≤ ε, measured below"
    targeted = True

    def targets(self, ctx, x, y):
        if y is None:
            raise MtkitError("dag needs ground-truth labels (each pixel's target differs from its label)")
        c = predict(ctx, x)[0].shape[1]
        # Xie et al. permute the label set at random: here each image's own random cycle through the classes,
        # label → the next class of the cycle, so that no class keeps its label (a permutation without fixed
        # points) and every pixel of a class shares its target
        # (each image's cycle: the classes sorted by its own random words, drawn on the device; a stable sort)
        order = torch.sort(ctx.image_words(x.shape[0], c, x.device, "dag"), dim=1, stable=True).indices
        cycle = torch.empty_like(order).scatter_(1, order, order.roll(-1, 1))  # (B, C): class → target class
        safe = y.clamp(0, c - 1)
        t = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, cycle.gather(1, safe.flatten(1)).view_as(y))
        return Targets(t, "per_pixel")

    def sweep(self, ctx, x, y, epsilons):
        tg = self.targets_of(ctx, x, y)
        return {e: dag(ctx, x, y, tg.labels, e, self.options.gamma, self.options.iterations) for e in epsilons}


def dag(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, eps: float,
        gamma: float = 0.5, iterations: int = 50) -> torch.Tensor:
    """DAG (Algorithm 1 of Xie et al.) within the L∞ ε-ball: see ``DAG``. Returns the adversarial images."""
    adv = x.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        box: list[torch.Tensor] = []

        def objective(logits, box=box):
            value, active = dag_objective(logits, y, targets)
            box.append(active)
            return value.sum()
        r = ctx.gradient(adv, objective)
        # an image whose active set emptied has terminated (for good): it takes no more steps. The loop runs its
        # iterations without asking whether every image is done (that answer is a read-back, a sync per step)
        done |= ~box[0].flatten(1).any(1)
        norm = r.flatten(1).abs().amax(1).clamp_min(1e-20).view(-1, 1, 1, 1)
        adv = project(adv + torch.where(done.view(-1, 1, 1, 1), 0.0, gamma * r / norm), x, eps)
    return adv
