"""The adaptive attack on the edge-consistency detector (``mtkit.ops.edge_consistency``): Orthogonal Projected Gradient
Descent (O-PGD; Bryniarski, Hingun, Pachuca, Wang, Carlini, "Evading Adversarial Example Detection Defenses
with Orthogonal-PGD Updates", ICLR 2022), as Klingner et al. (IROS 2022) use it against their detector.

Two objectives per image: the segmentation loss J^ce, to raise, and the detector's loss J^det, to keep low so the
image is not flagged. Each step moves along the sign of one gradient with the other's component projected out, so
that progress on one does not undo the other: while the image is not yet broken (its mIoU ≥ ``success_miou``),
along ∇J^ce ⟂ ∇J^det; once it is, along -∇J^det ⟂ ∇J^ce. Then PGD's L∞ projection onto the ε-ball and [0, 255].

J^det (option ``detector_loss``):

- ``detector`` (default): the score of the detector the evaluation reports, in its differentiable form
  (``Detector.differentiable_score``; for ``edge_consistency`` the softmax in place of the labels, equal to the
  reported score where the softmax is one-hot): the detector stage hands its own detector (and its chosen
  measures) over through ``AttackContext.detector``; elsewhere the registry's ``edge_consistency`` with all three
  measures. An adaptive attack is evidence about the detector it attacks, so this is the one the report's rows
  measure.
- ``authors``: the authors' composition in ``attack.py`` with their depth and segmentation losses: the 3x3
  structural dissimilarity of the edge maps (their ``SSIMGradLoss``) of the softmax segmentation with the
  zero-mean normalised perturbed image, plus, at each of the depth decoder's scales s, those of the sigmoid
  output σ_s divided by its mean with the *clean* image and with the softmax segmentation (both resized
  bilinearly to the scale), each divided by 2^s.

J^ce (option ``weighted``): unweighted, as the authors' ``SegLosses(use_weights=False)``, unless ``weighted:
true`` takes the recipe's attacked loss (eq. 1 with the class weights).

Where mtkit differs from the authors' ``attack.py`` (``_untargeted_opgd``): it descends J^det (the authors' step
adds the sign of +∇ of their raw smoothness terms, which raises the inconsistency the detector measures), and its
projection of ∇J^det removes the component along ∇J^ce (⟨∇J^det, ∇J^ce⟩/‖∇J^ce‖², where their code has
⟨∇J^det, ∇J^det⟩ in the numerator). Its iterations and step follow mtkit's PGD (Kurakin et al.'s count at 1 gray
value per step) so that the two compare at the same budget; the authors run 100 steps of 2.55 gray values.
Without a depth head (a single-task or external model) J^det is the segmentation's term alone: minus the soft
image–segmentation measure (``detector``) or the authors' segmentation term (``authors``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from ..core.registry import register
from ..ops.edge_consistency import EdgeConsistency, soft_consistency_measures, ssim_grad_loss
from ..ops.losses import IGNORE_INDEX, weighted_cross_entropy
from .base import Perturbation, PerturbationOptions
from .context import AttackContext
from .gradient import pgd_iterations, project


class OPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: PositiveInt | dict[float, PositiveInt] | None = Field(
        None, description="null: ceil(min(ε+4, 1.25ε)) as PGD; a count, or ε → count")
    success_miou: float = Field(0.05, ge=0, le=1, description="an image counts as broken below this mIoU; from "
                                                              "then on the steps lower the detector's loss")
    detector_loss: Literal["detector", "authors"] = Field(
        "detector", description="J^det: detector (the evaluated detector's differentiable score) or authors (the "
                                "composition of the authors' attack.py); see the module")
    weighted: bool = Field(False, description="J^ce with the class weights of eq. 1 (the recipe's loss); false: "
                                              "unweighted, as the authors' SegLosses(use_weights=False)")


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


def authors_detector_loss(normalised: torch.Tensor, clean: torch.Tensor, logits: torch.Tensor,
                          sigmas: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """The authors' J^det per image (B,) (see the module): ``normalised`` the perturbed image as the network sees
    it (zero-mean normalised), ``clean`` the clean image in [0, 1], ``sigmas`` the depth decoder's sigmoid output
    per scale (None without a depth head)."""
    probs = F.softmax(logits.float(), 1)
    loss = ssim_grad_loss(probs, normalised)
    for s, sigma in (sigmas or {}).items():
        norm = sigma / (sigma.mean(dim=(2, 3), keepdim=True) + 1e-7)
        size = tuple(sigma.shape[-2:])
        color = F.interpolate(clean, size=size, mode="bilinear", align_corners=False)
        seg = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        loss = loss + (ssim_grad_loss(norm, color) + ssim_grad_loss(norm, seg)) / 2 ** s
    return loss


def detector_objective(ctx: AttackContext, clean: torch.Tensor, mode: str):
    """z ↦ (logits, J^det per image) for ``opgd`` (see the module), from one forward pass."""
    multitask = ctx.multitask if getattr(ctx.multitask, "depth_head", None) is not None else None
    if mode == "authors":
        def authors(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if multitask is None:
                logits, sigmas, normalised = ctx.model(z), None, _normalised(ctx.model, z)
            else:
                logits, sigmas = multitask.predict_scales(z)
                normalised = multitask.normalize(z)
            return logits, authors_detector_loss(normalised, clean / 255.0, logits, sigmas)
        return authors
    detector = ctx.detector if ctx.detector is not None else EdgeConsistency()

    def reported(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if multitask is None:  # no depth: the image–segmentation measure alone
            logits = ctx.model(z)
            return logits, -soft_consistency_measures(z, F.softmax(logits.float(), 1), None)[:, 0]
        return detector.differentiable_score(multitask, z)
    return reported


def _normalised(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    normalize = getattr(model, "normalize", None)
    return normalize(z) if normalize is not None else z / 255.0


def opgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
         iterations: int | dict[float, int] | None = None, success_miou: float = 0.05,
         detector_loss: str = "detector", weighted: bool = False) -> torch.Tensor:
    """O-PGD at one ε (see the module): ``iterations`` sign steps of ``step`` gray values, each along the
    segmentation gradient with the detector's component removed (image not yet broken) or against the detector
    gradient with the segmentation's component removed (broken), then the L∞ projection. Both gradients come
    from one forward pass (``AttackContext.gradients``): of the multi-task network (``ctx.multitask``: the
    logits and the depth) where there is one, else of the segmenter."""
    det = detector_objective(ctx, x, detector_loss)
    adv = x.clone()
    for _ in range(pgd_iterations(eps, iterations)):
        seen: list[torch.Tensor] = []

        def objectives(z: torch.Tensor, seen=seen) -> tuple[torch.Tensor, torch.Tensor]:
            logits, j_det = det(z)
            seen.append(logits.detach())
            logits = logits if logits.dtype == torch.float64 else logits.float()
            j_ce = ctx.objective(logits, y) if weighted else weighted_cross_entropy(logits, y)
            return j_ce, j_det.sum()
        g_perf, g_det = ctx.gradients(adv, objectives)
        broken = (image_miou(seen[0].argmax(1), y, seen[0].shape[1]) < success_miou).view(-1, 1, 1, 1)
        direction = torch.where(broken, -orthogonal(g_det, g_perf), orthogonal(g_perf, g_det))
        adv = project(adv + step * direction.sign(), x, eps)
    return adv


@register("perturbation", "opgd")
class OPGD(Perturbation):
    """O-PGD against the edge-consistency detector (Bryniarski et al. 2022; Klingner et al. 2022): raises the
    segmentation loss while keeping the image's edges consistent with the predicted segmentation and depth.
    Options: step, iterations (PGD's by default, the same budget), success_miou, detector_loss (the reported
    detector's score, or the authors' loss), weighted (class-weighted J^ce; unweighted as the authors')."""

    Options = OPGDOptions
    needs_gradient = True
    iterative = True
    epsilon_meaning = "L∞ bound ε, as PGD: RMS ≤ ε, measured below"

    def sweep(self, ctx, x, y, epsilons):
        o = self.options
        return {e: opgd(ctx, x, y, e, o.step, o.iterations, o.success_miou, o.detector_loss, o.weighted)
                for e in epsilons}
