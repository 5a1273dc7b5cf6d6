"""One model on one evaluation set (paper sec. 3.4-3.5): the clean pass and every perturbation at every ε, mIoU from
confusion counts summed over the whole set (eq. 9) and Q (eq. 10), batched, on the device, sharded under torchrun;
the per-image worst case of the gradient attacks and the unbounded attack of the gradient-masking checks."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import SanityConfig
from .errors import MtkitError
from .metrics import (
    confusion_counts,
    confusion_from_counts,
    iou_per_class,
    miou,
    q_ratio,
    targeted_counts,
    targeted_rates,
)
from .perturbations import AttackContext, Perturbation, Unbounded
from .progress import progress_bar
from .results import CleanRow, ResultRow, Spread, TargetedRow
from .runtime import Dist, Precision, all_gather_objects, all_reduce_sum, available_memory, current_dist
from .sampling import evaluation_batches

NO_LABELS = "no labelled pixel in the evaluation set: mIoU (and Q) undefined"
#: the row of the per-image strongest of the gradient attacks at each ε
WORST_CASE = "worst_case"
#: the gradient-masking checks' unbounded attack (``Unbounded``), kept out of the sweep's rows
UNBOUNDED = "unbounded"


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


@dataclass
class Sweep:
    """One model on one dataset: the clean row and a row per (perturbation, level)."""

    clean: CleanRow
    rows: list[ResultRow]
    images: int
    #: the unbounded attack of the gradient-masking checks (``sanity``), when run
    unbounded: ResultRow | None = None
    #: targeted attacks' success (``Perturbation.targeted``)
    targeted: list[TargetedRow] = field(default_factory=list)


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
    if device.type == "cpu":
        budget = min(budget, CPU_PASS_BYTES)
    return int(max(1, min(limit, budget // per_image)))


def robustness_sweep(segmenter: nn.Module, dataset, perturbations: dict[str, Perturbation],
                     epsilons: list[float], num_classes: int, class_weights: torch.Tensor | None = None,
                     batch_size: int | str = 8, seed: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, label: str = "", loss: nn.Module | None = None,
                     model_name: str = "", dataset_name: str = "", precision: Precision | None = None,
                     pass_images: int | str = "auto", workers: int = 0, pin_memory: bool = False,
                     dist: Dist | None = None, sanity: SanityConfig | None = None,
                     multitask: nn.Module | None = None) -> Sweep:
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
    """
    device = torch.device(device)
    d = dist or current_dist()
    precision = precision or Precision(device_type=device.type)
    segmenter.eval()
    copies = max([len(p.levels(list(epsilons))) for p in perturbations.values()] + [1])
    if pass_images == "auto" or batch_size == "auto":
        auto = pass_size(segmenter, tuple(dataset[0]["image"].shape), device)
        pass_images = auto if pass_images == "auto" else pass_images
        batch_size = max(1, int(pass_images) // copies) if batch_size == "auto" else batch_size
    model = precision.apply(segmenter)
    gen = torch.Generator().manual_seed(seed)
    cw = None if class_weights is None else class_weights.to(device)
    loss_fn = None if loss is None else loss.to(device)
    attacks = [p for p, pert in perturbations.items() if pert.needs_gradient and pert.level_kind == "epsilon"
               and not pert.targeted]
    if sanity is not None and sanity.enabled and attacks:
        perturbations = {**perturbations, UNBOUNDED: Unbounded(sanity.iterations)}
    levels = {p: pert.levels(list(epsilons)) for p, pert in perturbations.items()}
    worst = [e for e in epsilons if sum(e in levels[p] for p in attacks) >= 2]
    keys = [(p, e) for p in perturbations for e in levels[p]] + [(WORST_CASE, e) for e in worst]
    slot = {key: k for k, key in enumerate(keys)}
    # clean first, then keys; summed on the device and read back once (``confusion_counts``)
    conf = torch.zeros(1 + len(keys), num_classes * num_classes + 1, dtype=torch.int64, device=device)
    sq: dict[int, list[float]] = {}  # image index -> Σ r² per key (eq. 7), summed over the set in image order
    numel: dict[int, int] = {}
    seconds = dict.fromkeys(perturbations, 0.0)
    backward = dict.fromkeys(perturbations, 0.0)
    targeted = {p: pert for p, pert in perturbations.items() if pert.targeted}
    tcounts = {(p, e): torch.zeros(6, dtype=torch.int64, device=device) for p in targeted for e in levels[p]}
    tclean = {p: torch.zeros(6, dtype=torch.int64, device=device) for p in targeted}  # the clean prediction's
    tkind: dict[str, str] = {}
    batches = evaluation_batches(len(dataset), int(batch_size), d)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory)

    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # clean logits that are NaN or inf, per batch

    def predict(x: torch.Tensor, ctx: AttackContext | None = None, y: torch.Tensor | None = None,
                clean: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """argmax predictions in passes of at most ``pass_images`` images, and with ``ctx`` each image's attacked
        loss against ``y`` (x stacks copies of y's batch); ``clean`` counts non-finite logits (read once)."""
        nonlocal nonfinite
        preds, losses = [], []
        labels = None if y is None else y.repeat(x.shape[0] // y.shape[0], 1, 1).split(int(pass_images))
        with torch.no_grad(), precision.autocast():
            for i, c in enumerate(x.split(int(pass_images))):
                logits = model(precision.input(c))
                if clean:
                    nonfinite = nonfinite + (~torch.isfinite(logits)).any().long()
                preds.append(logits.argmax(1))
                if ctx is not None and labels is not None:
                    losses.append(ctx.image_losses(logits.float(), labels[i]))
        return torch.cat(preds), (torch.cat(losses) if losses else None)

    with progress_bar(progress and d.main, len(batches) * (1 + len(perturbations)), label or "robustness") as advance:
        for batch, indices in zip(loader, batches):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            clean_pred = predict(x, clean=True)[0]
            conf[0] += confusion_counts(clean_pred, y, num_classes)
            advance(description=f"{label} clean")
            per_image = {i: [0.0] * len(keys) for i in indices}
            numel.update(dict.fromkeys(indices, x[0].numel()))
            strongest: dict[float, tuple[torch.Tensor, torch.Tensor, list[float]]] = {}  # ε → loss, pred, Σ r²
            for name, pert in perturbations.items():
                ctx = CountingContext(model, cw, gen, seed, indices, loss_fn, int(pass_images), multitask)
                t0 = time.perf_counter()
                with contextlib.nullcontext() if pert.needs_gradient else torch.no_grad():
                    advs = pert.sweep(ctx, x, y, list(epsilons))
                    tg = pert.targets(ctx, x, y) if name in targeted else None
                if tg is not None:  # what the clean prediction already agreed with (ε-independent)
                    tkind[name] = tg.kind
                    tclean[name] += targeted_counts(clean_pred, tg.labels, "static")
                preds, losses = predict(torch.cat([advs[e] for e in levels[name]]),
                                        ctx if name in attacks and worst else None, y)
                # Σ r² per image (eq. 7) of every level, read back in one transfer
                r2_all = torch.stack([((advs[e] - x).double() ** 2).flatten(1).sum(1) for e in levels[name]]).tolist()
                for j, (e, pred) in enumerate(zip(levels[name], preds.split(x.shape[0]))):
                    k = slot[(name, e)]
                    conf[1 + k] += confusion_counts(pred, y, num_classes)
                    if tg is not None:
                        tcounts[(name, e)] += targeted_counts(pred, tg.labels, tg.kind, tg.hidden, tg.reference)
                    r2 = r2_all[j]
                    for i, v in zip(indices, r2):
                        per_image[i][k] = v
                    if losses is not None and e in worst:
                        strongest[e] = _stronger(strongest.get(e), losses.split(x.shape[0])[j], pred, r2)
                seconds[name] += time.perf_counter() - t0
                backward[name] += ctx.backward_passes
                advance(description=f"{label} {name}")
            for e, (_, pred, r2) in strongest.items():
                k = slot[(WORST_CASE, e)]
                conf[1 + k] += confusion_counts(pred, y, num_classes)
                for i, v in zip(indices, r2):
                    per_image[i][k] = v
            sq.update(per_image)
    if int(all_reduce_sum(nonfinite.cpu(), d)):  # every rank stops alike
        raise MtkitError(f"model '{model_name or 'model'}' gives NaN or infinite logits on clean images of "
                         f"'{dataset_name or 'the evaluation set'}': its mIoU and Q would mean nothing. Check its "
                         "weights and the input it expects (an external model: --input-range, --mean/--std)")
    conf = confusion_from_counts(all_reduce_sum(conf.cpu(), d), num_classes)
    parts = all_gather_objects((sq, numel, seconds, backward, len(batches)), d)
    for p_sq, p_numel, *_ in parts:
        sq.update(p_sq)
        numel.update(p_numel)
    seconds = {n: max(p[2][n] for p in parts) for n in perturbations}  # wall time: the slowest rank
    backward = {n: sum(p[3][n] for p in parts) for n in perturbations}
    n_batches = sum(p[4] for p in parts)
    order = sorted(sq)
    elements = sum(numel[i] for i in order)
    clean = miou(conf[0])
    notes = {}
    for e in worst:  # never above any single attack: the lowest of the ensemble and each attack alone
        k = slot[(WORST_CASE, e)]
        lowest = min((p for p in attacks if e in levels[p]), key=lambda p: miou(conf[1 + slot[(p, e)]]))
        j = slot[(lowest, e)]
        if miou(conf[1 + j]) < miou(conf[1 + k]):
            conf[1 + k] = conf[1 + j]
            for i in order:
                sq[i][k] = sq[i][j]
            notes[e] = f"{lowest} alone is lower than the per-image strongest of the attacks"
    rows = []
    for k, (name, e) in enumerate(keys):
        c = conf[1 + k]
        m = miou(c)
        kind = "epsilon" if name == WORST_CASE else perturbations[name].level_kind
        total = sum(sq[i][k] for i in order)
        per = [(sq[i][k] / numel[i]) ** 0.5 for i in order]
        rows.append(ResultRow(
            model=model_name, seed=seed, dataset=dataset_name, perturbation=name, level_kind=kind, level=e,
            epsilon=e if kind == "epsilon" else None, epsilon_measured=(total / max(elements, 1)) ** 0.5,
            epsilon_measured_per_image=_spread(per), miou=m, miou_clean=clean,
            q=q_ratio(m, clean), per_class_iou=_nan_to_none(iou_per_class(c).tolist()),
            attack=name == WORST_CASE or name in attacks,
            seconds_sweep=seconds.get(name, 0.0), backward_passes_per_batch=backward.get(name, 0.0) / max(n_batches, 1),
            note=NO_LABELS if m != m or clean != clean else notes.get(e) if name == WORST_CASE else None))
    clean_row = CleanRow(model=model_name, seed=seed, dataset=dataset_name, miou=clean,
                         per_class_iou=_nan_to_none(iou_per_class(conf[0]).tolist()),
                         note=NO_LABELS if clean != clean else None, images=len(dataset))
    unbounded = next((r for r in rows if r.perturbation == UNBOUNDED), None)
    by_key = {(r.perturbation, r.level): r for r in rows}
    target_rows = []
    clean_success = {p: targeted_rates(all_reduce_sum(c.cpu(), d))[0] for p, c in tclean.items()}
    for (name, e), counts in tcounts.items():
        success, removed, kept = targeted_rates(all_reduce_sum(counts.cpu(), d))
        target_rows.append(TargetedRow(
            model=model_name, seed=seed, dataset=dataset_name, perturbation=name, epsilon=e,
            epsilon_measured=by_key[(name, e)].epsilon_measured, kind=tkind.get(name, "static"), success=success,
            success_clean=clean_success[name], removed=removed,
            kept=kept, miou=by_key[(name, e)].miou))
    return Sweep(clean_row, [r for r in rows if r.perturbation != UNBOUNDED], len(dataset), unbounded, target_rows)


def _stronger(best: tuple[torch.Tensor, torch.Tensor, list[float]] | None, losses: torch.Tensor,
              pred: torch.Tensor, r2: list[float]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Per image, the (loss, prediction, Σ r²) of the attack with the higher loss (a tie keeps the earlier one)."""
    if best is None:
        return losses, pred, list(r2)
    loss0, pred0, r0 = best
    take = losses > loss0
    return (torch.where(take, losses, loss0), torch.where(take.view(-1, 1, 1), pred, pred0),
            [b if t else a for a, b, t in zip(r0, r2, take.tolist())])


def _spread(values: list[float]) -> Spread:
    """min, max, mean and standard deviation of the per-image measured ε of one row."""
    t = torch.tensor(values, dtype=torch.float64)
    return Spread(min=float(t.min()), max=float(t.max()), mean=float(t.mean()),
                  sd=float(t.std()) if len(values) > 1 else 0.0)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]
