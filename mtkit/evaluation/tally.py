"""The accumulators of one robustness sweep: confusion counts summed on the device (eq. 9), the per-image Σ r² of
every (perturbation, level) (eq. 7), seconds and backward passes, targeted counts; reduced over the ranks, then
turned into typed rows (mIoU, Q of eq. 10, the measured ε and its spread) with the worst-case fix-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..core.errors import MtkitError
from ..core.results import NO_LABELS, UNBOUNDED, WORST_CASE, CleanRow, ResultRow, Spread, TargetedRow
from ..core.runtime import Dist, all_gather_objects, all_reduce_sum
from ..ops.metrics import (
    confusion_counts,
    confusion_from_counts,
    iou_per_class,
    miou,
    q_ratio,
    targeted_counts,
    targeted_rates,
)
from ..perturbations import Perturbation, Targets


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


def gradient_attacks(perturbations: dict[str, Perturbation]) -> list[str]:
    """The untargeted gradient attacks on the ε axis: the worst case's ensemble, and what the unbounded attack of
    the gradient-masking checks accompanies."""
    return [p for p, pert in perturbations.items() if pert.needs_gradient and pert.level_kind == "epsilon"
            and not pert.targeted]


@dataclass
class Plan:
    """What a sweep measures, fixed before the first batch: each perturbation's levels, the gradient attacks, the
    ε at which two or more of them meet (their per-image worst case) and the slot of every (name, level)."""

    perturbations: dict[str, Perturbation]
    epsilons: list[float]
    levels: dict[str, list[float]]
    attacks: list[str]
    worst: list[float]
    keys: list[tuple[str, float]]
    slot: dict[tuple[str, float], int]

    @classmethod
    def of(cls, perturbations: dict[str, Perturbation], epsilons: list[float]) -> Plan:
        attacks = gradient_attacks(perturbations)
        levels = {p: pert.levels(list(epsilons)) for p, pert in perturbations.items()}
        worst = [e for e in epsilons if sum(e in levels[p] for p in attacks) >= 2]
        keys = [(p, e) for p in perturbations for e in levels[p]] + [(WORST_CASE, e) for e in worst]
        return cls(perturbations, list(epsilons), levels, attacks, worst, keys, {key: k for k, key in enumerate(keys)})

    @property
    def targeted(self) -> list[str]:
        return [p for p, pert in self.perturbations.items() if pert.targeted]


@dataclass
class Outcome:
    """One perturbation on one batch: the predictions of every level stacked in level order, each image's Σ r²
    per level, the attacked losses per image when the worst case needs them, the targets, seconds and passes."""

    name: str
    preds: torch.Tensor
    r2: list[list[float]]
    losses: torch.Tensor | None
    targets: Targets | None
    seconds: float
    backward: float


class Tally:
    """Everything a sweep sums: ``add_batch`` per loaded batch, ``reduce`` once over the ranks, ``rows`` at the
    end. Counts stay on the device and are read back once."""

    def __init__(self, plan: Plan, num_classes: int, device: torch.device) -> None:
        self.plan, self.n, self.device = plan, num_classes, device
        # clean first, then the plan's keys
        self.conf = torch.zeros(1 + len(plan.keys), num_classes * num_classes + 1, dtype=torch.int64, device=device)
        self.sq: dict[int, list[float]] = {}  # image index -> Σ r² per key (eq. 7)
        self.numel: dict[int, int] = {}
        self.seconds = dict.fromkeys(plan.perturbations, 0.0)
        self.backward = dict.fromkeys(plan.perturbations, 0.0)
        self.batches = 0
        # targeted counts per image (``targeted_counts``), on the device until ``reduce``: batches of (indices, (B, 6))
        self.tcounts: dict[tuple[str, float], list] = {(p, e): [] for p in plan.targeted for e in plan.levels[p]}
        self.tclean: dict[str, list] = {p: [] for p in plan.targeted}  # what the clean prediction agreed with
        self.timages: dict[tuple[str, float] | str, dict[int, list[int]]] = {}  # after ``reduce``
        self.tkind: dict[str, str] = {}
        # per key: pixels whose predicted label differs from the clean prediction (input dependence)
        self.changed = torch.zeros(len(plan.keys), dtype=torch.int64, device=device)
        self.pixels = 0
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # batches with NaN/inf clean logits
        self.notes: dict[float, str] = {}

    def add_batch(self, indices: list[int], numel: int, y: torch.Tensor, clean: torch.Tensor,
                  outcomes: Iterable[Outcome]) -> None:
        """One batch: its clean predictions, then each perturbation's ``Outcome`` as ``outcomes`` yields it (a
        generator: one perturbation's predictions in memory at a time), then the per-image worst case."""
        plan, b = self.plan, y.shape[0]
        self.conf[0] += confusion_counts(clean, y, self.n)
        self.pixels += clean.numel()
        per_image = {i: [0.0] * len(plan.keys) for i in indices}
        self.numel.update(dict.fromkeys(indices, numel))
        strongest: dict[float, tuple[torch.Tensor, torch.Tensor, list[float]]] = {}  # ε → loss, pred, Σ r²
        for out in outcomes:
            tg = out.targets
            if tg is not None:  # the clean prediction's agreement with the target (ε-independent)
                self.tkind[out.name] = tg.kind
                self.tclean[out.name].append((indices, targeted_counts(clean, tg.labels, "static")))
            for j, (e, pred) in enumerate(zip(plan.levels[out.name], out.preds.split(b))):
                k = plan.slot[(out.name, e)]
                self.conf[1 + k] += confusion_counts(pred, y, self.n)
                self.changed[k] += (pred != clean).sum()
                if tg is not None:
                    self.tcounts[(out.name, e)].append(
                        (indices, targeted_counts(pred, tg.labels, tg.kind, tg.hidden, tg.reference)))
                for i, v in zip(indices, out.r2[j]):
                    per_image[i][k] = v
                if out.losses is not None and e in plan.worst:
                    strongest[e] = _stronger(strongest.get(e), out.losses.split(b)[j], pred, out.r2[j])
            self.seconds[out.name] += out.seconds
            self.backward[out.name] += out.backward
        for e, (_, pred, r2) in strongest.items():
            k = plan.slot[(WORST_CASE, e)]
            self.conf[1 + k] += confusion_counts(pred, y, self.n)
            self.changed[k] += (pred != clean).sum()
            for i, v in zip(indices, r2):
                per_image[i][k] = v
        self.sq.update(per_image)
        self.batches += 1

    def reduce(self, d: Dist, model_name: str = "", dataset_name: str = "") -> None:
        """Combine the ranks' sums (in image order, so the rows equal one process's) and make the worst case never
        above any single attack; non-finite clean logits on any rank stop every rank alike."""
        if int(all_reduce_sum(self.nonfinite.cpu(), d)):
            raise MtkitError(f"model '{model_name or 'model'}' gives NaN or infinite logits on clean images of "
                             f"'{dataset_name or 'the evaluation set'}': its mIoU and Q would mean nothing. Check its "
                             "weights and the input it expects (an external model: --input-range, --mean/--std)")
        self.conf = confusion_from_counts(all_reduce_sum(self.conf.cpu(), d), self.n)
        self.changed = all_reduce_sum(self.changed.cpu(), d)
        parts = all_gather_objects((self.sq, self.numel, self.seconds, self.backward, self.batches, self.pixels), d)
        for p_sq, p_numel, *_ in parts:
            self.sq.update(p_sq)
            self.numel.update(p_numel)
        names = self.plan.perturbations
        self.seconds = {n: max(p[2][n] for p in parts) for n in names}  # wall time: the slowest rank
        self.backward = {n: sum(p[3][n] for p in parts) for n in names}
        self.batches = sum(p[4] for p in parts)
        self.pixels = sum(p[5] for p in parts)
        mine = {key: _per_image(batches) for key, batches in [*self.tcounts.items(), *self.tclean.items()]}
        self.timages = {key: {} for key in mine}
        for part in all_gather_objects(mine, d):
            for key, images in part.items():
                self.timages[key].update(images)
        self._fix_worst_case()

    def _fix_worst_case(self) -> None:
        """The worst case's mIoU is the lowest of the ensemble and of each attack alone."""
        plan, conf, order = self.plan, self.conf, sorted(self.sq)
        for e in plan.worst:
            k = plan.slot[(WORST_CASE, e)]
            lowest = min((p for p in plan.attacks if e in plan.levels[p]),
                         key=lambda p: miou(conf[1 + plan.slot[(p, e)]]))
            j = plan.slot[(lowest, e)]
            if miou(conf[1 + j]) < miou(conf[1 + k]):
                conf[1 + k] = conf[1 + j]
                self.changed[k] = self.changed[j]
                for i in order:
                    self.sq[i][k] = self.sq[i][j]
                self.notes[e] = f"{lowest} alone is lower than the per-image strongest of the attacks"

    def rows(self, model_name: str, seed: int, dataset_name: str, images: int) -> Sweep:
        """The typed rows of the reduced tally."""
        plan, conf, order = self.plan, self.conf, sorted(self.sq)
        elements = sum(self.numel[i] for i in order)
        clean = miou(conf[0])
        rows = []
        for k, (name, e) in enumerate(plan.keys):
            m = miou(conf[1 + k])
            kind = "epsilon" if name == WORST_CASE else plan.perturbations[name].level_kind
            total = sum(self.sq[i][k] for i in order)
            per = [(self.sq[i][k] / self.numel[i]) ** 0.5 for i in order]
            rows.append(ResultRow(
                model=model_name, seed=seed, dataset=dataset_name, perturbation=name, level_kind=kind, level=e,
                epsilon=e if kind == "epsilon" else None, epsilon_measured=(total / max(elements, 1)) ** 0.5,
                epsilon_measured_per_image=_spread(per), miou=m, miou_clean=clean,
                q=q_ratio(m, clean), changed=int(self.changed[k]) / max(self.pixels, 1),
                per_class_iou=_nan_to_none(iou_per_class(conf[1 + k]).tolist()),
                attack=name == WORST_CASE or name in plan.attacks, seconds_sweep=self.seconds.get(name, 0.0),
                backward_passes_per_batch=self.backward.get(name, 0.0) / max(self.batches, 1),
                note=NO_LABELS if m != m or clean != clean else self.notes.get(e) if name == WORST_CASE else None))
        clean_row = CleanRow(model=model_name, seed=seed, dataset=dataset_name, miou=clean,
                             per_class_iou=_nan_to_none(iou_per_class(conf[0]).tolist()),
                             note=NO_LABELS if clean != clean else None, images=images)
        by_key = {(r.perturbation, r.level): r for r in rows}
        def counts(key) -> list[list[int]]:
            return [[i, *self.timages[key][i]] for i in sorted(self.timages[key])]

        def rates(per: list[list[int]]) -> tuple[float | None, float | None, float | None]:
            return targeted_rates(torch.tensor([c[1:] for c in per], dtype=torch.int64).reshape(-1, 6))

        clean_counts = {name: counts(name) for name in self.tclean}  # ε-independent: once per perturbation
        target_rows = []
        for name, e in self.tcounts:
            per, clean_per = counts((name, e)), clean_counts[name]
            success, removed, kept = rates(per)
            clean_success = rates(clean_per)[0]
            target_rows.append(TargetedRow(
                model=model_name, seed=seed, dataset=dataset_name, perturbation=name, epsilon=e,
                epsilon_measured=by_key[(name, e)].epsilon_measured, kind=self.tkind.get(name, "static"),
                success=success, success_clean=clean_success, removed=removed, kept=kept,
                miou=by_key[(name, e)].miou, image_counts=per, clean_image_counts=clean_per))
        unbounded = next((r for r in rows if r.perturbation == UNBOUNDED), None)
        return Sweep(clean_row, [r for r in rows if r.perturbation != UNBOUNDED], images, unbounded, target_rows)


def _stronger(best: tuple[torch.Tensor, torch.Tensor, list[float]] | None, losses: torch.Tensor,
              pred: torch.Tensor, r2: list[float]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Per image, the (loss, prediction, Σ r²) of the attack with the higher loss (a tie keeps the earlier one)."""
    if best is None:
        return losses, pred, list(r2)
    loss0, pred0, r0 = best
    take = losses > loss0
    return (torch.where(take, losses, loss0), torch.where(take.view(-1, 1, 1), pred, pred0),
            [b if t else a for a, b, t in zip(r0, r2, take.tolist())])


def _per_image(batches: list[tuple[list[int], torch.Tensor]]) -> dict[int, list[int]]:
    """Image index → its six targeted counts, from the (indices, (B, 6)) batches: one read-back per key."""
    if not batches:
        return {}
    rows = torch.cat([c for _, c in batches]).cpu().tolist()
    return dict(zip((i for idx, _ in batches for i in idx), rows))


def _spread(values: list[float]) -> Spread:
    """min, max, mean and standard deviation of the per-image measured ε of one row."""
    t = torch.tensor(values, dtype=torch.float64)
    return Spread(min=float(t.min()), max=float(t.max()), mean=float(t.mean()),
                  sd=float(t.std()) if len(values) > 1 else 0.0)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]
