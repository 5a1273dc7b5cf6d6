"""The Python API behind the CLI: a notebook calls the same functions with the same recipe objects.

    from mtkit import api
    recipe = api.load_recipe("recipes/quickstart.yaml", ["train.epochs=1"])
    result = api.run(recipe)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Recipe, load_recipe
from .pipeline import RunResult, run
from .plugins import get_plugins, get_registry
from .train import TrainResult, train

__all__ = ["Recipe", "RunResult", "TrainResult", "bench", "evaluate", "export_onnx", "list_entries", "load_recipe",
           "run", "train"]


def list_entries(kind: str | None = None) -> list[dict[str, str]]:
    """Registered entries (optionally of one kind) with their origin and one-line doc."""
    reg = get_registry()
    if kind is not None:
        reg.names(kind)  # validates the kind
    return [{"kind": e.kind, "name": e.name, "origin": e.origin, "doc": e.doc}
            for e in reg if kind is None or e.kind == kind]


def plugin_failures() -> list[str]:
    return [str(f) for f in get_plugins().failures]


def evaluate(recipe: Recipe, checkpoints: list[str | Path], perturbations: list[str] | None = None,
             epsilons: list[float] | None = None, datasets: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Robustness sweeps of trained checkpoints on the recipe's evaluation sets (clean pass once per pair)."""
    from .data.datasets import build_dataset
    from .errors import MtkitError
    from .evaluate import build_perturbations, load_model, robustness_sweep
    from .runtime import resolve_device

    rob = recipe.robustness
    names = perturbations or rob.perturbations
    eps = rob.epsilons if epsilons is None else epsilons
    if not eps:
        raise MtkitError("the ε list is empty: give at least one strength")
    perts = build_perturbations(names, {k: v for k, v in rob.options.items() if k in names})
    keys = datasets or rob.datasets or list(recipe.data.eval)
    for k in keys:
        if k not in recipe.data.eval:
            raise MtkitError(f"no evaluation dataset '{k}' in the recipe; it has {list(recipe.data.eval)}")
    device = resolve_device(recipe.device)
    out: dict[str, Any] = {"models": {}, "clean": [], "robustness": [], "seeds": [recipe.seed]}
    for ck in checkpoints:
        loaded = load_model(ck, device)
        name = loaded.spec.name
        out["models"][name] = {"tasks": loaded.spec.tasks, "lambda": loaded.spec.lam, "checkpoint": str(ck)}
        for k in keys:
            ev = robustness_sweep(loaded.segmenter, build_dataset(recipe.data.eval[k]), perts, sorted(eps),
                                  recipe.model.num_classes, loaded.class_weights, rob.batch_size, recipe.seed,
                                  device, progress, label=f"{name}/{k}")
            out["clean"].append({"model": name, "seed": recipe.seed, "dataset": k, **ev["clean"]})
            out["robustness"] += [{"model": name, "seed": recipe.seed, "dataset": k, **r} for r in ev["rows"]]
    return out


def export_onnx(checkpoint: str | Path, output: str | Path, height: int, width: int) -> Path:
    from .export import export_segmenter

    return export_segmenter(checkpoint, output, height, width)


def bench(save: str | None = None, compare_with: str | None = None, fail_over: float = 10.0,
          select: str | None = None, path: str | Path | None = None):
    """Run the benchmark suite; optionally save it as a baseline and compare with a stored one."""
    from .bench import run_bench

    return run_bench(save, compare_with, fail_over, select, path)
