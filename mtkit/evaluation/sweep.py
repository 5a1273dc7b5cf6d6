"""One model on one evaluation set (paper sec. 3.4-3.5): the clean pass and every perturbation at every ε, mIoU from
confusion counts summed over the whole set (eq. 9) and Q (eq. 10), batched, on the device, sharded under torchrun;
the per-image worst case of the gradient attacks and the unbounded attack of the gradient-masking checks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.precision import Precision
from ..core.progress import progress_bar
from ..core.results import UNBOUNDED
from ..core.runtime import Dist, available_memory, current_dist, memory_share
from ..core.schema import SanityConfig
from ..data.sampling import evaluation_batches
from ..perturbations import AttackContext, Perturbation, Unbounded, repeat_labels
from .predictions import PredictionWriter, original_labels, upsampled_argmax
from .tally import Outcome, Plan, Sweep, Tally, gradient_attacks

__all__ = ["CPU_PASS_BYTES", "CountingContext", "Sweep", "SweepSettings", "activation_bytes", "pass_size",
           "robustness_sweep"]


class CountingContext(AttackContext):
    """AttackContext that counts backward passes, in units of the loaded batch: a pass over k stacked ε copies of
    the batch counts k (what the attack would cost one ε at a time)."""

    backward_passes = 0.0

    def gradient(self, x, loss_fn):
        self.backward_passes += x.shape[0] / max(len(self.indices or ()), 1)
        return super().gradient(x, loss_fn)

    def gradients(self, x, objectives):
        grads = super().gradients(x, objectives)
        self.backward_passes += len(grads) * x.shape[0] / max(len(self.indices or ()), 1)
        return grads


def activation_bytes(segmenter: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes one image of ``shape`` (C, H, W) costs in a forward and input-gradient pass: the tensors autograd
    saves for the backward pass (counted with ``saved_tensors_hooks``), plus the logits three times over (loss
    and gradient)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.zeros(1, *shape, device=device, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = segmenter(x)
    return total + 3 * out.numel() * out.element_size()


#: on a CPU, the activations of one pass at most (bytes): larger passes run slower there, each fresh multi-GB
#: allocation paying its page faults (measured: the quickstart's PGD sweep on 2 cores in 26.5 s at 112 images
#: per pass of 79 MB each, 19.8-22 s at 8-32); a GPU takes what its memory allows
CPU_PASS_BYTES = 2 * 1024**3


def pass_size(segmenter: nn.Module, shape: tuple[int, ...], device: torch.device, fraction: float = 0.5,
              limit: int = 512) -> int:
    """The most images one forward/backward pass may hold: ``fraction`` of the device's free memory over
    ``activation_bytes`` per image (between 1 and ``limit``), and on a CPU no more than ``CPU_PASS_BYTES``."""
    per_image = max(activation_bytes(segmenter, shape, device), 1)
    budget = fraction * available_memory(device)
    if device.type == "cuda":  # a --jobs process has its share of the GPU (``MTKIT_MEMORY_SHARE``)
        budget *= memory_share()
    if device.type == "cpu":
        budget = min(budget, CPU_PASS_BYTES)
    return int(max(1, min(limit, budget // per_image)))


@dataclass
class SweepSettings:
    """How one sweep runs, resolved once from its arguments: the device, precision and process group, the batch and
    pass sizes, the attacked loss and class weights, the random stream and the plan of what is measured."""

    plan: Plan
    device: torch.device
    dist: Dist
    precision: Precision
    batch_size: int
    pass_images: int
    class_weights: torch.Tensor | None
    loss_fn: nn.Module | None
    generator: torch.Generator
    seed: int
    multitask: nn.Module | None
    #: the (image, label) files of the set when it is scored at their original resolution
    #: (``robustness.label_resolution: original``), else None
    files: list | None = None
    #: writes the predictions of chosen conditions (``robustness.predictions``), else None
    writer: PredictionWriter | None = None

    @classmethod
    def resolve(cls, segmenter: nn.Module, dataset, perturbations: dict[str, Perturbation], epsilons: list[float],
                class_weights: torch.Tensor | None, batch_size: int | str, seed: int, device: torch.device | str,
                loss: nn.Module | None, precision: Precision | None, pass_images: int | str, dist: Dist | None,
                sanity: SanityConfig | None, multitask: nn.Module | None) -> SweepSettings:
        device = torch.device(device)
        copies = max([len(p.levels(list(epsilons))) for p in perturbations.values()] + [1])
        if pass_images == "auto" or batch_size == "auto":
            auto = pass_size(segmenter, tuple(dataset[0]["image"].shape), device)
            pass_images = auto if pass_images == "auto" else pass_images
            batch_size = max(1, int(pass_images) // copies) if batch_size == "auto" else batch_size
        if sanity is not None and sanity.enabled and gradient_attacks(perturbations):
            perturbations = {**perturbations, UNBOUNDED: Unbounded(sanity.iterations)}
        return cls(Plan.of(perturbations, epsilons), device, dist or current_dist(),
                   precision or Precision(device_type=device.type), int(batch_size), int(pass_images),
                   None if class_weights is None else class_weights.to(device),
                   None if loss is None else loss.to(device), torch.Generator().manual_seed(seed), seed, multitask)


def robustness_sweep(segmenter: nn.Module, dataset, perturbations: dict[str, Perturbation],
                     epsilons: list[float], num_classes: int, class_weights: torch.Tensor | None = None,
                     batch_size: int | str = 8, seed: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, label: str = "", loss: nn.Module | None = None,
                     model_name: str = "", dataset_name: str = "", precision: Precision | None = None,
                     pass_images: int | str = "auto", workers: int = 0, pin_memory: bool = False,
                     dist: Dist | None = None, sanity: SanityConfig | None = None,
                     multitask: nn.Module | None = None, original_files: list | None = None,
                     writer: PredictionWriter | None = None) -> Sweep:
    """Evaluate one model on one dataset: the clean pass and every (perturbation, ε) (ε validated at recipe load).

    Each row holds the requested ε (or, for a perturbation with another ``level_kind`` such as a corruption's
    severity, that level), the measured RMS ε after clipping (eq. 7, over the whole set) and its spread over
    images, mIoU, Q, seconds and backward passes of its perturbation. Random perturbations draw from one generator
    per image, seeded by ``seed`` and the image's index, so an image's perturbation does not depend on
    ``batch_size``. Gradient attacks attack ``loss`` (the recipe's ``loss.segmentation``; default J^ce of eq. 1).

    Batched: the images of every level of a perturbation are predicted together, in passes of at most
    ``pass_images`` images ("auto": what fits the device's memory, ``pass_size``), and attacks may stack their ε
    copies likewise (``pgd_sweep``). ``multitask`` (the multi-task network of the segmenter, if it has a depth
    head) is what attacks on the attack detector see beside the segmenter (``AttackContext.multitask``).
    ``precision`` runs the predictions under autocast, channels_last and
    torch.compile; attack gradients stay fp32. Under torchrun (``dist``, default the current process group) each
    rank takes every world-th batch; counts and ε sums are combined over the ranks, in image order, so the rows
    equal a single process's.

    Worst case: with two or more gradient attacks, a ``worst_case`` row per ε keeps, per image, the adversarial
    example with the highest attacked loss among them (AutoAttack's ensemble; the losses come from the
    prediction pass, so it costs nothing more); its mIoU is then taken as the lowest of that ensemble and of each
    attack alone, so it is never above any single attack. With ``sanity`` enabled, the unbounded attack of the
    gradient-masking checks runs too (``Sweep.unbounded``).

    ``original_files`` (the set's (image, label) files): every prediction is made at its image's original size
    (logits upsampled bilinearly) and scored against the full-resolution labels, the benchmark's protocol.
    ``writer`` writes the predictions of its conditions at the original size as the loop makes them.
    """
    segmenter.eval()
    s = SweepSettings.resolve(segmenter, dataset, perturbations, epsilons, class_weights, batch_size, seed, device,
                              loss, precision, pass_images, dist, sanity, multitask)
    s.files, s.writer = original_files, writer
    model = s.precision.apply(segmenter)
    tally = Tally(s.plan, num_classes, s.device)
    batches = evaluation_batches(len(dataset), s.batch_size, s.dist)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory)
    steps = len(batches) * (1 + len(s.plan.perturbations))
    with progress_bar(progress and s.dist.main, steps, label or "robustness") as advance:
        for batch, indices in zip(loader, batches):
            x = batch["image"].to(s.device, non_blocking=True)
            y = batch["label"].to(s.device, non_blocking=True)
            sizes, scored = None, y  # the attacks take the labels at the recipe's size; the tally the scored ones
            if s.files is not None:
                scored, sizes = original_labels(s.files, indices, s.device)
            elif writer is not None:
                sizes = writer.sizes_of(indices)
            clean, _, full = _predict(model, s, x, tally=tally, sizes=sizes if _upsample(s, "clean", [0.0]) else None)
            if writer is not None and writer.wants("clean", 0.0):
                writer.write(indices, "clean", 0.0, full)
            if s.files is not None:
                clean = full
            advance(description=f"{label} clean")
            tally.add_batch(indices, x[0].numel(), scored, clean, _outcomes(model, s, x, y, indices, advance, label,
                                                                            sizes))
    tally.reduce(s.dist, model_name, dataset_name)
    return tally.rows(model_name, seed, dataset_name, len(dataset))


def _upsample(s: SweepSettings, name: str, levels: list[float]) -> bool:
    """Whether predictions of ``name`` at ``levels`` are needed at the original resolution: always when the set is
    scored there, else where the writer wants one of them."""
    return s.files is not None or (s.writer is not None and any(s.writer.wants(name, e) for e in levels))


def _outcomes(model: nn.Module, s: SweepSettings, x: torch.Tensor, y: torch.Tensor, indices: list[int], advance,
              label: str, sizes: list[tuple[int, int]] | None = None) -> Iterator[Outcome]:
    """Each perturbation of the plan on one batch, one at a time: its adversarial or noisy images at every level,
    their predictions, each image's Σ r² per level (eq. 7, read back in one transfer) and, for the attacks of a
    worst case, each image's attacked loss."""
    plan = s.plan
    for name, pert in plan.perturbations.items():
        ctx = CountingContext(model, s.class_weights, s.generator, s.seed, indices, s.loss_fn, s.pass_images,
                              s.multitask)
        t0 = time.perf_counter()
        with contextlib.nullcontext() if pert.needs_gradient else torch.no_grad():
            advs = pert.sweep(ctx, x, y, list(plan.epsilons))
            tg = pert.targets_of(ctx, x, y) if pert.targeted else None  # the sweep's own, reused
        levels = plan.levels[name]
        up = sizes is not None and _upsample(s, name, levels)
        preds, losses, full = _predict(model, s, torch.cat([advs[e] for e in levels]),
                                       ctx if name in plan.attacks and plan.worst else None, y,
                                       sizes=sizes * len(levels) if up and sizes is not None else None)
        if up and full is not None:
            b = x.shape[0]
            for j, e in enumerate(levels):
                if s.writer is not None and s.writer.wants(name, e):
                    s.writer.write(indices, name, e, full[j * b:(j + 1) * b])
            if s.files is not None:
                preds = full
        r2 = torch.stack([((advs[e] - x).double() ** 2).flatten(1).sum(1) for e in plan.levels[name]]).tolist()
        yield Outcome(name, preds, r2, losses, tg, time.perf_counter() - t0, ctx.backward_passes)
        advance(description=f"{label} {name}")


def _predict(model: nn.Module, s: SweepSettings, x: torch.Tensor, ctx: AttackContext | None = None,
             y: torch.Tensor | None = None, tally: Tally | None = None, sizes: list[tuple[int, int]] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """argmax predictions in passes of at most ``pass_images`` images, and with ``ctx`` each image's attacked
    loss against ``y`` (x stacks copies of y's batch, at the recipe's size: the attack's loss is the one it
    attacked); with ``tally`` (the clean pass) non-finite logits are counted there (read once). With ``sizes``
    (one (height, width) per row of x) also the predictions at those original sizes (``upsampled_argmax``)."""
    preds, losses, full = [], [], []
    rows = None if sizes is None else [sizes[i:i + s.pass_images] for i in range(0, len(sizes), s.pass_images)]
    pad = None if sizes is None else (max(h for h, _ in sizes), max(w for _, w in sizes))
    labels = None if y is None else repeat_labels(y, x.shape[0]).split(s.pass_images)
    with torch.no_grad(), s.precision.autocast():
        for i, c in enumerate(x.split(s.pass_images)):
            logits = model(s.precision.input(c))
            if tally is not None:
                tally.nonfinite = tally.nonfinite + (~torch.isfinite(logits)).any().long()
            preds.append(logits.argmax(1))
            if rows is not None:
                full.append(upsampled_argmax(logits, rows[i], pad))
            if ctx is not None and labels is not None:
                losses.append(ctx.image_losses(logits.float(), labels[i]))
    return torch.cat(preds), (torch.cat(losses) if losses else None), (torch.cat(full) if full else None)
