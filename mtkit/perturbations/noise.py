"""Noise at equal SNR (paper sec. 3.4, eq. 6-7): Gaussian noise and salt and pepper, each image drawn from its own
generator."""

from __future__ import annotations

import torch

from ..core.registry import register
from .base import Perturbation
from .context import clip_image, draw


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
    whole batch in one pass on ``x``'s device (``salt_and_pepper_ordered``): each image's salt-or-pepper values and
    pixel order are drawn on its generator's device (the CPU: the same numbers everywhere). The evaluation draws
    on the device instead (``salt_and_pepper_keyed``)."""
    n = x.shape[-2] * x.shape[-1]
    values, orders = [], []
    for g in generators:  # per image: its values, then its order, as the per-image algorithm draws them
        where = g.device if g is not None else "cpu"
        values.append(torch.randint(0, 2, (n, 1), generator=g, device=where))
        orders.append(torch.randperm(n, generator=g, device=where))
    return salt_and_pepper_ordered(x, eps, torch.stack(values).to(x.device), torch.stack(orders).to(x.device))


def salt_and_pepper_keyed(x: torch.Tensor, eps: float, words: torch.Tensor) -> torch.Tensor:
    """``salt_and_pepper`` from random words (B, 3·H·W) drawn on ``x``'s device (``AttackContext.image_words``):
    pixel p is salt or pepper by the lowest bit of word p, and the pixels are taken in the order of the 63-bit
    keys that words H·W + p and 2·H·W + p make (a stable sort: the order is the same on every device)."""
    n = x.shape[-2] * x.shape[-1]
    values = (words[:, :n] & 1).unsqueeze(-1)
    keys = ((words[:, n:2 * n] >> 1) << 32) | words[:, 2 * n:3 * n]
    return salt_and_pepper_ordered(x, eps, values, torch.sort(keys, dim=1, stable=True).indices)


def salt_and_pepper_ordered(x: torch.Tensor, eps: float, values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The batched salt and pepper of ``salt_and_pepper`` once each image's salt-or-pepper bits (B, H·W, 1) and
    the order its pixels are taken in (B, H·W) are drawn, all on ``x``'s device: the running sums, the cut where
    they reach ε²·N, the best-matching last pixel (the first in the image's order among equals) and the result
    are tensor operations in float64, without reading anything back."""
    b, c, h, w = x.shape
    n = h * w
    values = values.double() * 255.0  # (B, n, 1)
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


@register("perturbation", "gaussian")
class Gaussian(Perturbation):
    """Gaussian noise r ~ N(0, ε²) (eq. 6-7)."""

    epsilon_meaning = "σ = ε: RMS ε in expectation, a little less after clipping to [0, 255] (eq. 6-7)"

    def sweep(self, ctx, x, y, epsilons):
        out = {}
        for e in epsilons:
            out[e] = clip_image(x + e * ctx.image_noise(x, "randn", "gaussian", e))
        return out


@register("perturbation", "salt_pepper")
class SaltPepper(Perturbation):
    """Salt and pepper noise with the fraction of pixels chosen per image so that its measured ε hits the request."""

    epsilon_meaning = "pixels set to 0 or 255 until each image's RMS reaches ε (met to within one pixel)"

    def sweep(self, ctx, x, y, epsilons):
        n = x.shape[-2] * x.shape[-1]
        return {e: salt_and_pepper_keyed(x, e, ctx.image_words(x.shape[0], 3 * n, x.device, "salt_pepper", e))
                for e in epsilons}
