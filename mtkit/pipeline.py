"""``mtkit run``: the paper's protocol as stages (prepare the data, train each model, evaluate clean + sweep
perturbations on each evaluation set, report), each cached by a hash of the config that shapes it. Under
``torchrun --nproc_per_node N -m mtkit run RECIPE`` training runs with DDP, each evaluation set is sharded over the
ranks (``robustness_sweep``), and rank 0 writes every file.

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
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from .build import build_dataset
from .config import ModelSpec, Recipe, config_hash
from .depth_eval import evaluate_depth_model
from .detection_eval import detection_datasets, evaluate_detection
from .errors import DatasetError, MtkitError
from .evaluate import evaluate_checkpoint, evaluation_sets, load_model
from .io import atomic_write_text
from .plugins import get_plugins
from .prepare import prepare_recipe
from .report import save_report
from .results import DataRow, DepthRow, DetectionRow, ModelInfo, RunResults, strict
from .runtime import barrier, init_distributed, resolve_device, resolve_precision
from .train import train

QUICKSTART_HINT = "to try the whole pipeline on the embedded synthetic data instead: mtkit run recipes/quickstart.yaml"


@dataclass
class RunResult:
    run_dir: Path
    results: RunResults
    paths: dict[str, Path]
    stages_run: list[str]
    stages_cached: list[str]


def train_hash(recipe: Recipe, spec: ModelSpec, seed: int) -> str:
    d = recipe.data
    data = {"segmentation": d.segmentation.model_dump(), "segmentation_val": d.segmentation_val.model_dump(),
            "depth": d.depth.model_dump() if d.depth and "depth" in spec.tasks else None,
            "augment": d.augment.model_dump()}
    train = recipe.train.model_dump(exclude={"log_every", "tensorboard", "checkpoint_every"})
    loss = recipe.loss.model_dump(exclude={"edge_consistency"} if not recipe.loss.edge_consistency else set())
    return config_hash(recipe.model.model_dump(), data, loss, train, spec.model_dump(by_alias=True), seed)


def eval_hash(t_hash: str, recipe: Recipe, key: str) -> str:
    return config_hash(t_hash, recipe.data.eval[key].model_dump(), recipe.robustness.model_dump(exclude={"datasets"}))


def depth_hash(t_hash: str, recipe: Recipe, key: str) -> str:
    return config_hash(t_hash, recipe.data.depth_eval[key].model_dump(), recipe.depth_evaluation.model_dump())


def detection_hash(t_hash: str, recipe: Recipe, key: str) -> str:
    rob = recipe.robustness
    return config_hash(t_hash, recipe.data.eval[key].model_dump(), recipe.detection.model_dump(exclude={"datasets"}),
                       rob.options, rob.perturbations, rob.epsilons, recipe.loss.segmentation)


def detection_units(recipe: Recipe, spec: ModelSpec) -> list[str]:
    """The evaluation sets the detection stage of ``spec`` covers (none: detection off, or no depth task)."""
    return detection_datasets(recipe) if recipe.detection.enabled and "depth" in spec.tasks else []


def check_datasets(recipe: Recipe) -> None:
    """Open every dataset the recipe names (roots, layouts) before any work; one error listing what is missing."""
    d = recipe.data
    needed = {"data.segmentation": d.segmentation, "data.segmentation_val": d.segmentation_val}
    if d.depth is not None and any("depth" in m.tasks for m in recipe.models):
        needed["data.depth"] = d.depth
    needed.update({f"data.eval.{k}": v for k, v in d.eval.items()})
    if any("depth" in m.tasks for m in recipe.models):
        needed.update({f"data.depth_eval.{k}": v for k, v in d.depth_eval.items()})
    problems = []
    for key, cfg in needed.items():
        try:
            build_dataset(cfg, where=key)
        except DatasetError as exc:
            problems.append(f"{key} ({cfg.name}): {str(exc).splitlines()[0].split(' Expected')[0]}")
    if problems:
        raise DatasetError("the recipe's datasets are not available:\n  " + "\n  ".join(problems)
                           + f"\n{QUICKSTART_HINT}")


def math_policy(recipe: Recipe, device: str) -> dict[str, Any]:
    """What each phase runs in on ``device`` (``runtime.resolve_precision`` and ``runtime.math_mode``): autocast
    dtype, channels_last, compile, TF32, cudnn.benchmark and determinism."""
    dev = torch.device(device)
    t, r = recipe.train, recipe.robustness
    out = {}
    for phase, keys, deterministic in (("train", t, t.deterministic), ("evaluation", r, False)):
        p = resolve_precision(keys.amp, keys.channels_last, keys.compile, dev, phase, keys.tf32)
        cuda = dev.type == "cuda"
        out[phase] = {"amp": str(p.dtype).replace("torch.", "") if p.dtype else "fp32",
                      "channels_last": p.channels_last, "compile": p.compile,
                      "tf32": p.tf32 and cuda, "cudnn_benchmark": cuda and not deterministic,
                      "deterministic": deterministic if cuda else True}
    return out


def environment(device: str, recipe: Recipe | None = None) -> dict[str, Any]:
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
            "cuda_version": torch.version.cuda, "gpu_count": torch.cuda.device_count(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": commit,
            **({"math": math_policy(recipe, device)} if recipe is not None else {})}


def run_folder(recipe: Recipe) -> Path:
    """Where ``mtkit run`` writes by default: ``<output_dir>/<name>``."""
    return Path(recipe.output_dir) / recipe.name


def new_results(recipe: Recipe, seeds: list[int], device: str) -> RunResults:
    """The results of a run before its stages: the recipe's name, description, models and the environment."""
    return RunResults(recipe_name=recipe.name, recipe_description=recipe.description, recipe_source=recipe.source,
                      seeds=seeds, models={m.name: ModelInfo(tasks=m.tasks, lam=m.lam) for m in recipe.models},
                      environment=environment(device, recipe))


def stage_files(recipe: Recipe, run_dir: Path, spec: ModelSpec, seed: int) -> list[Path]:
    """The files that mark the stages of one (model, seed) done: training, each evaluation set, each depth set."""
    th = train_hash(recipe, spec, seed)
    files = [run_dir / "train" / f"{spec.name}-s{seed}-{th}" / "done.json"]
    files += [run_dir / "eval" / f"{spec.name}-s{seed}-{key}-{eval_hash(th, recipe, key)}.json"
              for key in evaluation_sets(recipe)]
    files += [run_dir / "depth" / f"{spec.name}-s{seed}-{key}-{depth_hash(th, recipe, key)}.json"
              for key in (recipe.data.depth_eval if "depth" in spec.tasks else ())]
    files += [run_dir / "detection" / f"{spec.name}-s{seed}-{key}-{detection_hash(th, recipe, key)}.json"
              for key in detection_units(recipe, spec)]
    return files


def read_stage(path: Path, read, stage: str, log=print):
    """A finished stage's result read from ``path``, or None when the stage is to run: the file is absent, or it
    cannot be read (truncated, not JSON, another schema version, missing fields). A damaged file is said in one
    line and the stage runs again (a training stage resumes from its last.pt), so the same command repairs it."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, MtkitError) as exc:  # JSON and pydantic errors: ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"[stage] {stage}: {path} cannot be read ({reason}); running the stage again")
        return None


def read_detection(path: Path) -> list[DetectionRow]:
    """A detection stage's rows."""
    return [DetectionRow.model_validate(r) for r in json.loads(path.read_text())["rows"]]


def read_summary(path: Path) -> dict[str, Any]:
    """A training stage's done.json (what ``run`` reports of the training), checked for its fields."""
    data = json.loads(path.read_text())
    missing = {"model", "seed", "steps", "val_miou", "history"} - set(data if isinstance(data, dict) else ())
    if missing:
        raise ValueError(f"not a training summary: no {', '.join(sorted(missing))}")
    return data


class LazyModel:
    """A (model, seed)'s checkpoint, loaded once by the first stage that needs it."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.device, self.loaded = path, device, None

    def then(self, fn, *args):
        """``fn(loaded model, *args)``."""
        if self.loaded is None:
            self.loaded = load_model(self.path, self.device)
        return fn(self.loaded, *args)


def _depth_stage(loaded, recipe: Recipe, key: str, seed: int, name: str, device: str, progress: bool) -> DepthRow:
    ds = build_dataset(recipe.data.depth_eval[key], where=f"data.depth_eval.{key}")
    return evaluate_depth_model(loaded.model, ds, recipe.depth_evaluation, device=device, progress=progress,
                                label=f"{name}/{key} depth", model_name=name, seed=seed, dataset_name=key)


def run_jobs(recipe: Recipe, run_dir: Path, units: list[tuple[str, int]], jobs: int, force: bool, log=print
             ) -> None:
    """Run the stages of independent (model, seed) units in up to ``jobs`` processes at once (``mtkit run --unit``
    on the resolved recipe, into the same run folder and stage cache): several models share one GPU, or spread
    over several (each process sees one GPU, ``CUDA_VISIBLE_DEVICES``, round robin), or share the CPU. Each
    process trains and evaluates exactly as one process would (the same seeds, data and thread count), so the
    results equal ``jobs=1``'s; a failed unit stops the others and names its log."""
    folder = run_dir / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    gpus = torch.cuda.device_count() if recipe.device in ("auto", "cuda") else 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    pending, running = list(enumerate(units)), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (name, seed) = pending.pop(0)
                child = {**env, **({"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else {})}
                logfile = folder / f"{name}-s{seed}.log"
                cmd = [sys.executable, "-m", "mtkit", "run", str(recipe_file), "--out", str(run_dir), "--no-progress",
                       "--unit", f"{name}:{seed}", *(["--force"] if force else [])]
                with open(logfile, "w") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child)
                running.append((proc, name, seed, logfile, time.perf_counter()))
                log(f"[job] {name} seed {seed} started" + (f" on GPU {i % gpus}" if gpus > 1 else "")
                    + f" (log: {logfile})")
            time.sleep(0.2)
            for job in [j for j in running if j[0].poll() is not None]:
                proc, name, seed, logfile, t0 = job
                running.remove(job)
                if proc.returncode != 0:
                    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-8:])
                    raise MtkitError(f"job {name} seed {seed} failed (exit code {proc.returncode}); its log "
                                     f"{logfile} ends:\n{tail}")
                log(f"[job] {name} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    finally:
        for proc, *_ in running:
            proc.terminate()


def run(recipe: Recipe, force: bool = False, seeds: list[int] | None = None, progress: bool = True,
        run_dir: str | Path | None = None, log=print, skip_bad: bool = False, jobs: int = 1,
        units: list[tuple[str, int]] | None = None) -> RunResult:
    """Run every stage of ``recipe`` into ``run_dir`` (default ``<output_dir>/<name>``): prepare the data, train,
    evaluate, report. ``skip_bad`` leaves unreadable source files out of the prepared data (counted).

    ``jobs`` > 1 runs the independent (model, seed) units in that many processes at once (``run_jobs``), then
    reports from the stage cache. ``units`` restricts the run to those (model, seed) pairs and writes no report
    (what each of those processes runs)."""
    seeds = seeds or recipe.run_seeds()
    run_dir = Path(run_dir or run_folder(recipe))
    check_datasets(recipe)
    eval_keys = evaluation_sets(recipe)
    device = resolve_device(recipe.device)
    d = init_distributed(device)  # under torchrun: DDP training, sharded evaluation, rank 0 writes
    log = log if d.main else (lambda *_: None)
    progress = progress and d.main
    run_dir.mkdir(parents=True, exist_ok=True)
    ran, cached = [], []
    results = new_results(recipe, seeds, str(device))
    names = [m.name for m in recipe.models]
    unknown = [u for u in units or [] if u[0] not in names or u[1] not in seeds]
    if unknown:
        raise MtkitError(f"--unit {unknown[0][0]}:{unknown[0][1]} is no (model, seed) of the run; its models are "
                         f"{names}, its seeds {seeds}")
    started = time.perf_counter()
    if not d.main:
        barrier(d)  # rank 0 prepares; the others then find the cache complete
    prepared = prepare_recipe(recipe, skip_bad=skip_bad, force=force and d.main, progress=progress, log=log)
    if d.main:
        barrier(d)
    for p in prepared:
        (cached if p.cached else ran).append(f"prepare {p.key}")
        m = p.manifest
        results.data.append(DataRow(key=p.key, name=m.dataset["name"], split=m.dataset["split"], samples=m.count,
                                    height=m.size[0], width=m.size[1], skipped=len(m.skipped),
                                    skipped_items=m.skipped[:20], folder=str(p.folder)))
    by_jobs: set[Path] = set()
    if jobs > 1 and units is None and not d.enabled:
        files = {(spec.name, seed): stage_files(recipe, run_dir, spec, seed)
                 for seed in seeds for spec in recipe.models}
        todo = [unit for unit, fs in files.items() if force or not all(f.is_file() for f in fs)]
        if todo:  # the stages these jobs are to run count as run, not cached
            by_jobs = {f for unit in todo for f in files[unit] if force or not f.is_file()}
            run_jobs(recipe, run_dir, todo, jobs, force, log)
        force = False  # what force asked for has just run
    def stage_result(path: Path, stage: str, read, compute, write):
        """A stage's result: read from its file when finished (cached), else computed, written by rank 0 and
        recorded as run; a damaged file runs the stage again (``read_stage``)."""
        value = None if force else read_stage(path, read, stage, log)
        if value is not None:
            (ran if path in by_jobs else cached).append(stage)
            return value
        log(f"[stage] {stage}")
        value = compute()
        if d.main:
            write(path, value)
        barrier(d)
        ran.append(stage)
        return value

    for seed in seeds:
        for spec in recipe.models:
            if units is not None and (spec.name, seed) not in units:
                continue
            th = train_hash(recipe, spec, seed)
            tdir = run_dir / "train" / f"{spec.name}-s{seed}-{th}"
            done = tdir / "done.json"
            stage = f"train {spec.name} seed {seed}"
            if force and tdir.exists():
                shutil.rmtree(tdir)
            summary = read_stage(done, read_summary, stage, log)
            if summary is not None:
                (ran if done in by_jobs else cached).append(stage)
            else:
                log(f"[stage] {stage}" + (" (resuming)" if (tdir / "last.pt").is_file() else ""))
                t0 = time.perf_counter()
                res = train(recipe, spec, tdir, seed=seed, resume=True, progress=progress, force_statistics=force)
                summary = {"model": spec.name, "seed": seed, "epochs": res.epochs, "steps": res.steps,
                           "val_miou": res.val_miou, "best_val_miou": res.best_val_miou,
                           "seconds": time.perf_counter() - t0, "class_weights": res.class_weights,
                           "class_weights_key": res.class_weights_key, "history": res.history}
                if d.main:
                    atomic_write_text(done, json.dumps(strict(summary), indent=2, allow_nan=False))
                barrier(d)
                ran.append(stage)
            results.training.append(summary)
            loaded = LazyModel(tdir / "last.pt", device)  # loaded by the first stage that needs it
            for key in eval_keys:
                results.extend(stage_result(
                    run_dir / "eval" / f"{spec.name}-s{seed}-{key}-{eval_hash(th, recipe, key)}.json",
                    f"evaluate {spec.name} seed {seed} on {key}", RunResults.read,
                    partial(loaded.then, evaluate_checkpoint, recipe, [key], seed, device, progress),
                    lambda path, ev: ev.write(path)))
            for key in recipe.data.depth_eval if "depth" in spec.tasks else ():
                results.depth.append(stage_result(
                    run_dir / "depth" / f"{spec.name}-s{seed}-{key}-{depth_hash(th, recipe, key)}.json",
                    f"evaluate depth {spec.name} seed {seed} on {key}",
                    lambda f: DepthRow.model_validate_json(f.read_text()),
                    partial(loaded.then, _depth_stage, recipe, key, seed, spec.name, device, progress),
                    lambda path, row: atomic_write_text(path, row.model_dump_json())))
            for key in detection_units(recipe, spec):
                results.detection += stage_result(
                    run_dir / "detection" / f"{spec.name}-s{seed}-{key}-{detection_hash(th, recipe, key)}.json",
                    f"detect attacks {spec.name} seed {seed} on {key}", read_detection,
                    partial(loaded.then, evaluate_detection, recipe, [key], seed, device, progress),
                    lambda path, rows: atomic_write_text(path, json.dumps(
                        {"rows": [r.model_dump(mode="json") for r in rows]}, allow_nan=False)))
    results.seconds = time.perf_counter() - started
    if not d.main or units is not None:
        return RunResult(run_dir, results, {}, ran, cached)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_text(run_dir / "environment.json", json.dumps(strict(results.environment), indent=2, allow_nan=False))
    log(f"[stage] report → {run_dir / 'report.md'}")
    t0 = time.perf_counter()
    paths = save_report(results, run_dir)
    log(f"[stage] report written in {time.perf_counter() - t0:.1f} s")
    get_plugins().hook.mtkit_after_evaluation(run_dir=str(run_dir),
                                             results=[r.model_dump() for r in results.robustness])
    return RunResult(run_dir, results, paths, ran, cached)
