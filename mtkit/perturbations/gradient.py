"""Gradient attacks on the attacked loss (J^ce of eq. 1 by default): FGSM (eq. 8) and PGD, every ε of a sweep in
one stacked batch; restarts and the per-image strongest candidate."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, PositiveInt

from ..core.registry import register
from .base import Perturbation, PerturbationOptions
from .context import AttackContext, clip_image, epsilon_column


def fgsm_direction(gradient: torch.Tensor) -> torch.Tensor:
    """sign(∇_x J^ce) of eq. 8, with a zero gradient counted as +1 so that every element moves by exactly ±ε and
    the RMS of r equals ε (eq. 7)."""
    return torch.where(gradient >= 0, 1.0, -1.0).to(gradient.dtype)


def fgsm(x: torch.Tensor, direction: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv = x + ε·sign(∇_x J^ce) (eq. 8), unclipped."""
    return x + eps * direction


def pgd_iterations(eps: float, override: int | dict[float, int] | None = None) -> int:
    """Kurakin et al.'s number of iterations ceil(min(ε + 4, 1.25 ε)) (ε in gray values), or ``override``: one
    count for every ε, or a mapping ε → count (ε missing from it keep the default).

    Rounded up, so that every ε > 0 gets at least one iteration: 1, 1, 2, 3, 5, 10, 20 for the paper's
    ε = 0.25 … 16. Rounding down, as a common library does, gives 0 iterations, i.e. no attack at all, at ε < 1.
    """
    if isinstance(override, dict):
        override = override.get(float(eps))
    if override is not None:
        return int(override)
    return max(1, math.ceil(min(eps + 4.0, 1.25 * eps)))


def random_start_point(ctx: AttackContext, x: torch.Tensor, eps: float | torch.Tensor, *salt: Any) -> torch.Tensor:
    """A uniform random point of the L∞ ε-ball around x, clipped to [0, 255], each image's drawn from its own
    generator (``image_noise`` salted with ``salt``): independent of the batch size, the ranks and the device.
    ``eps`` may be one ε per image (a tensor that broadcasts against x)."""
    return clip_image(x + (2 * ctx.image_noise(x, "rand", "random_start", *salt) - 1) * eps)


def pgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
        iterations: int | dict[float, int] | None = None, random_start: bool = False, restart: int = 0
        ) -> torch.Tensor:
    """Projected gradient descent (Kurakin et al. / Madry et al.): iterated FGSM steps of size ``step`` gray
    values, each followed by projection onto the L∞ ε-ball around x and onto [0, 255]; ``iterations`` as in
    ``pgd_iterations``. One ε of ``pgd_sweep``."""
    return pgd_sweep(ctx, x, y, [eps], step, iterations, random_start, restart)[eps]


def pgd_sweep(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], step: float = 1.0,
              iterations: int | dict[float, int] | None = None, random_start: bool = False, restart: int = 0
              ) -> dict[float, torch.Tensor]:
    """``pgd`` at every ε of a sweep at once: the ε copies of the batch are stacked into one larger batch, and each
    copy iterates until its own iteration count is reached (the copies still iterating share each gradient pass,
    chunked by ``ctx.pass_images``). Equal, element for element, to PGD run at each ε in turn: each image's
    random start is its own draw (``random_start_point``, salted "pgd", ε and ``restart``), and each copy's
    gradient is its own."""
    counts = [pgd_iterations(e, iterations) for e in epsilons]
    b = x.shape[0]
    starts = [random_start_point(ctx, x, e, "pgd", e, restart) if random_start else x.clone() for e in epsilons]
    x_adv = torch.cat(starts)
    x0 = x.repeat(len(epsilons), *([1] * (x.dim() - 1)))
    eps = epsilon_column(epsilons, b, x)
    for it in range(max(counts)):
        active = [i for i, n in enumerate(counts) if n > it]
        rows = torch.cat([torch.arange(i * b, (i + 1) * b, device=x.device) for i in active])
        xa = x_adv[rows]
        direction = fgsm_direction(ctx.input_gradient(xa, y, copies=len(active)))
        x_adv[rows] = project(xa + step * direction, x0[rows], eps[rows])
    return {e: x_adv[i * b:(i + 1) * b] for i, e in enumerate(epsilons)}


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Projection onto the L∞ ε-ball around x, then onto real images [0, 255] (PGD's projection step); ``eps``
    may be a tensor that broadcasts against x (one ε per image)."""
    return clip_image(torch.maximum(torch.minimum(x_adv, x + eps), x - eps))


@register("perturbation", "fgsm")
class FGSM(Perturbation):
    """FGSM (eq. 8) on the weighted cross-entropy J^ce of eq. 1; one backward pass serves every ε."""

    needs_gradient = True

    def sweep(self, ctx, x, y, epsilons):
        direction = fgsm_direction(ctx.input_gradient(x, y))
        return {e: clip_image(fgsm(x, direction, e)) for e in epsilons}


class PGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: PositiveInt | dict[float, PositiveInt] | None = Field(
        None, description="null: ceil(min(ε+4, 1.25ε)); a count, or ε → count, e.g. {16: 30}")
    random_start: bool = False
    restarts: PositiveInt = Field(1, description="runs per image (after the first, each from a random start); the "
                                                 "example with the highest loss is kept")


def strongest(ctx: AttackContext, candidates: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per image, the candidate adversarial example with the highest attacked loss (restarts, ensembles); a tie
    goes to the earlier candidate."""
    if len(candidates) == 1:
        return candidates[0]
    losses = torch.stack([ctx.image_losses_of(c, y) for c in candidates])  # one pass per candidate
    best = losses.argmax(0)  # (B,) on the device: the selection is an index, never read back
    stacked = torch.stack(candidates)
    return stacked[best, torch.arange(stacked.shape[1], device=best.device)]


@register("perturbation", "pgd")
class PGD(Perturbation):
    """PGD: step 1 gray value, ceil(min(ε+4, 1.25ε)) iterations (Kurakin et al.), L∞ projection, every ε of the
    sweep in one batch (``pgd_sweep``); options: step, iterations (a count, or ε → count), random_start, restarts
    (the strongest of several runs per image)."""

    Options = PGDOptions
    needs_gradient = True
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        o = self.options
        runs = [pgd_sweep(ctx, x, y, list(epsilons), o.step, o.iterations, o.random_start or r > 0, r)
                for r in range(o.restarts)]
        return {e: strongest(ctx, [run[e] for run in runs], y) for e in epsilons}
