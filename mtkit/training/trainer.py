"""Training engine: single-task (segmentation) and multi-task (segmentation + self-supervised depth) models; the
step itself is ``mtkit.training.step``, this module adds the data, the checkpoints and the loop.

Epochs: one epoch is one pass over the segmentation training set (``len(seg_set) // global seg batch`` steps,
or ``train.steps_per_epoch``); the depth set is drawn alongside from its own shuffled stream, reshuffled
whenever it runs out, so the two datasets may differ in size. Shuffling is seeded by (seed, epoch), so an epoch's
batches are known in advance; a resumed run skips the steps already done and continues bit for bit on the CPU.
Data: the datasets are read from the prepared cache (``mtkit.recipe.prepare``); loader workers slice uint8 crops, and
flip and colour jitter run batched on the device with parameters drawn per epoch from the seed.
DDP: start with ``torchrun --nproc_per_node N -m mtkit train RECIPE``; DistributedSampler shards each global
batch over the ranks, rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..core import checkpoint as ckpt
from ..core.errors import MtkitError
from ..core.io import run_lock
from ..core.precision import math_mode, resolve_pin_memory
from ..core.progress import progress_bar
from ..core.runtime import seed_everything
from ..core.schema import AugmentConfig, ModelSpec, Recipe, config_hash
from ..data.augment import AugmentParams, draw_params
from ..data.cache import CachedSegmentation, CachedVideo, training_keys
from ..data.sampling import EpochLoader, epoch_batches
from ..data.stats import build_class_weights
from ..ops.metrics import miou
from ..plugins.manager import get_plugins
from ..recipe.prepare import default_workers, handed_or_prepared
from .log import MetricsLog, truncate_log
from .state import checkpoint_payload, restore
from .step import StepEngine
from .validate import confusion_on


@dataclass
class TrainResult:
    model_name: str
    run_dir: Path
    best: Path
    last: Path
    epochs: int
    steps: int
    val_miou: float
    best_val_miou: float
    history: list[dict[str, Any]] = field(default_factory=list)
    class_weights: list[float] | None = None
    class_weights_key: str | None = None


def epoch_plan(dataset: CachedSegmentation | CachedVideo, batches: list[list[int]], augment: AugmentConfig, seed: int,
               epoch: int, rank: int, stream: int) -> tuple[list[list], AugmentParams]:
    """An epoch's loader keys (training crops at drawn offsets) and augmentation parameters, drawn from a
    generator seeded by (seed, epoch, rank, stream): known in advance, so a resumed run draws the same."""
    g = torch.Generator().manual_seed(int(config_hash(seed, epoch, rank, stream), 16))
    params = draw_params(augment, sum(map(len, batches)), g)
    return training_keys(dataset, batches, g), params


class Trainer:
    """Trains one model spec of a recipe into ``run_dir`` (best.pt, last.pt, metrics.jsonl). It *has* a step
    engine (``engine``: model, losses, optimizer, precision) and holds the loop's state: epoch, step, the best
    validation mIoU and the history. ``datasets`` are the prepared training sets of the run (``key`` → dataset, as
    ``mtkit.recipe.prepare.open_datasets`` gives them); without them the trainer opens the cache itself."""

    def __init__(self, recipe: Recipe, spec: ModelSpec, run_dir: str | Path, seed: int | None = None,
                 progress: bool = True, force_statistics: bool = False,
                 datasets: dict[str, CachedSegmentation | CachedVideo] | None = None) -> None:
        self.engine = StepEngine(recipe, spec, seed)
        self.recipe, self.spec, self.seed = recipe, spec, self.engine.seed
        self.dist = self.engine.dist
        self.force_statistics = force_statistics
        self.weights_key: str | None = None
        self.run_dir = Path(run_dir)
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.show_progress = progress
        self.datasets = datasets
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.best = -math.inf
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ set-up
    def _dataset(self, key: str) -> CachedSegmentation | CachedVideo:
        log = print if self.dist.main and self.show_progress else (lambda *_: None)
        return handed_or_prepared(self.recipe, key, self.datasets, self.show_progress, log)

    def _setup(self) -> None:
        r, e = self.recipe, self.engine
        seed_everything(self.seed)
        self.seg_train = self._dataset("data.segmentation")
        self.seg_val = self._dataset("data.segmentation_val")
        self.depth_train = self._dataset("data.depth") if e.multitask else None
        if len(self.seg_train) < e.seg_batch:
            raise MtkitError(f"the segmentation training set has {len(self.seg_train)} samples, fewer than one "
                             f"batch of {e.seg_batch}")
        if self.depth_train is not None and len(self.depth_train) < e.depth_batch:
            raise MtkitError(f"the depth training set has {len(self.depth_train)} samples, fewer than one "
                             f"batch of {e.depth_batch}")
        self.steps_per_epoch = r.train.steps_per_epoch or max(1, len(self.seg_train) // e.seg_batch)
        weights, self.weights_key = build_class_weights(r, self.seg_train, self.force_statistics)
        e.build(weights)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self, path: Path, resumable: bool = True) -> None:
        if self.dist.main:
            ckpt.atomic_torch_save(checkpoint_payload(self, resumable), path)

    def _clear_folder(self, resume: bool, overwrite: bool) -> bool:
        """Resume from ``last.pt`` (``resume``), or make the folder free for a new model: one that already holds
        one is never emptied silently; without ``resume`` it needs ``overwrite``, which keeps the old files in
        ``previous-<time>/``. Returns whether training resumed."""
        resumed = resume and self.last_path.is_file() and restore(self, self.last_path)
        old = [p for p in (self.last_path, self.best_path, self.metrics_path, self.run_dir / "tensorboard")
               if p.exists()]
        if not resumed and old and self.dist.main:
            if not overwrite:
                raise MtkitError(f"{self.run_dir} already holds a trained model ({', '.join(p.name for p in old)}): "
                                 "continue it with --resume, start again with --overwrite (the old files are kept "
                                 "in previous-<time>/), or train into another --out")
            keep = self.run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
            keep.mkdir()
            for p in old:
                p.rename(keep / p.name)
        if resumed and self.dist.main:
            truncate_log(self.metrics_path, self.step)
        return resumed

    # ----------------------------------------------------------------------------------------- the data
    def epoch_plan(self, dataset: CachedSegmentation | CachedVideo, batches: list[list[int]], stream: int
                   ) -> tuple[list[list], AugmentParams]:
        return epoch_plan(dataset, batches, self.recipe.data.augment, self.seed, self.epoch, self.dist.rank, stream)

    def _epoch_data(self, loaders: tuple[EpochLoader, EpochLoader | None]) -> Iterator[tuple[dict, dict | None]]:
        """This epoch's batches from the step it stopped at, augmented on the device."""
        e, skip = self.engine, self.step_in_epoch
        ls, ld = e.seg_batch // self.dist.world, e.depth_batch // self.dist.world  # samples per rank and step
        seg_b = epoch_batches(len(self.seg_train), e.seg_batch, self.steps_per_epoch, self.seed, self.epoch, self.dist)
        seg_keys, seg_p = self.epoch_plan(self.seg_train, seg_b, 0)
        dep_keys, dep_p = self.epoch_plan(self.depth_train, epoch_batches(
            len(self.depth_train), e.depth_batch, self.steps_per_epoch, self.seed + 7919, self.epoch,
            self.dist), 1) if self.depth_train is not None else (None, None)
        seg_loader, dep_loader = loaders
        dep_it = dep_loader.epoch(dep_keys[skip:]) if dep_loader is not None and dep_keys else None
        for k, seg_raw in enumerate(seg_loader.epoch(seg_keys[skip:]), start=skip):
            yield e.augment(seg_raw, next(dep_it) if dep_it is not None else None, seg_p[k * ls:(k + 1) * ls],
                            dep_p[k * ld:(k + 1) * ld] if dep_p is not None else None)

    def diverged_hint(self) -> str:
        return f", the last good checkpoint is kept at {self.last_path}" + (
            "" if self.last_path.is_file() else " (none written yet)")

    def validate(self) -> float:
        bs, e = self.recipe.robustness.batch_size, self.engine
        conf = confusion_on(e.model.segmenter(), self.seg_val, self.recipe.model.num_classes,
                            bs if isinstance(bs, int) else e.seg_batch, e.device, e.precision, self.dist)
        e.model.train()
        return miou(conf)

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to the recipe's epochs. ``resume`` continues from ``last.pt``; a folder that already holds a model
        is never emptied silently: without ``resume`` it needs ``overwrite``, which keeps the old files in
        ``previous-<time>/``."""
        self._setup()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir, self.dist.main), math_mode(self.engine.precision.tf32,
                                                               self.recipe.train.deterministic):
            return self._fit(resume, overwrite)

    def _fit(self, resume: bool, overwrite: bool) -> TrainResult:
        self._clear_folder(resume, overwrite)
        t, e = self.recipe.train, self.engine
        log = MetricsLog(self.metrics_path, self.dist.main, t.tensorboard)
        if self.recipe.train.cuda_graphs is True and not e.cuda_graphs and self.dist.main:
            print(f"[cuda graphs] {e.cuda_graphs_reason}")
        if e.precision.compile and self.dist.main and self.show_progress:
            print(f"[compile] torch.compile ({e.precision.compile}): the first step compiles the model, which takes "
                  "a minute or more; the steps after it reuse the compiled graphs")
        d = self.recipe.data
        workers = default_workers(d.num_workers)
        pin = resolve_pin_memory(d.pin_memory, e.device)
        loaders = (EpochLoader(self.seg_train, workers, pin, d.persistent_workers),
                   EpochLoader(self.depth_train, workers, pin, d.persistent_workers)
                   if self.depth_train is not None else None)
        e.model.train()
        total_steps = t.epochs * self.steps_per_epoch
        with progress_bar(self.show_progress and self.dist.main, total_steps, self.spec.name, self.step) as advance:
            while self.epoch < t.epochs:
                skip = self.step_in_epoch
                sums = self._run_epoch(loaders, log, advance)
                self._end_epoch(max(self.step_in_epoch - skip, 1), sums, log)
        log.close()
        if self.dist.enabled:
            dist.barrier()
        last_val = self.history[-1]["val_miou"] if self.history else float("nan")
        return TrainResult(self.spec.name, self.run_dir, self.best_path, self.last_path, self.epoch, self.step,
                           last_val, self.best, self.history,
                           None if e.weights is None else e.weights.tolist(), self.weights_key)

    def _run_epoch(self, loaders, log: MetricsLog, advance) -> dict[str, float]:
        """The steps of one epoch from where it stopped; the sums of the loss terms read back."""
        t, e = self.recipe.train, self.engine
        images_per_step = e.seg_batch + e.depth_batch
        sums: dict[str, float] = {}
        window: list[dict[str, torch.Tensor]] = []  # the steps' terms not yet read back
        tick, ticked = time.perf_counter(), self.step
        for seg, dep in self._epoch_data(loaders):
            window.append(e.train_step(seg, dep))
            self.step += 1
            self.step_in_epoch += 1
            save = t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                and self.step_in_epoch < self.steps_per_epoch
            info = None
            # read back (and check for NaN) at log steps, before a checkpoint and at the epoch's end only
            if self.step % t.log_every == 0 or save or self.step_in_epoch == self.steps_per_epoch:
                values = e.read_back(window, self.step, self.epoch, self.diverged_hint())
                window = []
                for row in values:
                    for name, v in row.items():
                        sums[name] = sums.get(name, 0.0) + v
                rate = images_per_step * self.dist.world * (self.step - ticked) / max(
                    time.perf_counter() - tick, 1e-9)
                tick, ticked = time.perf_counter(), self.step
                info = " ".join(f"{n}={v:.3f}" for n, v in values[-1].items()) + f" {rate:.1f} img/s"
                if self.step % t.log_every == 0:
                    log.write({"type": "step", "model": self.spec.name, "epoch": self.epoch + 1,
                               "step": self.step, "lr": e.optimizer.param_groups[0]["lr"],
                               "images_per_s": rate, **values[-1]})
            advance(description=f"{self.spec.name} epoch {self.epoch + 1}/{t.epochs}", info=info)
            if save:
                self.save(self.last_path)
        # an epoch cut short (a resumed one with nothing left) reads the rest
        e.read_back(window, self.step, self.epoch, self.diverged_hint())
        return sums

    def _end_epoch(self, steps: int, sums: dict[str, float], log: MetricsLog) -> None:
        """The schedule's step, validation, the epoch's record, the best and last checkpoints, the epoch hook."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.engine.scheduler.step()
        val = self.validate()
        record = {"type": "epoch", "model": self.spec.name, "epoch": self.epoch, "step": self.step,
                  "val_miou": val, **{f"train_{k}": v / steps for k, v in sums.items()}}
        self.history.append(record)
        log.write(record)
        if val > self.best:
            self.best = val
            self.save(self.best_path, resumable=False)
        self.save(self.last_path)
        if self.dist.main:
            get_plugins().hook.mtkit_after_epoch(run_dir=str(self.run_dir), model_name=self.spec.name,
                                                 epoch=self.epoch, metrics=record)


def train(recipe: Recipe, spec: ModelSpec | str, run_dir: str | Path, seed: int | None = None,
          resume: bool = False, progress: bool = True, force_statistics: bool = False,
          overwrite: bool = False, datasets: dict | None = None) -> TrainResult:
    """Train one model of ``recipe`` (by spec or name) into ``run_dir``."""
    if isinstance(spec, str):
        names = [m.name for m in recipe.models]
        if spec not in names:
            raise MtkitError(f"no model '{spec}' in the recipe; its models are {names}")
        spec = recipe.models[names.index(spec)]
    return Trainer(recipe, spec, run_dir, seed, progress, force_statistics, datasets).fit(resume=resume,
                                                                                         overwrite=overwrite)
