"""``mtkit run``: the paper's protocol as stages (prepare the data, train each model, evaluate clean + sweep
perturbations on each evaluation set, report), each cached by a hash of the config that shapes it. Under
``torchrun --nproc_per_node N -m mtkit run RECIPE`` training runs with DDP, each evaluation set is sharded over the
ranks (``robustness_sweep``), and rank 0 writes every file.

Re-running skips finished stages; a changed key reruns only the stages that depend on it; ``force`` reruns all.
An interrupted training stage resumes from its last checkpoint, an interrupted evaluation reruns only the
(model, dataset) pairs whose result file is missing. Robustness is evaluated on each model's final weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from ..bench.plan import projection
from ..core.errors import DatasetError, MtkitError
from ..core.io import atomic_write_text, clear_tree
from ..core.results import DataRow, DepthRow, ModelInfo, RunResults, strict
from ..core.runtime import after_rank0, init_distributed, resolve_device
from ..core.schema import ModelSpec, Recipe
from ..evaluation.depth import evaluate_depth_model
from ..evaluation.detection import evaluate_detection
from ..evaluation.qualitative import pick_epsilons, qualitative_panel
from ..evaluation.robustness import eval_dataset, evaluate_checkpoint, evaluation_sets, load_model
from ..plugins.manager import get_plugins
from ..recipe.build import build_dataset, build_perturbations
from ..recipe.prepare import PreparedData, prepare_recipe
from ..report import save_report
from ..training.trainer import train
from .jobs import check_launcher, launch
from .provenance import environment
from .stages import StageCache, UnitFiles, read_detection, read_summary

QUICKSTART_HINT = "to try the whole pipeline on the embedded synthetic data instead: mtkit run recipes/quickstart.yaml"


@dataclass
class RunResult:
    run_dir: Path
    results: RunResults
    paths: dict[str, Path]
    stages_run: list[str]
    stages_cached: list[str]
    detached: bool = False
    """the units were submitted to SLURM and not awaited (``detach``): no report yet"""


def check_datasets(recipe: Recipe) -> None:
    """Open every dataset the recipe uses (roots, layouts) before any work; one error listing what is missing."""
    problems = []
    for key, cfg in recipe.datasets().items():
        try:
            build_dataset(cfg, where=key)
        except DatasetError as exc:
            problems.append(f"{key} ({cfg.name}): {str(exc).splitlines()[0].split(' Expected')[0]}")
    if problems:
        raise DatasetError("the recipe's datasets are not available:\n  " + "\n  ".join(problems)
                           + f"\n{QUICKSTART_HINT}")


def run_folder(recipe: Recipe) -> Path:
    """Where ``mtkit run`` writes by default: ``<output_dir>/<name>``."""
    return Path(recipe.output_dir) / recipe.name


def new_results(recipe: Recipe, seeds: list[int], device: str) -> RunResults:
    """The results of a run before its stages: the recipe's name, description, models and the environment."""
    return RunResults(recipe_name=recipe.name, recipe_description=recipe.description, recipe_source=recipe.source,
                      seeds=seeds, models={m.name: ModelInfo(tasks=m.tasks, lam=m.lam) for m in recipe.models},
                      environment=environment(device, recipe), epsilon_axis=recipe.robustness.epsilon_axis)


class LazyModel:
    """A (model, seed)'s checkpoint, loaded once by the first stage that needs it."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.device, self.loaded = path, device, None

    def then(self, fn, *args, **kwargs):
        """``fn(loaded model, *args, **kwargs)``."""
        if self.loaded is None:
            self.loaded = load_model(self.path, self.device)
        return fn(self.loaded, *args, **kwargs)


def _depth_stage(loaded, recipe: Recipe, key: str, seed: int, name: str, device: str, progress: bool) -> DepthRow:
    ds = build_dataset(recipe.data.depth_eval[key], where=f"data.depth_eval.{key}")
    return evaluate_depth_model(loaded.model, ds, recipe.depth_evaluation, device=device, progress=progress,
                                label=f"{name}/{key} depth", model_name=name, seed=seed, dataset_name=key,
                                tf32=recipe.robustness.tf32)


def figure1_panel(recipe: Recipe, run_dir: Path, seed: int, data: PreparedData, device: str) -> Path | None:
    """The report's Figure 1-style panel (``qualitative_panel``) from the first seed's single-task model and its
    multi-task model (λ = 0.1, the paper's, else the first), on the first evaluation set, under the recipe's
    first noise and first attack at two ε; named by the checkpoints' training hashes, so it is drawn once per
    pair. None without such a pair, with ``robustness.qualitative_images: 0`` or without matplotlib."""
    n = recipe.robustness.qualitative_images
    single = next((m for m in recipe.models if "depth" not in m.tasks), None)
    multis = [m for m in recipe.models if "depth" in m.tasks]
    multi = next((m for m in multis if m.lam == 0.1), multis[0] if multis else None)
    names = recipe.robustness.perturbations
    chosen = [p for p in (next((q for q in ("gaussian", "salt_pepper") if q in names), None),
                          next((q for q in ("fgsm", "pgd", "pgd_rms", "apgd") if q in names), None)) if p]
    if not n or single is None or multi is None or not chosen or importlib.util.find_spec("matplotlib") is None:
        return None
    files = {spec.name: UnitFiles.of(recipe, run_dir, spec, seed) for spec in (single, multi)}
    key = evaluation_sets(recipe)[0]
    eps = pick_epsilons(list(recipe.robustness.epsilons))
    blob = json.dumps([[f.train_dir.name for f in files.values()], key, chosen, eps, n,
                       recipe.robustness.options], sort_keys=True, default=str)
    path = run_dir / "figures" / f"figure1-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.png"
    if path.is_file():
        return path
    if not all((f.train_dir / "last.pt").is_file() for f in files.values()):
        return None
    loaded = {name: load_model(f.train_dir / "last.pt", device) for name, f in files.items()}
    ds = eval_dataset(recipe, key, False, data.opened())
    path.parent.mkdir(parents=True, exist_ok=True)
    return qualitative_panel({name: m.segmenter for name, m in loaded.items()}, loaded[multi.name].model, ds,
                             build_perturbations(chosen, recipe.robustness.options), eps, path,
                             {name: m.class_weights for name, m in loaded.items()},
                             list(range(min(n, len(ds)))), seed, device)


def _write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(strict(value), indent=2, allow_nan=False))


def _train_stage(recipe: Recipe, spec: ModelSpec, seed: int, files: UnitFiles, data: PreparedData,
                 progress: bool, force: bool) -> dict:
    """Train one (model, seed) (resuming from its last.pt) and summarise it for done.json. The folder is the
    stage's own: what an interrupted start left before its first checkpoint is kept in previous-<time>/."""
    t0 = time.perf_counter()
    res = train(recipe, spec, files.train_dir, seed=seed, resume=True, progress=progress, force_statistics=force,
                overwrite=True, datasets=data.opened())
    return {"model": spec.name, "seed": seed, "epochs": res.epochs, "steps": res.steps, "val_miou": res.val_miou,
            "best_val_miou": res.best_val_miou, "seconds": time.perf_counter() - t0,
            "class_weights": res.class_weights, "class_weights_key": res.class_weights_key, "history": res.history}


def run_unit(recipe: Recipe, spec: ModelSpec, seed: int, run_dir: Path, cache: StageCache, data: PreparedData,
             results: RunResults, device: str, progress: bool) -> None:
    """Every stage of one (model, seed) through the stage cache: train, evaluate on each evaluation set, depth
    on each depth set, detection on each detection set; their rows go into ``results``."""
    files = UnitFiles.of(recipe, run_dir, spec, seed)
    if cache.force and files.train_dir.exists():
        clear_tree(files.train_dir)
    unit = f"{spec.name} seed {seed}"
    resuming = " (resuming)" if (files.train_dir / "last.pt").is_file() else ""
    results.training.append(cache.result(
        files.done, f"train {unit}", read_summary,
        partial(_train_stage, recipe, spec, seed, files, data, progress, cache.force), _write_json, resuming))
    loaded = LazyModel(files.train_dir / "last.pt", device)  # loaded by the first stage that needs it
    for key, path in files.eval.items():
        results.extend(cache.result(
            path, f"evaluate {unit} on {key}", RunResults.read,
            partial(loaded.then, evaluate_checkpoint, recipe, [key], seed, device, progress, data=data.opened()),
            lambda p, ev: ev.write(p)))
    for key, path in files.depth.items():
        results.depth.append(cache.result(
            path, f"evaluate depth {unit} on {key}", lambda f: DepthRow.model_validate_json(f.read_text()),
            partial(loaded.then, _depth_stage, recipe, key, seed, spec.name, device, progress),
            lambda p, row: atomic_write_text(p, row.model_dump_json())))
    for key, path in files.detection.items():
        results.detection += cache.result(
            path, f"detect attacks {unit} on {key}", read_detection,
            partial(loaded.then, evaluate_detection, recipe, [key], seed, device, progress, data=data.opened()),
            lambda p, rows: atomic_write_text(p, json.dumps(
                {"rows": [r.model_dump(mode="json") for r in rows]}, allow_nan=False)))


def announce_projection(recipe: Recipe, todo_of: dict[str, int], log=print) -> None:
    """Log the projected time of the units still to run (``bench.plan.projection``). The projection is advice:
    where measuring it fails (a plugin's perturbation that refuses random batches, say), one line says so and
    the run goes on."""
    try:
        log(projection(recipe, todo_of))
    except Exception as exc:  # noqa: BLE001 - advice only: nothing of the run depends on it
        log(f"[plan] no projection ({type(exc).__name__}: {exc}); the run goes on (`mtkit run --plan` shows where "
            "measuring fails)")


def run(recipe: Recipe, force: bool = False, seeds: list[int] | None = None, progress: bool = True,
        run_dir: str | Path | None = None, log=print, skip_bad: bool = False, jobs: int = 1,
        units: list[tuple[str, int]] | None = None, detach: bool = False, project: bool = False) -> RunResult:
    """Run every stage of ``recipe`` into ``run_dir`` (default ``<output_dir>/<name>``): prepare the data, train,
    evaluate, report. ``skip_bad`` leaves unreadable source files out of the prepared data (counted).

    ``jobs`` > 1, or ``recipe.launcher.kind`` slurm, runs the independent (model, seed) units as jobs of their
    own (``jobs.launch``: up to ``jobs`` processes on this machine, or a SLURM job array, which ``detach`` only
    submits), then reports from the stage cache. ``units`` restricts the run to those (model, seed) pairs and
    writes no report (what each job runs). ``project`` logs the projected time and FLOPs of the stages still to
    run before the first of them (``bench.plan.projection``: a few seconds of measurement), unless SLURM's nodes
    run them."""
    seeds = seeds or recipe.run_seeds()
    run_dir = Path(run_dir or run_folder(recipe))
    if units is None:
        check_launcher(recipe.launcher, detach)
    check_datasets(recipe)
    device = resolve_device(recipe.device)
    d = init_distributed(device)  # under torchrun: DDP training, sharded evaluation, rank 0 writes
    log = log if d.main else (lambda *_: None)
    progress = progress and d.main
    run_dir.mkdir(parents=True, exist_ok=True)
    results = new_results(recipe, seeds, str(device))
    names = [m.name for m in recipe.models]
    unknown = [u for u in units or [] if u[0] not in names or u[1] not in seeds]
    if unknown:
        raise MtkitError(f"--unit {unknown[0][0]}:{unknown[0][1]} is no (model, seed) of the run; its models are "
                         f"{names}, its seeds {seeds}")
    started = time.perf_counter()
    cache = StageCache(d, force, log)
    files = {(spec.name, seed): UnitFiles.of(recipe, run_dir, spec, seed).all()
             for seed in seeds for spec in recipe.models}
    todo = [unit for unit, fs in files.items() if force or not all(f.is_file() for f in fs)]
    if project and todo and units is None and not d.enabled and recipe.launcher.kind != "slurm":  # not this node's
        announce_projection(recipe, dict(Counter(name for name, _ in todo)), log)
    # rank 0 prepares while the others wait on the store (a timeout of its own, not NCCL's 10 minutes), then they
    # find the cache complete
    data = PreparedData(after_rank0(d, "prepare", lambda: prepare_recipe(
        recipe, skip_bad=skip_bad, force=force and d.main, progress=progress, log=log)))
    for p in data.prepared:
        (cache.cached if p.cached else cache.ran).append(f"prepare {p.key}")
        m = p.manifest
        results.data.append(DataRow(key=p.key, name=m.dataset["name"], split=m.dataset["split"], samples=m.count,
                                    height=m.size[0], width=m.size[1], skipped=len(m.skipped),
                                    skipped_items=m.skipped[:20], folder=str(p.folder)))
    if (jobs > 1 or recipe.launcher.kind == "slurm") and units is None and not d.enabled:
        if todo:  # the stages these jobs are to run count as run, not cached
            cache.by_jobs = {f for unit in todo for f in files[unit] if force or not f.is_file()}
            if not launch(recipe, run_dir, todo, jobs, force, seeds, run, log, detach):
                return RunResult(run_dir, results, {}, cache.ran, cache.cached, detached=True)
        cache.force = False  # what force asked for has just run
    for seed in seeds:
        for spec in recipe.models:
            if units is None or (spec.name, seed) in units:
                run_unit(recipe, spec, seed, run_dir, cache, data, results, device, progress)
    results.seconds = time.perf_counter() - started
    if not d.main or units is not None:
        return RunResult(run_dir, results, {}, cache.ran, cache.cached)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _write_json(run_dir / "environment.json", results.environment)
    log(f"[stage] report → {run_dir / 'report.md'}")
    t0 = time.perf_counter()
    figure1 = figure1_panel(recipe, run_dir, seeds[0], data, str(device))
    paths = save_report(results, run_dir, {"figure1": figure1} if figure1 else None)
    log(f"[stage] report written in {time.perf_counter() - t0:.1f} s")
    get_plugins().hook.mtkit_after_evaluation(run_dir=str(run_dir),
                                             results=[r.model_dump() for r in results.robustness])
    return RunResult(run_dir, results, paths, cache.ran, cache.cached)
