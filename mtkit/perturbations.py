"""Input perturbations at equal SNR (paper sec. 3.4, eq. 6-8).

Every perturbation acts on images x in gray values 0..255 (the model normalizes internally) and takes a
strength ε in gray values, the RMS of the perturbation r = x_adv - x over H·W·C (eq. 7), so equal ε means equal
SNR across types. The perturbed image is clipped to [0, 255]; ``measured_epsilon`` gives the RMS after clipping.

A perturbation is a class in the ``perturbation`` registry with ``needs_gradient`` and
``sweep(ctx, x, y, epsilons) -> {ε: x_adv}``: a sweep may share work between strengths (FGSM's gradient does not
depend on ε, so one backward pass serves the whole sweep).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MtkitError
from .losses import weighted_cross_entropy
from .registry import register


@dataclass
class AttackContext:
    """What a perturbation may use: the segmenter (gray values → logits), the class weights of eq. 1, and a
    random generator (seeded by the evaluation)."""

    model: nn.Module
    class_weights: torch.Tensor | None
    generator: torch.Generator

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """J^ce of eq. 1 against the ground truth (void ignored)."""
        return weighted_cross_entropy(self.model(x), y, self.class_weights)

    def gradient(self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """∇_x loss_fn(model(x)) (one forward and one backward pass): the one place attacks differentiate."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(self.model(x)), x)
        return grad

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇_x J^ce(ȳ, y(x)) of eq. 1 against the ground truth (void ignored)."""
        if y is None:
            raise MtkitError("a gradient attack needs ground-truth labels; this dataset gives none")
        return self.gradient(x, lambda logits: weighted_cross_entropy(logits, y, self.class_weights))


def clip_image(x: torch.Tensor) -> torch.Tensor:
    """A real image: gray values clipped to [0, 255]."""
    return x.clamp(0.0, 255.0)


def measured_epsilon(x_adv: torch.Tensor, x: torch.Tensor) -> float:
    """ε = sqrt(1/(HWC) Σ r²) with r = x_adv - x (eq. 7), over all elements given."""
    return float(((x_adv - x).double() ** 2).mean().sqrt())


def gaussian_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """r ~ N(0, ε²) per element (eq. 6-7): ε is the standard deviation. Returns x + r, unclipped."""
    return x + eps * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def salt_and_pepper(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fraction f of pixels set to 0 or 255 (all channels, equal probability), f chosen for the batch so that
    the measured ε of r = x_adv - x (eq. 7) hits the requested ε.

    ε cannot be imposed in advance (paper sec. 3.4): pixels are taken in random order until the cumulated squared
    error reaches ε²·N (N = B·C·H·W); the last pixel is the remaining one whose contribution best matches the
    deficit, so the measured ε lands within a fraction of a percent of the request.
    """
    b, c, h, w = x.shape
    target = eps**2 * x.numel()
    flat = x.permute(0, 2, 3, 1).reshape(-1, c).double()
    n = flat.shape[0]
    values = torch.randint(0, 2, (n, 1), generator=generator, device="cpu").to(x.device).double() * 255.0
    contrib = ((values - flat) ** 2).sum(1)
    order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
    cum = contrib[order].cumsum(0)
    k = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype, device=cum.device)))
    k = min(k, n)
    chosen = order[:k]
    deficit = target - (float(cum[k - 1]) if k > 0 else 0.0)
    rest = order[k:]
    if deficit > 0 and rest.numel():
        best = rest[(contrib[rest] - deficit).abs().argmin()]
        if abs(float(contrib[best]) - deficit) < deficit:
            chosen = torch.cat([chosen, best.view(1)])
    out = flat.clone()
    out[chosen] = values[chosen].expand(-1, c)
    return out.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def fgsm_direction(gradient: torch.Tensor) -> torch.Tensor:
    """sign(∇_x J^ce) of eq. 8, with a zero gradient counted as +1 so that every element moves by exactly ±ε and
    the RMS of r equals ε (eq. 7)."""
    return torch.where(gradient >= 0, 1.0, -1.0).to(gradient.dtype)


def fgsm(x: torch.Tensor, direction: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv = x + ε·sign(∇_x J^ce) (eq. 8), unclipped."""
    return x + eps * direction


def pgd_iterations(eps: float) -> int:
    """Kurakin et al.'s default number of iterations: ceil(min(ε + 4, 1.25 ε)) (ε in gray values)."""
    return max(1, math.ceil(min(eps + 4.0, 1.25 * eps)))


def pgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
        iterations: int | None = None, random_start: bool = False) -> torch.Tensor:
    """Projected gradient descent (Kurakin et al. / Madry et al.): iterated FGSM steps of size ``step`` gray
    values, each followed by projection onto the L∞ ε-ball around x and onto [0, 255]."""
    iterations = pgd_iterations(eps) if iterations is None else iterations
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=ctx.generator, dtype=x.dtype, device="cpu").to(x.device)
        x_adv = clip_image(x + (2 * noise - 1) * eps)
    for _ in range(iterations):
        x_adv = project(x_adv + step * fgsm_direction(ctx.input_gradient(x_adv, y)), x, eps)
    return x_adv


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the L∞ ε-ball around x, then onto real images [0, 255] (PGD's projection step)."""
    return clip_image(torch.maximum(torch.minimum(x_adv, x + eps), x - eps))


class Perturbation:
    """Base class of the registry's perturbations. Subclasses set ``needs_gradient`` and implement ``sweep``."""

    needs_gradient = False
    #: what the sweep's keys are: "epsilon" (requested RMS ε in gray values, eq. 7) or another level such as a
    #: corruption's "severity", whose ε is only measured (recorded per row as ``epsilon_measured``)
    level_kind = "epsilon"

    def __init__(self, **options: Any) -> None:
        if options:
            raise MtkitError(f"perturbation '{type(self).__name__}' takes no options, got {sorted(options)}")

    def levels(self, epsilons: list[float]) -> list[float]:
        """The keys this perturbation's ``sweep`` returns for the recipe's ε list (by default the ε list)."""
        return list(epsilons)

    def sweep(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None,
              epsilons: list[float]) -> dict[float, torch.Tensor]:
        raise NotImplementedError


@register("perturbation", "gaussian")
class Gaussian(Perturbation):
    """Gaussian noise r ~ N(0, ε²) (eq. 6-7)."""

    def sweep(self, ctx, x, y, epsilons):
        return {e: clip_image(gaussian_noise(x, e, ctx.generator)) for e in epsilons}


@register("perturbation", "salt_pepper")
class SaltPepper(Perturbation):
    """Salt and pepper noise with the fraction of pixels chosen so that the measured ε hits the request."""

    def sweep(self, ctx, x, y, epsilons):
        return {e: salt_and_pepper(x, e, ctx.generator) for e in epsilons}


@register("perturbation", "fgsm")
class FGSM(Perturbation):
    """FGSM (eq. 8) on the weighted cross-entropy J^ce of eq. 1; one backward pass serves every ε."""

    needs_gradient = True

    def sweep(self, ctx, x, y, epsilons):
        direction = fgsm_direction(ctx.input_gradient(x, y))
        return {e: clip_image(fgsm(x, direction, e)) for e in epsilons}


@register("perturbation", "pgd")
class PGD(Perturbation):
    """PGD: step 1 gray value, ceil(min(ε+4, 1.25ε)) iterations (Kurakin et al.), L∞ projection; options:
    step, iterations, random_start."""

    needs_gradient = True

    def __init__(self, step: float = 1.0, iterations: int | None = None, random_start: bool = False) -> None:
        if step <= 0:
            raise MtkitError(f"pgd step must be positive gray values, got {step}")
        self.step = step
        self.iterations = iterations
        self.random_start = random_start

    def sweep(self, ctx, x, y, epsilons):
        return {e: pgd(ctx, x, y, e, self.step, self.iterations, self.random_start) for e in epsilons}


def build_perturbation(name: str, options: dict[str, Any] | None = None) -> Perturbation:
    from .plugins import get_registry

    cls = get_registry().get("perturbation", name)
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise MtkitError(f"perturbation '{name}': bad options {options}: {exc}") from None
