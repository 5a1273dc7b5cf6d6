"""Input perturbations at equal SNR (paper sec. 3.4, eq. 6-8).

Every perturbation acts on images x in gray values 0..255 (the model normalizes internally) and takes a
strength ε in gray values, the RMS of the perturbation r = x_adv - x over H·W·C (eq. 7), so equal ε means equal
SNR across types. The perturbed image is clipped to [0, 255]; ``measured_epsilon`` gives the RMS after clipping.

A perturbation is a class in the ``perturbation`` registry with typed ``Options`` (validated when the recipe
loads), ``needs_gradient`` (noise types run without autograd) and ``sweep(ctx, x, y, epsilons) -> {ε: x_adv}``:
a sweep may share work between strengths (FGSM's gradient does not depend on ε, so one backward pass serves the
whole sweep).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from .errors import MtkitError
from .losses import IGNORE_INDEX, weighted_cross_entropy, weighted_cross_entropy_per_image
from .registry import register


def image_generator(seed: int, index: int, *salt: Any) -> torch.Generator:
    """A random generator for one image, seeded by a stable hash of (evaluation seed, the image's index in its
    dataset, salt such as the perturbation and ε): an image's noise does not depend on the batch it is in, nor on
    the number of ranks. A CPU generator (draw with ``draw``), so the numbers are the same on every device."""
    blob = json.dumps([seed, index, *salt], default=str).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1)


DISTRIBUTIONS = {"rand": torch.rand, "randn": torch.randn}


def draw(kind: str, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random numbers (``kind`` "rand": uniform [0, 1), "randn": standard normal) from ``generator`` on the
    generator's own device, then moved to ``device``: the one way perturbations draw. A CPU generator used with
    ``device=`` a GPU would fail (torch wants a CUDA generator for a CUDA tensor); drawing where the generator
    lives and moving the result gives the same numbers on the CPU and on any GPU."""
    where = generator.device if generator is not None else torch.device("cpu")
    return DISTRIBUTIONS[kind](tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


@dataclass
class AttackContext:
    """What a perturbation may use: the segmenter (gray values → logits), the class weights of eq. 1, a random
    generator (seeded by the evaluation), and the evaluation seed and dataset indices of the batch's images for
    per-image generators (``image_generators``).

    Devices: the images, labels and model are on the evaluation's device (CPU or GPU); ``generator`` and every
    generator of ``image_generators`` are CPU generators. Draw with ``draw`` (or ``image_noise``, one draw per
    image), never ``torch.rand(..., generator=g, device=x.device)``, which fails on a GPU. ``generator`` is one
    stream for the whole evaluation (its draws depend on the batch order); ``image_noise`` and
    ``image_generators`` give each image its own, independent of the batch size and of the rank count."""

    model: nn.Module
    class_weights: torch.Tensor | None
    generator: torch.Generator
    seed: int = 0
    indices: list[int] | None = None
    #: the attacked loss J(logits, labels): the recipe's ``loss.segmentation`` (default J^ce of eq. 1)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: the most images in one forward/backward pass (a batched sweep chunks its ε copies by it); None: no limit
    pass_images: int | None = None

    def objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(logits, y)
        return weighted_cross_entropy(logits, y, self.class_weights)

    def image_generators(self, batch: int, *salt: Any) -> list[torch.Generator]:
        """One generator per image of the batch (see ``image_generator``); without dataset indices, the positions
        in the batch stand in for them."""
        indices = self.indices if self.indices is not None else list(range(batch))
        if len(indices) != batch:
            raise ValueError(f"AttackContext has {len(indices)} image indices for a batch of {batch}")
        return [image_generator(self.seed, i, *salt) for i in indices]

    def image_noise(self, x: torch.Tensor, kind: str, *salt: Any) -> torch.Tensor:
        """Random numbers of ``x``'s shape, dtype and device (``kind`` as ``draw``), each image's from its own
        generator (``image_generators(len(x), *salt)``): the same values whatever the batch, the ranks or the
        device. Salt with the perturbation's name and ε (and a restart's number) so that draws differ."""
        gens = self.image_generators(x.shape[0], *salt)
        return torch.stack([draw(kind, x.shape[1:], g, "cpu", x.dtype) for g in gens]).to(x.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attacked loss (J^ce of eq. 1 by default) against the ground truth (void ignored)."""
        return self.objective(self.model(x), y)

    def gradient(self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """∇_x loss_fn(model(x)) (one forward and one backward pass): the one place attacks differentiate. It runs
        in fp32 even inside an autocast region: the sign of a bf16 gradient flips on small values."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            (grad,) = torch.autograd.grad(loss_fn(self.model(x)), x)
        return grad

    def image_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attacked loss of each image on its own (J^ce of eq. 1 over that image's labelled pixels by default):
        a tensor of one value per image, for attacks and ensembles that track each image (APGD, restarts, the
        worst case). ``logits`` may stack copies of ``y``'s batch. Batched where the loss says how
        (``per_image``, as the built-in cross-entropies); image by image otherwise."""
        labels = y.repeat(logits.shape[0] // y.shape[0], *([1] * (y.dim() - 1)))
        if self.loss_fn is None:
            return weighted_cross_entropy_per_image(logits, labels, self.class_weights)
        per_image = getattr(self.loss_fn, "per_image", None)
        if per_image is not None:
            return per_image(logits, labels)
        return torch.stack([self.objective(logits[i:i + 1], labels[i:i + 1]) for i in range(logits.shape[0])])

    def image_loss_gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's attacked loss (``image_losses``) and its gradient ∇_x, in passes of at most ``pass_images``
        images; ``x`` may stack copies of ``y``'s batch. The loss of an image depends on that image only, so the
        gradient of their sum gives each image exactly its own gradient."""
        if y is None:
            raise MtkitError("a gradient attack needs ground-truth labels; this dataset gives none")
        labels = y.repeat(x.shape[0] // y.shape[0], *([1] * (y.dim() - 1)))
        losses, grads = [], []
        for xs, ys in zip(x.split(self.pass_images or x.shape[0]), labels.split(self.pass_images or x.shape[0])):
            box = []

            def total(logits, ys=ys, box=box):
                values = self.image_losses(logits, ys)
                box.append(values.detach())
                return values.sum()
            grads.append(self.gradient(xs, total))
            losses.append(box[0])
        return torch.cat(losses), torch.cat(grads)

    def image_losses_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``image_losses`` of the model's prediction for ``x`` (no gradient; fp32, in passes of ``pass_images``)."""
        labels = y.repeat(x.shape[0] // y.shape[0], *([1] * (y.dim() - 1)))
        n = self.pass_images or x.shape[0]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return torch.cat([self.image_losses(self.model(xs), ys) for xs, ys in zip(x.split(n), labels.split(n))])

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """∇_x J(ȳ, y(x)) of the attacked loss (J^ce of eq. 1 by default) against the ground truth.

        ``x`` may stack ``copies`` copies of the batch (a batched sweep: one copy per ε). The gradient is then that
        of Σ_c J(ȳ, y(x_c)), so each copy gets exactly its own gradient, taken in passes of at most
        ``pass_images`` images (whole copies per pass)."""
        if y is None:
            raise MtkitError("a gradient attack needs ground-truth labels; this dataset gives none")
        b = x.shape[0] // copies
        per_pass = max(1, (self.pass_images or x.shape[0]) // b)
        grads = []
        for c0 in range(0, copies, per_pass):
            n = min(per_pass, copies - c0)
            grads.append(self.gradient(x[c0 * b:(c0 + n) * b], lambda logits, n=n: torch.stack(
                [self.objective(logits[i * b:(i + 1) * b], y) for i in range(n)]).sum()))
        return grads[0] if len(grads) == 1 else torch.cat(grads)


def clip_image(x: torch.Tensor) -> torch.Tensor:
    """A real image: gray values clipped to [0, 255]."""
    return x.clamp(0.0, 255.0)


def measured_epsilon(x_adv: torch.Tensor, x: torch.Tensor) -> float:
    """ε = sqrt(1/(HWC) Σ r²) with r = x_adv - x (eq. 7), over all elements given."""
    return float(((x_adv - x).double() ** 2).mean().sqrt())


def gaussian_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """r ~ N(0, ε²) per element (eq. 6-7): ε is the standard deviation. Returns x + r, unclipped; ``generator``
    may live on another device than ``x`` (``draw``)."""
    return x + eps * draw("randn", x.shape, generator, x.device, x.dtype)


def salt_and_pepper(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fraction f of pixels set to 0 or 255 (all channels, equal probability), f chosen for each image of the
    batch (C, H, W) on its own so that the measured ε of r = x_adv - x (eq. 7) over that image hits the request.

    ε cannot be imposed in advance (paper sec. 3.4): pixels are taken in random order until the cumulated squared
    error reaches ε²·N (N = C·H·W of the image); the last pixel is the remaining one whose contribution best
    matches the deficit. Granularity limit: one pixel changes ε² by up to C·255²/N, so on a small image a tiny ε
    can only be met to within one pixel (at 64x192, one pixel of a mid-gray image is ε ≈ 0.7 alone); the
    measured ε of every image is recorded. With a ``generator``, one generator serves the images in turn; the
    evaluation gives each image its own (``AttackContext.image_generators``).
    """
    return salt_and_pepper_per_image(x, eps, [generator] * x.shape[0])


def salt_and_pepper_per_image(x: torch.Tensor, eps: float, generators: list[torch.Generator | None]
                              ) -> torch.Tensor:
    """``salt_and_pepper`` with one generator per image (an image's result does not depend on its batch), the
    whole batch in one pass on ``x``'s device: each image's salt-or-pepper values and pixel order are drawn on its
    generator's device (the CPU: the same numbers everywhere), then the running sums, the cut where they reach
    ε²·N, the best-matching last pixel (the first in the image's order among equals) and the result are batched
    tensor operations, in float64, without reading anything back."""
    b, c, h, w = x.shape
    n = h * w
    values, orders = [], []
    for g in generators:  # per image: its values, then its order, as the per-image algorithm draws them
        where = g.device if g is not None else "cpu"
        values.append(torch.randint(0, 2, (n, 1), generator=g, device=where))
        orders.append(torch.randperm(n, generator=g, device=where))
    values = torch.stack(values).to(x.device).double() * 255.0  # (B, n, 1)
    order = torch.stack(orders).to(x.device)  # (B, n): the pixels in the order they are taken
    flat = x.permute(0, 2, 3, 1).reshape(b, n, c).double()
    contrib = ((values - flat) ** 2).sum(2)  # each pixel's Σ r² if taken
    cum = contrib.gather(1, order).cumsum(1)
    target = torch.full((b, 1), eps**2 * c * n, dtype=cum.dtype, device=cum.device)
    k = torch.searchsorted(cum, target)  # (B, 1): pixels taken before the sum reaches the target
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    chosen = rank < k
    deficit = target - torch.where(k > 0, cum.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(target))
    gap = (contrib - deficit).abs()
    position = torch.where(rank >= k, gap, torch.inf).gather(1, order).argmin(1, keepdim=True)  # first in order
    best = order.gather(1, position)
    add = (deficit > 0) & (k < n) & (gap.gather(1, best) < deficit)
    chosen = chosen.scatter(1, best, chosen.gather(1, best) | add)
    out = torch.where(chosen.unsqueeze(-1), values.expand(b, n, c), flat)
    return out.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


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
    eps = torch.tensor(epsilons, dtype=x.dtype, device=x.device).repeat_interleave(b).view(-1, *([1] * (x.dim() - 1)))
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


class PerturbationOptions(BaseModel):
    """Base of a perturbation's typed options (unknown keys are refused); the base takes none."""

    model_config = ConfigDict(extra="forbid")


class Perturbation:
    """Base class of the registry's perturbations. Subclasses set ``needs_gradient`` and ``Options`` and
    implement ``sweep``; ``self.options`` holds the validated options."""

    Options: ClassVar[type[BaseModel]] = PerturbationOptions
    #: gradient attacks run with autograd; noise types run under ``torch.no_grad``
    needs_gradient = False
    #: an iterative attack on each image: the gradient-masking checks expect it at least as strong as FGSM
    iterative = False
    #: what the sweep's keys are: "epsilon" (requested RMS ε in gray values, eq. 7) or another level such as a
    #: corruption's "severity", whose ε is only measured (recorded per row as ``epsilon_measured``)
    level_kind = "epsilon"

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

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
        out = {}
        for e in epsilons:
            out[e] = clip_image(x + e * ctx.image_noise(x, "randn", "gaussian", e))
        return out


@register("perturbation", "salt_pepper")
class SaltPepper(Perturbation):
    """Salt and pepper noise with the fraction of pixels chosen per image so that its measured ε hits the request."""

    def sweep(self, ctx, x, y, epsilons):
        return {e: salt_and_pepper_per_image(x, e, ctx.image_generators(x.shape[0], "salt_pepper", e))
                for e in epsilons}


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
    best = losses.argmax(0)
    return torch.stack([candidates[int(k)][i] for i, k in enumerate(best)])


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
    eps = torch.tensor(epsilons, dtype=x.dtype, device=x.device).repeat_interleave(b).view(shape)
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
