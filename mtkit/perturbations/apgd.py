"""APGD-CE for segmentation (Croce and Hein 2020, Algorithm 1) and the unbounded attack of the gradient-masking
checks."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import Field, PositiveInt

from ..core.registry import register
from ..ops.losses import IGNORE_INDEX
from .base import Perturbation, PerturbationOptions
from .context import AttackContext, epsilon_column
from .gradient import pgd_iterations, project, random_start_point, strongest


def apgd_checkpoints(iterations: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j·N) (Croce and Hein, ICML 2020, sec. 3.2), where the step size may be
    halved: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), while p_j ≤ 1."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * iterations, 6)) for q in p})


def apgd_sweep(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, epsilons: list[float],
               iterations: int | dict[float, int] | None = None, momentum: float = 0.75, rho: float = 0.75,
               random_start: bool = False, restart: int = 0) -> dict[float, torch.Tensor]:
    """APGD on the attacked loss (APGD-CE: J^ce of eq. 1 by default; Croce and Hein 2020, Algorithm 1), for
    segmentation: each image's loss is its own per-pixel loss over its labelled pixels (``image_losses``), and
    each image has its own step size, best point and checkpoint tests. L∞ ball of radius ε in gray values,
    images clipped to [0, 255].

    η starts at 2ε; x¹ = P(x⁰ + η·sign ∇); then z = P(xᵏ + η·sign ∇f(xᵏ)) and
    xᵏ⁺¹ = P(xᵏ + α(z − xᵏ) + (1 − α)(xᵏ − xᵏ⁻¹)) with momentum α. At each checkpoint (``apgd_checkpoints``)
    an image's η is halved and it restarts from its best point when the loss rose in fewer than ρ of the steps
    since the last checkpoint, or when neither η nor the best loss changed since then (η unchanged: not halved
    at the last checkpoint, as AutoAttack's ``reduced_last_check``). Returns each image's
    best point. ``iterations`` as PGD's (``pgd_iterations``): N iterations take N gradient passes and one
    forward pass, PGD's budget. From x⁰ = x the first step is FGSM, so APGD's loss is never below FGSM's.
    Every ε of the sweep runs in one stacked batch, as ``pgd_sweep``."""
    counts = [pgd_iterations(e, iterations) for e in epsilons]
    b, copies = x.shape[0], len(epsilons)
    shape = (-1, *([1] * (x.dim() - 1)))
    x0 = x.repeat(copies, *([1] * (x.dim() - 1)))
    eps = epsilon_column(epsilons, b, x)
    if random_start:  # each image's own draw per ε (``random_start_point``)
        x_cur = torch.cat([random_start_point(ctx, x, e, "apgd", e, restart) for e in epsilons])
    else:
        x_cur = x0.clone()
    loss, grad = ctx.image_loss_gradient(x_cur, y)
    x_prev, x_best, grad_best, f_best = x_cur.clone(), x_cur.clone(), grad.clone(), loss.clone()
    eta = 2 * eps.clone()
    rises = torch.zeros_like(loss)  # steps since the last checkpoint where the loss rose
    # condition 2 of Algorithm 1 compares η and the best loss with their values at the last checkpoint: η is
    # unchanged since then exactly when it was not halved there (``halved``; AutoAttack's reduced_last_check)
    halved, f_check = torch.zeros_like(loss, dtype=torch.bool), f_best.clone()
    marks = [apgd_checkpoints(n) for n in counts]
    last_mark = [0] * copies

    def rows(cs: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(c * b, (c + 1) * b, device=x.device) for c in cs])

    for k in range(max(counts)):  # x^k → x^{k+1}
        active = [c for c in range(copies) if counts[c] > k]
        r = rows(active)
        a = 1.0 if k == 0 else momentum
        xc, x0r, er = x_cur[r], x0[r], eps[r]
        z = project(xc + eta[r] * torch.sign(grad[r]), x0r, er)
        x_new = project(xc + a * (z - xc) + (1 - a) * (xc - x_prev[r]), x0r, er)
        x_prev[r], x_cur[r] = xc, x_new
        going = [c for c in active if counts[c] > k + 1]  # these need the gradient at x^{k+1}
        done = [c for c in active if counts[c] == k + 1]  # these only the loss
        new_loss = torch.empty_like(loss)
        if going:
            g = rows(going)
            new_loss[g], grad[g] = ctx.image_loss_gradient(x_cur[g], y)
        if done:
            d = rows(done)
            new_loss[d] = ctx.image_losses_of(x_cur[d], y)
        rises[r] += (new_loss[r] > loss[r]).to(rises.dtype)
        loss[r] = new_loss[r]
        better = new_loss[r] > f_best[r]  # per image, without a boolean index (nothing read back)
        wide = better.view(shape)
        x_best[r] = torch.where(wide, x_cur[r], x_best[r])
        grad_best[r] = torch.where(wide, grad[r], grad_best[r])
        f_best[r] = torch.where(better, new_loss[r], f_best[r])
        for c in going:
            if k + 1 not in marks[c]:
                continue
            cr = rows([c])
            since = k + 1 - last_mark[c]
            decide = (rises[cr] < rho * since) | (~halved[cr] & (f_best[cr] <= f_check[cr]))
            wide = decide.view(shape)  # halve η and restart from the best point
            eta[cr] = torch.where(wide, eta[cr] / 2, eta[cr])
            x_cur[cr] = torch.where(wide, x_best[cr], x_cur[cr])
            grad[cr] = torch.where(wide, grad_best[cr], grad[cr])
            loss[cr] = torch.where(decide, f_best[cr], loss[cr])
            halved[cr], f_check[cr], rises[cr] = decide, f_best[cr], 0
            last_mark[c] = k + 1
    return {e: x_best[i * b:(i + 1) * b] for i, e in enumerate(epsilons)}


class APGDOptions(PerturbationOptions):
    iterations: PositiveInt | dict[float, PositiveInt] | None = Field(
        None, description="null: PGD's ceil(min(ε+4, 1.25ε)), the same budget; a count, or ε → count (AutoAttack "
                          "uses 100)")
    momentum: float = Field(0.75, gt=0, le=1, description="α: weight of the new step against the last one")
    rho: float = Field(0.75, gt=0, le=1, description="halve η when the loss rose in fewer than ρ of the steps "
                                                     "between checkpoints")
    random_start: bool = False
    restarts: PositiveInt = Field(1, description="runs per image (after the first, each from a random start); the "
                                                 "example with the highest loss is kept")


@register("perturbation", "apgd")
class APGD(Perturbation):
    """APGD-CE for segmentation (Croce and Hein 2020): step size adapted per image at checkpoints, momentum 0.75,
    restarts from the best point, per-image losses; PGD's iteration budget by default (``apgd_sweep``)."""

    Options = APGDOptions
    needs_gradient = True
    iterative = True
    epsilon_meaning = "L∞ bound ε, as PGD: RMS ≤ ε, measured below"

    def sweep(self, ctx, x, y, epsilons):
        o = self.options
        runs = [apgd_sweep(ctx, x, y, list(epsilons), o.iterations, o.momentum, o.rho, o.random_start or r > 0, r)
                for r in range(o.restarts)]
        return {e: strongest(ctx, [run[e] for run in runs], y) for e in epsilons}


def wrong_class_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − p_y (the softmax probability of the true class) averaged over the labelled pixels: the unbounded
    attack's loss. Bounded per pixel, unlike the cross-entropy, so raising it flips the pixels that are still
    right instead of pushing wrong ones further (maximising J^ce at ε = 255 leaves a few % mIoU standing)."""
    valid = y != IGNORE_INDEX
    p = logits.float().softmax(1).gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    return ((1 - p) * valid).sum() / valid.sum().clamp_min(1)


def _wrong_class_probability_per_image(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``wrong_class_probability`` of each image on its own (B,), batched."""
    valid = y != IGNORE_INDEX
    p = logits.float().softmax(1).gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    return ((1 - p) * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


wrong_class_probability.per_image = _wrong_class_probability_per_image  # type: ignore[attr-defined]


class Unbounded(Perturbation):
    """The unbounded attack of the gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial
    Robustness", sec. 5): APGD at ε = 255, where any image in [0, 255] is allowed, on
    ``wrong_class_probability``, for ``iterations`` steps. On a model with an honest gradient it drives mIoU to
    about zero; steps follow ``torch.sign``, so a zero gradient (a model that masks its gradient) does not move
    the image. Not a recipe perturbation: the evaluation runs it when ``robustness.sanity`` is enabled."""

    needs_gradient = True
    level_kind = "unbounded"
    EPSILON = 255.0

    def __init__(self, iterations: int = 10) -> None:
        super().__init__()
        self.iterations = iterations

    def levels(self, epsilons: list[float]) -> list[float]:
        return [self.EPSILON]

    def sweep(self, ctx, x, y, epsilons):
        return apgd_sweep(replace(ctx, loss_fn=wrong_class_probability), x, y, [self.EPSILON], self.iterations)
