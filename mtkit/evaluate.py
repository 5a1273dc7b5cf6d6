"""Robustness evaluation (paper sec. 3.4-3.5, 5): clean mIoU once per model and dataset, then every
perturbation at every ε, mIoU from confusion counts summed over the whole set (eq. 9) and Q (eq. 10).

``evaluate_checkpoint`` is the one evaluation path: ``mtkit eval``, the Python API and ``mtkit run`` all call it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .build import build_model, build_perturbations, build_segmentation_loss
from .checkpoint import load_checkpoint
from .config import ModelSpec, Recipe
from .errors import CheckpointError, MtkitError
from .metrics import confusion_matrix, iou_per_class, miou, q_ratio
from .perturbations import AttackContext, Perturbation
from .prepare import prepared_dataset
from .progress import progress_bar
from .recipe import validate
from .results import CleanRow, ModelInfo, ResultRow, RunResults, Spread

NO_LABELS = "no labelled pixel in the evaluation set: mIoU (and Q) undefined"


@dataclass
class LoadedModel:
    segmenter: nn.Module
    class_weights: torch.Tensor | None
    spec: ModelSpec
    recipe: Recipe
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
        raise CheckpointError(f"{path}: weights do not fit the model of its recipe: {str(exc)[:300]}") from None
    model.to(device).eval()
    return LoadedModel(model.segmenter().eval(), data.get("class_weights"), spec, recipe, data, model)


class CountingContext(AttackContext):
    """AttackContext that counts backward passes (one per gradient call per batch)."""

    backward_passes = 0

    def gradient(self, x, loss_fn):
        self.backward_passes += 1
        return super().gradient(x, loss_fn)


@dataclass
class Sweep:
    """One model on one dataset: the clean row and a row per (perturbation, level)."""

    clean: CleanRow
    rows: list[ResultRow]
    images: int


def robustness_sweep(segmenter: nn.Module, dataset, perturbations: dict[str, Perturbation],
                     epsilons: list[float], num_classes: int, class_weights: torch.Tensor | None = None,
                     batch_size: int = 8, seed: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, label: str = "", loss: nn.Module | None = None,
                     model_name: str = "", dataset_name: str = "") -> Sweep:
    """Evaluate one model on one dataset: the clean pass and every (perturbation, ε) (ε validated at recipe load).

    Each row holds the requested ε (or, for a perturbation with another ``level_kind`` such as a corruption's
    severity, that level), the measured RMS ε after clipping (eq. 7, over the whole set) and its spread over
    images, mIoU, Q, seconds and backward passes of its perturbation. Random perturbations draw from one generator
    per image, seeded by ``seed`` and the image's index, so an image's perturbation does not depend on
    ``batch_size``. Gradient attacks attack ``loss`` (the recipe's ``loss.segmentation``; default J^ce of eq. 1).
    """
    device = torch.device(device)
    segmenter.eval()
    gen = torch.Generator().manual_seed(seed)
    cw = None if class_weights is None else class_weights.to(device)
    loss_fn = None if loss is None else loss.to(device)
    conf_clean = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    levels = {p: pert.levels(list(epsilons)) for p, pert in perturbations.items()}
    conf = {(p, e): torch.zeros_like(conf_clean) for p in perturbations for e in levels[p]}
    sq = dict.fromkeys(conf, 0.0)
    per_image: dict[tuple[str, float], list[float]] = {k: [] for k in conf}
    seconds = dict.fromkeys(perturbations, 0.0)
    backward = dict.fromkeys(perturbations, 0)
    elements = 0
    batches = 0
    start = 0  # dataset index of the batch's first image (per-image noise generators)
    loader = DataLoader(dataset, batch_size=batch_size)
    with progress_bar(progress, len(loader) * (1 + len(perturbations)), label or "robustness") as advance:
        for batch in loader:
            x = batch["image"].to(device)
            y = batch["label"].to(device)
            with torch.no_grad():
                conf_clean += confusion_matrix(segmenter(x).argmax(1).cpu(), y.cpu(), num_classes)
            advance(description=f"{label} clean")
            for name, pert in perturbations.items():
                ctx = CountingContext(segmenter, cw, gen, seed, list(range(start, start + x.shape[0])), loss_fn)
                t0 = time.perf_counter()
                with contextlib.nullcontext() if pert.needs_gradient else torch.no_grad():
                    advs = pert.sweep(ctx, x, y, list(epsilons))
                for e in levels[name]:
                    xa = advs[e]
                    with torch.no_grad():
                        pred = segmenter(xa).argmax(1).cpu()
                    conf[(name, e)] += confusion_matrix(pred, y.cpu(), num_classes)
                    sq_img = ((xa - x).double() ** 2).flatten(1)
                    sq[(name, e)] += float(sq_img.sum())
                    per_image[(name, e)] += sq_img.mean(1).sqrt().tolist()
                seconds[name] += time.perf_counter() - t0
                backward[name] += ctx.backward_passes
                advance(description=f"{label} {name}")
            elements += x.numel()
            batches += 1
            start += x.shape[0]
    clean = miou(conf_clean)
    rows = []
    for (name, e), c in conf.items():
        m = miou(c)
        kind = perturbations[name].level_kind
        rows.append(ResultRow(
            model=model_name, seed=seed, dataset=dataset_name, perturbation=name, level_kind=kind, level=e,
            epsilon=e if kind == "epsilon" else None, epsilon_measured=(sq[(name, e)] / max(elements, 1)) ** 0.5,
            epsilon_measured_per_image=_spread(per_image[(name, e)]), miou=m, miou_clean=clean,
            q=q_ratio(m, clean), per_class_iou=_nan_to_none(iou_per_class(c).tolist()),
            seconds_sweep=seconds[name], backward_passes_per_batch=backward[name] / max(batches, 1),
            note=NO_LABELS if m != m or clean != clean else None))
    clean_row = CleanRow(model=model_name, seed=seed, dataset=dataset_name, miou=clean,
                         per_class_iou=_nan_to_none(iou_per_class(conf_clean).tolist()),
                         note=NO_LABELS if clean != clean else None)
    return Sweep(clean_row, rows, len(dataset))


def _spread(values: list[float]) -> Spread:
    """min, max, mean and standard deviation of the per-image measured ε of one row."""
    t = torch.tensor(values, dtype=torch.float64)
    return Spread(min=float(t.min()), max=float(t.max()), mean=float(t.mean()),
                  sd=float(t.std()) if len(values) > 1 else 0.0)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]


def evaluation_sets(recipe: Recipe) -> list[str]:
    """The keys of ``data.eval`` that robustness is evaluated on: ``robustness.datasets``, or all of them."""
    keys = recipe.robustness.datasets or list(recipe.data.eval)
    if not keys:
        raise MtkitError("the recipe has no evaluation datasets: add data.eval, e.g. {CS: {name: cityscapes, ...}}")
    return keys


def evaluate_checkpoint(loaded: LoadedModel, recipe: Recipe, datasets: list[str], seed: int,
                        device: torch.device | str = "cpu", progress: bool = False,
                        checkpoint: str | None = None) -> RunResults:
    """The one evaluation path: a loaded model on the recipe's evaluation sets ``datasets`` (keys of
    ``data.eval``) with the recipe's perturbations, ε and options, and its segmentation loss for the attacks."""
    rob = recipe.robustness
    trained = loaded.recipe.model.num_classes
    if recipe.model.num_classes != trained:
        raise MtkitError(f"{checkpoint or 'the checkpoint'} was trained for {trained} classes, the recipe's "
                         f"model.num_classes is {recipe.model.num_classes}: evaluate with -o model.num_classes="
                         f"{trained}, or a checkpoint of {recipe.model.num_classes} classes")
    perts = build_perturbations(rob.perturbations, rob.options)
    loss = build_segmentation_loss(recipe.loss.segmentation, loaded.class_weights)
    name = loaded.spec.name
    out = RunResults(seeds=[seed], models={name: ModelInfo(tasks=loaded.spec.tasks, lam=loaded.spec.lam,
                                                             checkpoint=checkpoint)})
    for key in datasets:
        ds = prepared_dataset(recipe, f"data.eval.{key}", progress)
        sweep = robustness_sweep(loaded.segmenter, ds, perts, rob.epsilons, recipe.model.num_classes,
                                 loaded.class_weights, rob.batch_size, seed, device, progress,
                                 label=f"{name}/{key}", loss=loss, model_name=name, dataset_name=key)
        out.clean.append(sweep.clean)
        out.robustness += sweep.rows
    return out
