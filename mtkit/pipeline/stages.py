"""The stages of ``mtkit run`` and their cache: the hash of the config that shapes each stage (train, evaluate,
depth, detection), the one naming of their files, and the one caching path every stage goes through (read the
finished stage's file, or compute it, write it on rank 0 and record it as run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import MtkitError
from ..core.results import DetectionRow
from ..core.runtime import Dist, barrier
from ..core.schema import ModelSpec, Recipe, config_hash
from ..evaluation.detection import detection_datasets
from ..evaluation.robustness import evaluation_sets


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


@dataclass
class UnitFiles:
    """The files of one (model, seed) unit's stages: its training folder and done.json, and one result file per
    evaluation set, depth set and detection set (the one place their names are made)."""

    train_dir: Path
    done: Path
    eval: dict[str, Path]
    depth: dict[str, Path]
    detection: dict[str, Path]

    @classmethod
    def of(cls, recipe: Recipe, run_dir: Path, spec: ModelSpec, seed: int) -> UnitFiles:
        th = train_hash(recipe, spec, seed)
        unit = f"{spec.name}-s{seed}"
        tdir = run_dir / "train" / f"{unit}-{th}"
        return cls(tdir, tdir / "done.json",
                   {k: run_dir / "eval" / f"{unit}-{k}-{eval_hash(th, recipe, k)}.json"
                    for k in evaluation_sets(recipe)},
                   {k: run_dir / "depth" / f"{unit}-{k}-{depth_hash(th, recipe, k)}.json"
                    for k in (recipe.data.depth_eval if "depth" in spec.tasks else ())},
                   {k: run_dir / "detection" / f"{unit}-{k}-{detection_hash(th, recipe, k)}.json"
                    for k in detection_units(recipe, spec)})

    def all(self) -> list[Path]:
        """Every file that marks a stage of the unit done."""
        return [self.done, *self.eval.values(), *self.depth.values(), *self.detection.values()]


def stage_files(recipe: Recipe, run_dir: Path, spec: ModelSpec, seed: int) -> list[Path]:
    """The files that mark the stages of one (model, seed) done: training, each evaluation set, each depth set."""
    return UnitFiles.of(recipe, run_dir, spec, seed).all()


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


@dataclass
class StageCache:
    """The one caching path of ``mtkit run``'s stages: ``result`` reads a finished stage's file, or computes the
    stage, writes its file on rank 0 and waits for the ranks; what ran and what was cached is recorded.
    ``by_jobs`` are the files the ``--jobs`` processes have just written (they count as run)."""

    dist: Dist
    force: bool = False
    log: Callable[[str], None] = print
    by_jobs: set[Path] = field(default_factory=set)
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    def result(self, path: Path, stage: str, read: Callable[[Path], Any], compute: Callable[[], Any],
               write: Callable[[Path, Any], None], announce: str = "") -> Any:
        """A stage's result: read from ``path`` when finished (cached), else computed (``announce`` is added to
        the stage's line), written by rank 0 and recorded as run; a damaged file runs the stage again."""
        value = None if self.force else read_stage(path, read, stage, self.log)
        if value is not None:
            (self.ran if path in self.by_jobs else self.cached).append(stage)
            return value
        self.log(f"[stage] {stage}{announce}")
        value = compute()
        if self.dist.main:
            write(path, value)
        barrier(self.dist)
        self.ran.append(stage)
        return value
