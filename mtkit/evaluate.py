"""Robustness evaluation (paper sec. 3.4-3.5, 5): clean mIoU once per model and dataset, then every
perturbation at every ε, mIoU from confusion counts summed over the whole set (eq. 9) and Q (eq. 10)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint
from .config import ModelSpec, validate
from .errors import MtkitError
from .metrics import confusion_matrix, iou_per_class, miou, q_ratio
from .models import build_model
from .perturbations import AttackContext, Perturbation, build_perturbation


@dataclass
class LoadedModel:
    segmenter: nn.Module
    class_weights: torch.Tensor | None
    spec: ModelSpec
    recipe: Any
    checkpoint: dict[str, Any]
    model: nn.Module


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A trained model from a checkpoint (weights_only load) with its recipe, spec and class weights."""
    data = load_checkpoint(path)
    recipe = validate(data["recipe"], f"{path} (embedded recipe)")
    spec = ModelSpec.model_validate(data["spec"])
    model = build_model(recipe.model, spec.tasks, spec.lam, recipe.loss.num_scales, spec.task_scales)
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        raise MtkitError(f"{path}: weights do not fit the model of its recipe: {str(exc)[:300]}") from None
    model.to(device).eval()
    return LoadedModel(model.segmenter().eval(), data.get("class_weights"), spec, recipe, data, model)


class CountingContext(AttackContext):
    """AttackContext that counts backward passes (one per gradient call per batch)."""

    backward_passes = 0

    def gradient(self, x, loss_fn):
        self.backward_passes += 1
        return super().gradient(x, loss_fn)


def robustness_sweep(segmenter: nn.Module, dataset, perturbations: dict[str, Perturbation],
                     epsilons: list[float], num_classes: int, class_weights: torch.Tensor | None = None,
                     batch_size: int = 8, seed: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, label: str = "") -> dict[str, Any]:
    """Evaluate one model on one dataset: the clean pass and every (perturbation, ε).

    Returns {"clean": {miou, per_class_iou}, "rows": [...]} where each row holds the requested ε (or, for a
    perturbation with another ``level_kind`` such as a corruption's severity, that level), the measured RMS ε after
    clipping (eq. 7, over the whole set), mIoU, Q, seconds and backward passes of its perturbation.
    """
    if not epsilons:
        raise MtkitError("the ε list is empty: give at least one strength")
    if any(not e > 0 for e in epsilons):
        raise MtkitError(f"ε must be positive gray values, got {epsilons}")
    device = torch.device(device)
    segmenter.eval()
    gen = torch.Generator().manual_seed(seed)
    cw = None if class_weights is None else class_weights.to(device)
    conf_clean = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    levels = {p: pert.levels(list(epsilons)) for p, pert in perturbations.items()}
    conf = {(p, e): torch.zeros_like(conf_clean) for p in perturbations for e in levels[p]}
    sq = dict.fromkeys(conf, 0.0)
    seconds = dict.fromkeys(perturbations, 0.0)
    backward = dict.fromkeys(perturbations, 0)
    elements = 0
    batches = 0
    loader = DataLoader(dataset, batch_size=batch_size)
    bar = _bar(progress, len(loader) * (1 + len(perturbations)), label)
    with bar:
        for batch in loader:
            x = batch["image"].to(device)
            y = batch["label"].to(device)
            with torch.no_grad():
                conf_clean += confusion_matrix(segmenter(x).argmax(1).cpu(), y.cpu(), num_classes)
            _advance(bar, "clean")
            for name, pert in perturbations.items():
                ctx = CountingContext(segmenter, cw, gen)
                t0 = time.perf_counter()
                advs = pert.sweep(ctx, x, y, list(epsilons))
                for e in levels[name]:
                    xa = advs[e]
                    with torch.no_grad():
                        pred = segmenter(xa).argmax(1).cpu()
                    conf[(name, e)] += confusion_matrix(pred, y.cpu(), num_classes)
                    sq[(name, e)] += float(((xa - x).double() ** 2).sum())
                seconds[name] += time.perf_counter() - t0
                backward[name] += ctx.backward_passes
                _advance(bar, name)
            elements += x.numel()
            batches += 1
    clean = miou(conf_clean)
    rows = []
    for (name, e), c in conf.items():
        m = miou(c)
        kind = perturbations[name].level_kind
        rows.append({
            "perturbation": name, "level_kind": kind, "level": e, "epsilon": e if kind == "epsilon" else None,
            "epsilon_measured": (sq[(name, e)] / max(elements, 1)) ** 0.5,
            "miou": m, "miou_clean": clean, "q": q_ratio(m, clean),
            "per_class_iou": _nan_to_none(iou_per_class(c).tolist()),
            "seconds_sweep": seconds[name], "backward_passes_per_batch": backward[name] / max(batches, 1),
        })
    return {"clean": {"miou": clean, "per_class_iou": _nan_to_none(iou_per_class(conf_clean).tolist())},
            "rows": rows, "images": len(dataset)}


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return None


def _bar(enabled: bool, total: int, label: str):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("ETA"), TimeRemainingColumn())
    prog.task_id = prog.add_task(label or "robustness", total=total)
    prog.label = label
    return prog


def _advance(bar, what: str) -> None:
    if isinstance(bar, _NoBar):
        return
    bar.update(bar.task_id, advance=1, description=f"{bar.label} {what}")


def build_perturbations(names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Perturbation]:
    """The recipe's perturbations with their options. Options of a registered perturbation that the list leaves
    out are kept for later (a recipe that extends another may shorten the list); options under a name that is
    no perturbation at all are a mistake."""
    from .plugins import get_registry

    perts = {n: build_perturbation(n, options.get(n)) for n in names}
    reg = get_registry()
    stray = sorted(k for k in options if k not in names and ("perturbation", k) not in reg)
    if stray:
        reg.get("perturbation", stray[0])  # unknown name: the registry's error with suggestions
    return perts
