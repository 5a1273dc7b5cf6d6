"""The Python API behind the CLI: a notebook calls the same functions with the same recipe objects.

    from mtkit import api
    recipe = api.load_recipe("recipes/quickstart.yaml", ["train.epochs=1"])
    result = api.run(recipe)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench.plan import PlanRow, plan
from .bench.runner import run_bench
from .bench.trend import trend
from .core.errors import MtkitError
from .core.results import ModelInfo, RunResults
from .core.runtime import init_distributed, resolve_device
from .core.schema import Recipe
from .evaluation.depth import evaluate_depth_model
from .evaluation.export import export_segmenter
from .evaluation.external import ExternalSegmenter, InputSpec, OutputSpec, build_external
from .evaluation.robustness import evaluate_checkpoint, evaluate_segmenter, evaluation_sets, load_model
from .pipeline.runner import RunResult, run
from .plugins.manager import list_entries, plugin_failures
from .recipe.build import build_dataset
from .recipe.load import apply_overrides, load_recipe, validate
from .recipe.prepare import Prepared, prepare_recipe
from .report import save_report
from .training.trainer import TrainResult, train

__all__ = ["InputSpec", "OutputSpec", "Prepared", "Recipe", "RunResult", "RunResults", "TrainResult", "bench",
           "build_external", "evaluate", "evaluate_depth", "evaluate_model", "export_onnx", "list_entries",
           "load_recipe", "load_segmenter", "plan", "PlanRow",
           "plugin_failures", "prepare", "report", "run", "save_predictions", "train", "trend", "with_overrides"]


def prepare(recipe: Recipe, workers: int | None = None, skip_bad: bool = False, force: bool = False,
            progress: bool = True, log=print, verify: bool = False) -> list[Prepared]:
    """Decode the recipe's datasets into the prepared cache (reused while sources and sizes are unchanged and the
    folder is intact; ``verify`` checks every item's checksum)."""
    return prepare_recipe(recipe, workers, skip_bad, force, progress, log, verify)


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with ``-o``-style overrides applied and validated again (the one place values are checked)."""
    return validate(apply_overrides(recipe.to_dict(), overrides), recipe.source or "<recipe>")


def _robustness_overrides(recipe: Recipe, perturbations: list[str] | None, epsilons: list[float] | None,
                          datasets: list[str] | None) -> Recipe:
    overrides = []
    if perturbations:
        overrides.append(f"robustness.perturbations={json.dumps(list(perturbations))}")
    if epsilons is not None:
        overrides.append(f"robustness.epsilons={json.dumps(list(epsilons))}")
    if datasets:
        overrides.append(f"robustness.datasets={json.dumps(list(datasets))}")
    return with_overrides(recipe, overrides) if overrides else recipe


def evaluate(recipe: Recipe, checkpoints: list[str | Path], perturbations: list[str] | None = None,
             epsilons: list[float] | None = None, datasets: list[str] | None = None,
             progress: bool = True) -> RunResults:
    """Robustness sweeps of trained checkpoints on the recipe's evaluation sets (clean pass once per pair)."""
    recipe = _robustness_overrides(recipe, perturbations, epsilons, datasets)
    keys = evaluation_sets(recipe)
    device = resolve_device(recipe.device)
    init_distributed(device)  # under torchrun each rank evaluates its shard of every set
    out = RunResults(recipe_name=recipe.name, recipe_source=recipe.source, seeds=[recipe.seed],
                     epsilon_axis=recipe.robustness.epsilon_axis)
    for ck in checkpoints:
        loaded = load_model(ck, device)
        out.extend(evaluate_checkpoint(loaded, recipe, keys, recipe.seed, device, progress, str(ck)))
    return out


def evaluate_model(model: nn.Module, recipe: Recipe, name: str = "model", datasets: list[str] | None = None,
                   perturbations: list[str] | None = None, epsilons: list[float] | None = None,
                   inputs: InputSpec | dict | None = None, outputs: OutputSpec | dict | None = None,
                   class_weights: torch.Tensor | None = None, on_no_gradient: str = "error",
                   factory: str | None = None, progress: bool = True, log=print) -> RunResults:
    """The paper's robustness protocol for any segmentation network: ``model`` maps images to per-pixel logits;
    ``inputs`` declares what it expects (gray values, or [0, 1] with mean and std), ``outputs`` how to read what
    it returns (dict key, class map; lower-resolution logits are upsampled to the label size). Attacks act on
    gray values, so ε is the paper's. Returns the same typed results as a recipe run (``report`` writes the
    tables and plots); merge several with ``RunResults.extend`` for a side-by-side report.

        model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(num_classes=19)
        res = api.evaluate_model(model, recipe, "deeplab", inputs={"range": "unit", "mean": IMAGENET_MEAN,
                                                                   "std": IMAGENET_STD})
    """
    recipe = _robustness_overrides(recipe, perturbations, epsilons, datasets)
    device = resolve_device(recipe.device)
    init_distributed(device)
    inputs = inputs if isinstance(inputs, InputSpec | None) else InputSpec.model_validate(inputs)
    outputs = outputs if isinstance(outputs, OutputSpec | None) else OutputSpec.model_validate(outputs)
    segmenter = ExternalSegmenter(model, recipe.model.num_classes, inputs, outputs).to(device).eval()
    info = ModelInfo(tasks=["segmentation"], lam=1.0, factory=factory or type(model).__qualname__)
    out = RunResults(recipe_name=recipe.name, recipe_source=recipe.source, seeds=[recipe.seed],
                     epsilon_axis=recipe.robustness.epsilon_axis)
    out.extend(evaluate_segmenter(segmenter, name, info, recipe, evaluation_sets(recipe), recipe.seed, device,
                                  progress, class_weights, on_no_gradient, log))
    return out


def save_predictions(recipe: Recipe, checkpoints: list[str | Path], folder: str | Path,
                     conditions: list[str] | None = None, formats: list[str] | None = None,
                     label_resolution: str | None = None, progress: bool = True, model: nn.Module | None = None,
                     name: str = "model", **external: Any) -> RunResults:
    """``evaluate`` (or ``evaluate_model`` for an external ``model``) that also writes each image's prediction at
    its original resolution under ``folder``/<model>/<dataset>/<condition>/<format>/ for ``conditions`` ("clean",
    "fgsm@4", ...) in ``formats`` (labelIds, trainIds, color): the files cityscapesScripts and the benchmark's
    server read. ``label_resolution`` "original" also scores at that resolution. The rows are returned as usual."""
    overrides = [f"robustness.predictions.folder={json.dumps(str(folder))}"]
    overrides += [f"robustness.predictions.{k}={json.dumps(list(v))}" for k, v in (("conditions", conditions),
                                                                                 ("formats", formats)) if v]
    if label_resolution:
        overrides.append(f"robustness.label_resolution={label_resolution}")
    recipe = with_overrides(recipe, overrides)
    if model is not None:
        return evaluate_model(model, recipe, name, progress=progress, **external)
    return evaluate(recipe, checkpoints, progress=progress)


def load_segmenter(checkpoint: str | Path) -> nn.Module:
    """mtkit's own segmenter from a checkpoint (gray values in): a model factory for ``--model-factory
    mtkit.api:load_segmenter --model-kwargs '{"checkpoint": "best.pt"}'``."""
    return load_model(checkpoint).segmenter


def report(results: RunResults, folder: str | Path) -> dict[str, Path]:
    """results.json, results.csv, report.md and the plots of ``results`` in ``folder``."""
    return save_report(results, Path(folder))


def evaluate_depth(recipe: Recipe, checkpoints: list[str | Path], datasets: list[str] | None = None,
                   skip_missing: bool = False, progress: bool = True) -> RunResults:
    """Depth metrics of multi-task checkpoints on the recipe's ``data.depth_eval`` sets (KITTI Eigen split with
    Velodyne ground truth, or the synthetic data's exact depth); ``skip_missing`` leaves out split lines whose
    scan, calibration or image is missing and counts them."""
    keys = datasets or list(recipe.data.depth_eval)
    if not keys:
        raise MtkitError("the recipe has no depth evaluation sets: add data.depth_eval, e.g. "
                         "{Eigen: {name: kitti_eigen, split: test, height: 192, width: 640}}")
    for k in keys:
        if k not in recipe.data.depth_eval:
            raise MtkitError(f"no depth evaluation set '{k}' in the recipe; it has {list(recipe.data.depth_eval)}")
    device = resolve_device(recipe.device)
    out = RunResults(recipe_name=recipe.name, recipe_source=recipe.source, seeds=[recipe.seed],
                     epsilon_axis=recipe.robustness.epsilon_axis)
    loaded_models = [(str(ck), load_model(ck, device)) for ck in checkpoints]
    for ck, loaded in loaded_models:
        if "depth" not in loaded.spec.tasks:
            raise MtkitError(f"{ck}: model '{loaded.spec.name}' has no depth task; depth evaluation needs a "
                             "multi-task model")
        out.models[loaded.spec.name] = ModelInfo(tasks=loaded.spec.tasks, lam=loaded.spec.lam, checkpoint=ck)
    for k in keys:
        cfg = recipe.data.depth_eval[k]
        if skip_missing:
            cfg = cfg.model_copy(update={"options": {**cfg.options, "skip_missing": True}})
        ds = build_dataset(cfg, where=f"data.depth_eval.{k}")
        for _, loaded in loaded_models:
            out.depth.append(evaluate_depth_model(loaded.model, ds, recipe.depth_evaluation, device=device,
                                                  progress=progress, label=f"{loaded.spec.name}/{k} depth",
                                                  model_name=loaded.spec.name, seed=recipe.seed, dataset_name=k,
                                                  tf32=recipe.robustness.tf32))
    return out


def export_onnx(checkpoint: str | Path, output: str | Path, height: int, width: int, static: bool = False) -> Path:
    """The checkpoint's segmenter as ONNX, traced at height x width: any batch size, and any image size unless
    ``static``; verified with onnxruntime (``mtkit.evaluation.export``)."""
    return export_segmenter(checkpoint, output, height, width, static=static)


def bench(save: str | None = None, compare_with: str | None = None, fail_over: float = 10.0,
          select: str | None = None, path: str | Path | None = None, history: str | Path | None = None):
    """Run the benchmark suite; optionally save it as a baseline (and in the history) and compare with a stored
    one."""
    return run_bench(save, compare_with, fail_over, select, path, history=history)
