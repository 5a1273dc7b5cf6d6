"""The adaptive attack on the edge-consistency detector (``mtkit.ops.edge_consistency``): Orthogonal Projected Gradient
Descent (O-PGD; Bryniarski, Hingun, Pachuca, Wang, Carlini, "Evading Adversarial Example Detection Defenses
with Orthogonal-PGD Updates", ICLR 2022), as Klingner et al. (IROS 2022) use it against their detector.

Two objectives per image: the segmentation loss J^ce (eq. 1), to raise, and the detector's loss J^det, the
differentiable edge consistency of the prediction with the image (``edge_consistency_loss`` of the softmax
segmentation and, for a multi-task model, of the disparity), to keep low so the image is not flagged. Each step
moves along the sign of one gradient with the other's component projected out, so that progress on one does not
undo the other: while the image is not yet broken (its mIoU ≥ ``success_miou``), along ∇J^ce ⟂ ∇J^det; once it
is, along -∇J^det ⟂ ∇J^ce. Then PGD's L∞ projection onto the ε-ball and [0, 255].

Where mtkit differs from the authors' ``attack.py`` (``_untargeted_opgd``): it descends J^det (the authors' step
adds the sign of +∇ of their raw smoothness terms, which raises the inconsistency the detector measures), and its
projection of ∇J^det removes the component along ∇J^ce (⟨∇J^det, ∇J^ce⟩/‖∇J^ce‖², where their code has
⟨∇J^det, ∇J^det⟩ in the numerator). Its iterations and step follow mtkit's PGD (Kurakin et al.'s count at 1 gray
value per step) so that the two compare at the same budget; the authors run 100 steps of 2.55 gray values.
Without a depth head (a single-task or external model) J^det is the segmentation's term alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from ..core.registry import register
from ..ops.edge_consistency import edge_consistency_loss
from ..ops.losses import IGNORE_INDEX
from .base import Perturbation, PerturbationOptions
from .context import AttackContext
from .gradient import pgd_iterations, project


class OPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: PositiveInt | dict[float, PositiveInt] | None = Field(
        None, description="null: ceil(min(ε+4, 1.25ε)) as PGD; a count, or ε → count")
    success_miou: float = Field(0.05, ge=0, le=1, description="an image counts as broken below this mIoU; from "
                                                              "then on the steps lower the detector's loss")


def image_miou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each image's mIoU (B,) over the classes present in its labels or its prediction (void pixels left out)."""
    valid = labels != IGNORE_INDEX
    classes = torch.arange(num_classes, device=pred.device).view(1, -1, 1, 1)
    p = (pred.unsqueeze(1) == classes) & valid.unsqueeze(1)
    g = (labels.unsqueeze(1) == classes) & valid.unsqueeze(1)
    inter, union = (p & g).sum((2, 3)).float(), (p | g).sum((2, 3)).float()
    present = union > 0
    return torch.where(present, inter / union.clamp_min(1), 0).sum(1) / present.sum(1).clamp_min(1)


def orthogonal(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """g minus its projection onto ``other``, per image: g - ⟨g, o⟩/‖o‖² · o (O-PGD's update direction)."""
    b = g.shape[0]
    gf, of = g.reshape(b, -1), other.reshape(b, -1)
    coef = (gf * of).sum(1, keepdim=True) / (of * of).sum(1, keepdim=True).clamp_min(1e-20)
    return (gf - coef * of).view_as(g)


def detector_loss(x: torch.Tensor, logits: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
    """J^det per image: the edge consistency loss of the softmax segmentation with the image, plus that of the
    disparity when there is a depth (a multi-task model)."""
    loss = edge_consistency_loss(x, F.softmax(logits.float(), 1))
    return loss if depth is None else loss + edge_consistency_loss(x, 1.0 / depth)


def opgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
         iterations: int | dict[float, int] | None = None, success_miou: float = 0.05) -> torch.Tensor:
    """O-PGD at one ε (see the module): ``iterations`` sign steps of ``step`` gray values, each along the
    segmentation gradient with the detector's component removed (image not yet broken) or against the detector
    gradient with the segmentation's component removed (broken), then the L∞ projection. Both gradients come
    from one forward pass (``AttackContext.gradients``): of the multi-task network (``ctx.multitask``: the
    logits and the depth) where there is one, else of the segmenter."""
    multitask = ctx.multitask if getattr(ctx.multitask, "depth_head", None) is not None else None
    adv = x.clone()
    for _ in range(pgd_iterations(eps, iterations)):
        seen: list[torch.Tensor] = []

        def objectives(z: torch.Tensor, seen=seen) -> tuple[torch.Tensor, torch.Tensor]:
            logits, depth = multitask.predict(z) if multitask is not None else (ctx.model(z), None)
            seen.append(logits.detach())
            return ctx.objective(logits.float(), y), detector_loss(z, logits, depth).sum()
        g_perf, g_det = ctx.gradients(adv, objectives)
        broken = (image_miou(seen[0].argmax(1), y, seen[0].shape[1]) < success_miou).view(-1, 1, 1, 1)
        direction = torch.where(broken, -orthogonal(g_det, g_perf), orthogonal(g_perf, g_det))
        adv = project(adv + step * direction.sign(), x, eps)
    return adv


@register("perturbation", "opgd")
class OPGD(Perturbation):
    """O-PGD against the edge-consistency detector (Bryniarski et al. 2022; Klingner et al. 2022): raises the
    segmentation loss while keeping the image's edges consistent with the predicted segmentation and depth.
    Options: step, iterations (PGD's by default, the same budget), success_miou."""

    Options = OPGDOptions
    needs_gradient = True
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        o = self.options
        return {e: opgd(ctx, x, y, e, o.step, o.iterations, o.success_miou) for e in epsilons}
