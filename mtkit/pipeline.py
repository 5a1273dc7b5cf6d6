"""``mtkit run``: the paper's protocol as stages (train each model, evaluate clean + sweep perturbations on each
evaluation set, report), each cached by a hash of the config that shapes it.

Re-running skips finished stages; a changed key reruns only the stages that depend on it; ``force`` reruns all.
An interrupted training stage resumes from its last checkpoint, an interrupted evaluation reruns only the
(model, dataset) pairs whose result file is missing. Robustness is evaluated on each model's final weights.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ModelSpec, Recipe, config_hash
from .errors import DatasetError, MtkitError
from .report import atomic_write_text, write_report
from .tasks import BUILTIN_TASKS, auxiliary_task

QUICKSTART_HINT = "to try the whole pipeline on the embedded synthetic data instead: mtkit run recipes/quickstart.yaml"


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]
    paths: dict[str, Path]
    stages_run: list[str]
    stages_cached: list[str]


def train_hash(recipe: Recipe, spec: ModelSpec, seed: int) -> str:
    d = recipe.data
    data = {"segmentation": d.segmentation.model_dump(), "segmentation_val": d.segmentation_val.model_dump(),
            "depth": d.depth.model_dump() if d.depth and "depth" in spec.tasks else None,
            "augment": d.augment.model_dump()}
    train = recipe.train.model_dump(exclude={"log_every", "tensorboard", "checkpoint_every"})
    return config_hash(recipe.model.model_dump(), data, recipe.loss.model_dump(), train,
                       spec.model_dump(by_alias=True), seed)


def eval_hash(t_hash: str, recipe: Recipe, key: str) -> str:
    return config_hash(t_hash, recipe.data.eval[key].model_dump(), recipe.robustness.model_dump(exclude={"datasets"}))


def check_datasets(recipe: Recipe) -> None:
    """Open every dataset the recipe names (roots, layouts) before any work; one error listing what is missing."""
    from .data.datasets import build_dataset

    d = recipe.data
    needed = {"data.segmentation": d.segmentation, "data.segmentation_val": d.segmentation_val}
    if d.depth is not None and any("depth" in m.tasks for m in recipe.models):
        needed["data.depth"] = d.depth
    needed.update({f"data.eval.{k}": v for k, v in d.eval.items()})
    problems = []
    for key, cfg in needed.items():
        try:
            build_dataset(cfg)
        except DatasetError as exc:
            problems.append(f"{key} ({cfg.name}): {str(exc).splitlines()[0].split(' Expected')[0]}")
    if problems:
        raise DatasetError("the recipe's datasets are not available:\n  " + "\n  ".join(problems)
                           + f"\n{QUICKSTART_HINT}")


def environment(device: str) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("mtkit", "torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy", "pluggy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "device": device, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": commit}


def run(recipe: Recipe, force: bool = False, seeds: list[int] | None = None, progress: bool = True,
        run_dir: str | Path | None = None, log=print) -> RunResult:
    """Run every stage of ``recipe`` into ``run_dir`` (default ``<output_dir>/<name>``)."""
    from .data.datasets import build_dataset
    from .evaluate import build_perturbations, load_model, robustness_sweep
    from .plugins import get_plugins
    from .runtime import resolve_device
    from .train import train

    seeds = seeds or recipe.run_seeds()
    run_dir = Path(run_dir or Path(recipe.output_dir) / recipe.name)
    check_datasets(recipe)
    perts = build_perturbations(recipe.robustness.perturbations, recipe.robustness.options)
    for spec in recipe.models:  # unknown plugin tasks fail now, not after the first models have trained
        for task in spec.tasks:
            if task not in BUILTIN_TASKS:
                auxiliary_task(task)
    eval_keys = recipe.robustness.datasets or list(recipe.data.eval)
    if not eval_keys:
        raise MtkitError("the recipe has no evaluation datasets (data.eval)")
    device = resolve_device(recipe.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    ran, cached = [], []
    results: dict[str, Any] = {
        "recipe_name": recipe.name, "recipe_source": recipe.source, "seeds": seeds,
        "models": {m.name: {"tasks": m.tasks, "lambda": m.lam} for m in recipe.models},
        "clean": [], "robustness": [], "training": [], "environment": environment(str(device)),
    }
    started = time.perf_counter()
    for seed in seeds:
        for spec in recipe.models:
            th = train_hash(recipe, spec, seed)
            tdir = run_dir / "train" / f"{spec.name}-s{seed}-{th}"
            done = tdir / "done.json"
            stage = f"train {spec.name} seed {seed}"
            if force and tdir.exists():
                shutil.rmtree(tdir)
            if done.is_file():
                cached.append(stage)
                summary = json.loads(done.read_text())
            else:
                log(f"[stage] {stage}" + (" (resuming)" if (tdir / "last.pt").is_file() else ""))
                t0 = time.perf_counter()
                res = train(recipe, spec, tdir, seed=seed, resume=True, progress=progress)
                summary = {"model": spec.name, "seed": seed, "epochs": res.epochs, "steps": res.steps,
                           "val_miou": res.val_miou, "best_val_miou": res.best_val_miou,
                           "seconds": time.perf_counter() - t0, "history": res.history}
                atomic_write_text(done, json.dumps(summary, indent=2))
                ran.append(stage)
            results["training"].append(summary)
            loaded = None
            for key in eval_keys:
                eh = eval_hash(th, recipe, key)
                epath = run_dir / "eval" / f"{spec.name}-s{seed}-{key}-{eh}.json"
                stage = f"evaluate {spec.name} seed {seed} on {key}"
                if epath.is_file() and not force:
                    cached.append(stage)
                    ev = json.loads(epath.read_text())
                else:
                    log(f"[stage] {stage}")
                    loaded = loaded or load_model(tdir / "last.pt", device)
                    ds = build_dataset(recipe.data.eval[key])
                    ev = robustness_sweep(loaded.segmenter, ds, perts, recipe.robustness.epsilons,
                                          recipe.model.num_classes, loaded.class_weights,
                                          recipe.robustness.batch_size, seed, device, progress,
                                          label=f"{spec.name}/{key}")
                    atomic_write_text(epath, json.dumps(ev))
                    ran.append(stage)
                results["clean"].append({"model": spec.name, "seed": seed, "dataset": key, **ev["clean"]})
                results["robustness"] += [{"model": spec.name, "seed": seed, "dataset": key, **r} for r in ev["rows"]]
    results["seconds"] = time.perf_counter() - started
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_text(run_dir / "environment.json", json.dumps(results["environment"], indent=2))
    paths = write_report(results, run_dir)
    get_plugins().hook.mtkit_after_evaluation(run_dir=str(run_dir), results=results["robustness"])
    return RunResult(run_dir, results, paths, ran, cached)
