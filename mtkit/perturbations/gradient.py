"""Gradient attacks on the attacked loss (J^ce of eq. 1 by default): FGSM (eq. 8), the paper's PGD (an L∞ bound ε)
and PGD at equal SNR (``pgd_rms``: the L2 ball of RMS ε, eq. 7), every ε of a sweep in one stacked batch; restarts
and the per-image strongest candidate."""

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


def l2_radius(eps: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """The radius ε·√N of the L2 ball of perturbations r with RMS(r) ≤ ε (eq. 7), N = C·H·W of one image."""
    return eps * math.sqrt(x[0].numel())


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, radius: float | torch.Tensor, steps: int = 40) -> torch.Tensor:
    """The Euclidean projection of ``x_adv`` onto {x + r : ‖r‖₂ ≤ radius, x + r ∈ [0, 255]}, per image (``radius``
    one value, or one per image broadcasting against x). Its optimality conditions give r = clip(s·v) with v =
    x_adv − x, clip to the image box [−x, 255 − x] and one scale s ∈ (0, 1] per image (s = 1/(1 + μ), μ the
    multiplier of the ball): s = 1 where clip(v) lies in the ball, else the s with ‖clip(s·v)‖ = radius, found by
    bisection (the norm grows with s), ``steps`` halvings on the device without reading back. Clipping after an
    L2 projection, the usual order, would leave the perturbation short of its radius wherever pixels saturate;
    this one keeps RMS(r) = ε on the sphere."""
    v, lo, hi = x_adv - x, -x, 255.0 - x
    b = v.shape[0]
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device).reshape(-1)
    radius = radius.expand(b) if radius.numel() == 1 else radius

    def norm(s: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(s.view(-1, *([1] * (v.dim() - 1))) * v, hi), lo).flatten(1).norm(dim=1)

    low, high = torch.zeros(b, dtype=v.dtype, device=v.device), torch.ones(b, dtype=v.dtype, device=v.device)
    inside = norm(high) <= radius
    for _ in range(steps):
        mid = (low + high) / 2
        over = norm(mid) > radius
        high, low = torch.where(over, mid, high), torch.where(over, low, mid)
    s = torch.where(inside, torch.ones_like(low), low).view(-1, *([1] * (v.dim() - 1)))
    return x + torch.maximum(torch.minimum(s * v, hi), lo)


def l2_direction(gradient: torch.Tensor) -> torch.Tensor:
    """∇/‖∇‖₂ per image: the steepest ascent of the L2 geometry (a zero gradient stays zero)."""
    n = gradient.flatten(1).norm(dim=1).clamp_min(1e-20)
    return gradient / n.view(-1, *([1] * (gradient.dim() - 1)))


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
              iterations: int | dict[float, int] | None = None, random_start: bool = False, restart: int = 0,
              norm: str = "linf") -> dict[float, torch.Tensor]:
    """``pgd`` at every ε of a sweep at once: the ε copies of the batch are stacked into one larger batch, and each
    copy iterates until its own iteration count is reached (the copies still iterating share each gradient pass,
    chunked by ``ctx.pass_images``). Equal, element for element, to PGD run at each ε in turn: each image's
    random start is its own draw (``random_start_point``, salted "pgd", ε and ``restart``), and each copy's
    gradient is its own.

    ``norm`` "l2" is ``pgd_rms``: the ball of RMS ε (radius ε·√N, ``l2_radius``), steps of ``step`` · radius / its
    iteration count along ∇/‖∇‖₂ (Madry et al.'s 2.5 ε / T for ``step`` 2.5), the exact projection onto the ball
    and the image box (``project_l2``); its random start is a uniform draw of the L∞ ball of half-width ε·√3
    (RMS ε), projected."""
    counts = [pgd_iterations(e, iterations) for e in epsilons]
    b = x.shape[0]
    l2 = norm == "l2"
    starts = [random_start_point(ctx, x, e * math.sqrt(3) if l2 else e, "pgd", e, restart) if random_start
              else x.clone() for e in epsilons]
    x_adv = torch.cat(starts)
    x0 = x.repeat(len(epsilons), *([1] * (x.dim() - 1)))
    eps = epsilon_column(epsilons, b, x)
    if l2:
        radius = l2_radius(eps.flatten(), x)
        steps = step * radius / torch.cat([torch.full((b,), float(n), dtype=x.dtype, device=x.device) for n in counts])
        x_adv = project_l2(x_adv, x0, radius)
    for it in range(max(counts)):
        active = [i for i, n in enumerate(counts) if n > it]
        rows = torch.cat([torch.arange(i * b, (i + 1) * b, device=x.device) for i in active])
        xa = x_adv[rows]
        gradient = ctx.input_gradient(xa, y, copies=len(active))
        if l2:
            x_adv[rows] = project_l2(xa + steps[rows].view(-1, *([1] * (x.dim() - 1))) * l2_direction(gradient),
                                     x0[rows], radius[rows])
        else:
            x_adv[rows] = project(xa + step * fgsm_direction(gradient), x0[rows], eps[rows])
    return {e: x_adv[i * b:(i + 1) * b] for i, e in enumerate(epsilons)}


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Projection onto the L∞ ε-ball around x, then onto real images [0, 255] (PGD's projection step); ``eps``
    may be a tensor that broadcasts against x (one ε per image)."""
    return clip_image(torch.maximum(torch.minimum(x_adv, x + eps), x - eps))


@register("perturbation", "fgsm")
class FGSM(Perturbation):
    """FGSM (eq. 8) on the weighted cross-entropy J^ce of eq. 1; one backward pass serves every ε."""

    needs_gradient = True
    epsilon_meaning = "every element moved by ±ε: RMS ε before clipping to [0, 255] (eq. 7-8)"

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
    epsilon_meaning = "L∞ bound ε (the paper's PGD): every element within ±ε, so RMS ≤ ε, measured well below"
    #: the ball it attacks in (``pgd_sweep``'s ``norm``)
    norm = "linf"

    def sweep(self, ctx, x, y, epsilons):
        o = self.options
        runs = [pgd_sweep(ctx, x, y, list(epsilons), o.step, o.iterations, o.random_start or r > 0, r, self.norm)
                for r in range(o.restarts)]
        return {e: strongest(ctx, [run[e] for run in runs], y) for e in epsilons}


class PGDRMSOptions(PGDOptions):
    step: float = Field(2.5, gt=0, description="step size as a multiple of the ball's radius per iteration count "
                                               "(Madry et al.'s 2.5 ε / T)")


@register("perturbation", "pgd_rms")
class PGDRMS(PGD):
    """PGD at equal SNR: the paper's PGD iterations and restarts in the L2 ball of radius ε·√N, which is exactly
    the perturbations of RMS ≤ ε (eq. 7), with normalised gradient steps and the exact projection onto the ball
    and the image box (``pgd_sweep`` with norm "l2"). It ends on the sphere, so its measured ε equals ε where the
    paper's PGD (an L∞ bound ε) measures well below ε: compare it with FGSM and the noises at equal SNR."""

    Options = PGDRMSOptions
    epsilon_meaning = "L2 ball of RMS ε (radius ε·√N): RMS ≤ ε, = ε on the sphere where it ends"
    norm = "l2"
