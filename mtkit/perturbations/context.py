"""What a perturbation works with: the attack context (model, loss, gradients, per-image losses), the random
draws (per-image CPU generators, ``draw``, moved to the device), and the measure of a perturbation (eq. 7)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import MtkitError
from ..core.precision import fp32
from ..ops.losses import weighted_cross_entropy, weighted_cross_entropy_per_image
from ..ops.philox import image_keys, normal, random_words, uniform


def image_generator(seed: int, index: int, *salt: Any) -> torch.Generator:
    """A random generator for one image, seeded by a stable hash of (evaluation seed, the image's index in its
    dataset, salt such as the perturbation and ε): an image's noise does not depend on the batch it is in, nor on
    the number of ranks. A CPU generator (draw with ``draw``), so the numbers are the same on every device."""
    blob = json.dumps([seed, index, *salt], default=str).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1)


def epsilon_column(epsilons: list[float], batch: int, like: torch.Tensor) -> torch.Tensor:
    """(len(epsilons) · batch, 1, 1, 1) of ``like``'s dtype and device: each ε repeated for the ``batch`` images of
    its copy in a batched sweep, made on the device by fills (``torch.tensor(list, device=…)`` would be a blocking
    copy from the host on a GPU)."""
    column = torch.cat([torch.full((batch,), float(e), dtype=like.dtype, device=like.device) for e in epsilons])
    return column.view(-1, *([1] * (like.dim() - 1)))


def repeat_labels(y: torch.Tensor, rows: int) -> torch.Tensor:
    """The labels of a batch for ``rows`` stacked images: ``y`` repeated once per copy of the batch that a batched
    sweep stacks (one copy per ε), in the stacking order of ``torch.cat``."""
    return y.repeat(rows // y.shape[0], *([1] * (y.dim() - 1)))


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
    #: the multi-task network ``model`` belongs to, when it has a depth head (``MultiTaskNet.predict`` gives the
    #: logits and the depth): attacks on the attack detector use it; None for single-task and external models
    multitask: nn.Module | None = None
    #: the attack detector the evaluation reports (``Detector``; the detection stage's), which an adaptive attack
    #: (``opgd``) attacks through its ``differentiable_score``; None: the registry's ``edge_consistency``
    detector: Any = None
    #: what a perturbation computed once for this batch and may reuse (``Perturbation.targets_of``)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

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

    def image_words(self, batch: int, n: int, device: torch.device | str, *salt: Any) -> torch.Tensor:
        """(B, n) random 32-bit words (int64 in [0, 2³²)) per image, drawn on ``device`` by Philox-4x32-10
        (``mtkit.ops.philox``) from a stream keyed by the evaluation seed, the salt and the image's dataset index:
        the same integers on every device, batch size and rank count, with no generator on the host."""
        indices = self.indices if self.indices is not None else list(range(batch))
        if len(indices) != batch:
            raise ValueError(f"AttackContext has {len(indices)} image indices for a batch of {batch}")
        return random_words(image_keys(self.seed, indices, device, *salt), n)

    def image_noise(self, x: torch.Tensor, kind: str, *salt: Any) -> torch.Tensor:
        """Random numbers of ``x``'s shape, dtype and device (``kind`` "rand": uniform [0, 1), "randn": standard
        normal), each image's from its own Philox stream (``image_words``), drawn on ``x``'s device: the same
        values whatever the batch, the ranks or the device (a normal value may differ in its last bit between
        devices: log and cos round there). Salt with the perturbation's name and ε (and a restart's number) so
        that draws differ."""
        words = self.image_words(x.shape[0], x[0].numel(), x.device, *salt)
        values = uniform(words, x.dtype) if kind == "rand" else normal(words, x.dtype)
        return values.view_as(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attacked loss (J^ce of eq. 1 by default) against the ground truth (void ignored)."""
        return self.objective(self.model(x), y)

    def gradient(self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """∇_x loss_fn(model(x)) (one forward and one backward pass): the one place attacks differentiate. It runs
        in fp32 even inside an autocast region: the sign of a bf16 gradient flips on small values."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), fp32(x.device.type):
            (grad,) = torch.autograd.grad(loss_fn(self.model(x)), x)
        return grad

    def gradients(self, x: torch.Tensor, objectives: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
                  ) -> tuple[torch.Tensor, ...]:
        """∇_x of each scalar ``objectives(x)`` returns, from one forward pass (an attack with several objectives,
        as O-PGD); fp32 outside autocast like ``gradient``, one backward pass per objective."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), fp32(x.device.type):
            values = objectives(x)
            return tuple(torch.autograd.grad(v, x, retain_graph=i < len(values) - 1)[0] for i, v in enumerate(values))

    def image_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attacked loss of each image on its own (J^ce of eq. 1 over that image's labelled pixels by default):
        a tensor of one value per image, for attacks and ensembles that track each image (APGD, restarts, the
        worst case). ``logits`` may stack copies of ``y``'s batch. Batched where the loss says how
        (``per_image``, as the built-in cross-entropies); image by image otherwise."""
        labels = repeat_labels(y, logits.shape[0])
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
        labels = repeat_labels(y, x.shape[0])
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
        labels = repeat_labels(y, x.shape[0])
        n = self.pass_images or x.shape[0]
        with torch.no_grad(), fp32(x.device.type):
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
