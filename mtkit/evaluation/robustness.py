"""Robustness evaluation (paper sec. 3.4-3.5, 5) of a trained mtkit model or any segmenter on the recipe's
evaluation sets: the sweep of each set (``sweep.robustness_sweep``) and its gradient-masking checks
(``masking.masking_checks``).

``evaluate_segmenter`` is the one evaluation path: ``mtkit eval``, the Python API and ``mtkit run`` all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import load_checkpoint
from ..core.errors import CheckpointError, MtkitError
from ..core.precision import math_mode, resolve_pin_memory, resolve_precision
from ..core.results import ModelInfo, RunResults
from ..core.schema import ModelSpec, Recipe
from ..recipe.build import build_dataset, build_model, build_perturbations, build_segmentation_loss
from ..recipe.load import validate
from ..recipe.prepare import default_workers, handed_or_prepared
from .external import has_gradient_path
from .masking import masking_checks
from .predictions import PredictionWriter, parse_condition, source_files
from .sweep import robustness_sweep


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


def evaluation_sets(recipe: Recipe) -> list[str]:
    """The keys of ``data.eval`` that robustness is evaluated on: ``robustness.datasets``, or all of them."""
    keys = recipe.robustness.datasets or list(recipe.data.eval)
    if not keys:
        raise MtkitError("the recipe has no evaluation datasets: add data.eval, e.g. {CS: {name: cityscapes, ...}}")
    return keys


def eval_dataset(recipe: Recipe, key: str, progress: bool = False, data: dict | None = None):
    """The evaluation set ``data.eval.<key>``: from the run's opened datasets, else opened (prepared when needed)."""
    return handed_or_prepared(recipe, f"data.eval.{key}", data, progress)


def evaluate_checkpoint(loaded: LoadedModel, recipe: Recipe, datasets: list[str], seed: int,
                        device: torch.device | str = "cpu", progress: bool = False,
                        checkpoint: str | None = None, data: dict | None = None) -> RunResults:
    """A trained mtkit model on the recipe's evaluation sets ``datasets`` (keys of ``data.eval``), with its class
    weights in the attacked loss (``evaluate_segmenter``); ``data``: the run's opened prepared datasets."""
    trained = loaded.recipe.model.num_classes
    if recipe.model.num_classes != trained:
        raise MtkitError(f"{checkpoint or 'the checkpoint'} was trained for {trained} classes, the recipe's "
                         f"model.num_classes is {recipe.model.num_classes}: evaluate with -o model.num_classes="
                         f"{trained}, or a checkpoint of {recipe.model.num_classes} classes")
    info = ModelInfo(tasks=loaded.spec.tasks, lam=loaded.spec.lam, checkpoint=checkpoint)
    return evaluate_segmenter(loaded.segmenter, loaded.spec.name, info, recipe, datasets, seed, device, progress,
                              loaded.class_weights,
                              multitask=loaded.model if getattr(loaded.model, "depth_head", None) else None,
                              data=data)


def _original(recipe: Recipe, key: str, model: str, count: int, perts: dict) -> dict[str, Any]:
    """The sweep's original-resolution arguments for set ``key``: its source files when it is scored at their
    resolution (``robustness.label_resolution``) and the prediction writer (``robustness.predictions``)."""
    rob = recipe.robustness
    folder = rob.predictions.folder
    if rob.label_resolution != "original" and not folder:
        return {}
    files = source_files(build_dataset(recipe.data.eval[key], where=f"data.eval.{key}"), count, f"data.eval.{key}")
    writer = None
    if folder:
        conditions = {parse_condition(c) for c in rob.predictions.conditions}
        levels = {p: pert.levels(list(rob.epsilons)) for p, pert in perts.items()}
        for name, level in conditions:
            if name != "clean" and level not in levels.get(name, [level]):
                raise MtkitError(f"robustness.predictions.conditions '{name}@{level:g}': {name} is swept at "
                                 f"{levels[name]}, not at {level:g}: add it to robustness.epsilons or pick one of them")
        writer = PredictionWriter(Path(folder) / model / key, files, conditions, tuple(rob.predictions.formats))
    return {"original_files": files if rob.label_resolution == "original" else None, "writer": writer}


def evaluate_segmenter(segmenter: nn.Module, name: str, info: ModelInfo, recipe: Recipe, datasets: list[str],
                       seed: int, device: torch.device | str = "cpu", progress: bool = False,
                       class_weights: torch.Tensor | None = None, on_no_gradient: str = "error",
                       log=print, multitask: nn.Module | None = None, data: dict | None = None) -> RunResults:
    """The one evaluation path (``mtkit eval``, the Python API, ``mtkit run``): a segmenter (gray values in,
    logits out: an mtkit model, or an external one behind ``ExternalSegmenter``) on the recipe's evaluation sets
    with its perturbations, ε and options, and its segmentation loss (with ``class_weights``) for the attacks.

    A model without a gradient path (exported, quantized) cannot be attacked with gradients: that is an error,
    or with ``on_no_gradient="noise_only"`` the gradient attacks are left out with a message. ``data`` holds the
    run's opened prepared datasets (``PreparedData.opened``); without it each set is opened from the cache."""
    rob = recipe.robustness
    perts = build_perturbations(rob.perturbations, rob.options)
    loss = build_segmentation_loss(recipe.loss.segmentation, class_weights)
    out = RunResults(seeds=[seed], models={name: info},
                     epsilon_meanings={p: pert.epsilon_meaning for p, pert in perts.items()})
    device = torch.device(device)
    precision = resolve_precision(rob.amp, rob.channels_last, rob.compile, device, "robustness", rob.tf32)
    workers = default_workers(recipe.data.num_workers)
    pin = resolve_pin_memory(recipe.data.pin_memory, device)
    attacks = [p for p, pert in perts.items() if pert.needs_gradient]
    targeted = [p for p, pert in perts.items() if pert.targeted]
    if rob.label_resolution == "original" and targeted:
        raise MtkitError(f"robustness.label_resolution: original scores untargeted perturbations; the targeted "
                         f"{targeted} count their targets at the recipe's size: evaluate them with "
                         "label_resolution: recipe")
    with math_mode(precision.tf32):  # IEEE fp32 unless robustness.tf32
        for key in datasets:
            ds = eval_dataset(recipe, key, progress, data)
            if attacks:  # checked once, on the first set's first image: a gradient path is the model's property
                if not has_gradient_path(segmenter, ds[0]["image"][None].to(device)):
                    if on_no_gradient != "noise_only":
                        raise MtkitError(f"model '{name}' gives no gradient of its logits with respect to the input "
                                         f"(an exported, quantized or no_grad model?), and the attacks {attacks} need "
                                         "one: evaluate the noise types only (--perturbation gaussian --perturbation "
                                         "salt_pepper, or --no-gradient noise-only)")
                    log(f"model '{name}' has no gradient path: leaving out {', '.join(attacks)}")
                    perts = {p: pert for p, pert in perts.items() if not pert.needs_gradient}
                attacks = []
            sweep = robustness_sweep(segmenter, ds, perts, rob.epsilons, recipe.model.num_classes,
                                     class_weights, rob.batch_size, seed, device, progress,
                                     label=f"{name}/{key}", loss=loss, model_name=name, dataset_name=key,
                                     precision=precision, pass_images=rob.pass_images, workers=workers, pin_memory=pin,
                                     sanity=rob.sanity, multitask=multitask,
                                     **_original(recipe, key, name, len(ds), perts))
            out.clean.append(sweep.clean)
            out.robustness += sweep.rows
            out.targeted += sweep.targeted
            if rob.sanity.enabled and any(r.attack for r in sweep.rows):
                out.sanity += masking_checks(sweep, rob.sanity, {p for p, pert in perts.items() if pert.iterative})
    return out
