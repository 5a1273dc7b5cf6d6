"""Training engine: single-task (segmentation) and multi-task (segmentation + self-supervised depth) models; the
step itself is ``mtkit.step``, this module adds the data, the checkpoints and the loop.

Epochs: one epoch is one pass over the segmentation training set (``len(seg_set) // global seg batch`` steps,
or ``train.steps_per_epoch``); the depth set is drawn alongside from its own shuffled stream, reshuffled
whenever it runs out, so the two datasets may differ in size. Shuffling is seeded by (seed, epoch), so an epoch's
batches are known in advance; a resumed run skips the steps already done and continues bit for bit on the CPU.
Data: the datasets are read from the prepared cache (``mtkit.prepare``); loader workers slice uint8 crops, and
flip and colour jitter run batched on the device with parameters drawn per epoch from the seed.
DDP: start with ``torchrun --nproc_per_node N -m mtkit train RECIPE``; DistributedSampler shards each global
batch over the ranks, rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import ModelSpec, Recipe, config_hash
from .data.augment import AugmentParams, draw_params
from .data.cache import CachedSegmentation, CachedVideo, training_keys
from .data.stats import build_class_weights
from .errors import CheckpointError, MtkitError
from .io import run_lock
from .metrics import confusion_on, miou
from .metrics_log import MetricsLog, truncate_log
from .plugins import get_plugins
from .prepare import default_workers, prepared_dataset
from .progress import progress_bar
from .runtime import math_mode, resolve_pin_memory, seed_everything
from .sampling import EpochLoader, epoch_batches
from .step import StepEngine


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


class Trainer(StepEngine):
    """Trains one model spec of a recipe into ``run_dir`` (best.pt, last.pt, metrics.jsonl)."""

    def __init__(self, recipe: Recipe, spec: ModelSpec, run_dir: str | Path, seed: int | None = None,
                 progress: bool = True, force_statistics: bool = False) -> None:
        super().__init__(recipe, spec, seed)
        self.force_statistics = force_statistics
        self.weights_key: str | None = None
        self.run_dir = Path(run_dir)
        self.show_progress = progress

    # ------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        r = self.recipe
        seed_everything(self.seed)
        log = print if self.dist.main and self.show_progress else (lambda *_: None)
        self.seg_train = prepared_dataset(r, "data.segmentation", self.show_progress, log)
        self.seg_val = prepared_dataset(r, "data.segmentation_val", self.show_progress, log)
        self.depth_train = prepared_dataset(r, "data.depth", self.show_progress, log) if self.multitask else None
        if len(self.seg_train) < self.seg_batch:
            raise MtkitError(f"the segmentation training set has {len(self.seg_train)} samples, fewer than one "
                             f"batch of {self.seg_batch}")
        if self.depth_train is not None and len(self.depth_train) < self.depth_batch:
            raise MtkitError(f"the depth training set has {len(self.depth_train)} samples, fewer than one "
                             f"batch of {self.depth_batch}")
        self.steps_per_epoch = r.train.steps_per_epoch or max(1, len(self.seg_train) // self.seg_batch)
        weights, self.weights_key = build_class_weights(r, self.seg_train, self.force_statistics)
        self.build(weights)

    # ---------------------------------------------------------------------------------------- checkpoints
    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _payload(self, resumable: bool = True) -> dict[str, Any]:
        """What a checkpoint holds; ``resumable`` adds optimizer, scheduler and RNG states (last.pt), which the
        best weights (best.pt, for evaluation and deployment) do without: a third of the size with Adam."""
        payload = {
            "format": "mtkit-checkpoint-1",
            "model": self.model.state_dict(),
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "best": self.best if math.isfinite(self.best) else None,
            "recipe": self.recipe.to_dict(),
            "spec": self.spec.model_dump(by_alias=True),
            "seed": self.seed,
            "class_weights": self.weights,
            "class_weights_key": self.weights_key,
            "history": self.history,
        }
        if resumable:
            payload.update(optimizer=self.optimizer.state_dict(), scheduler=ckpt.scheduler_state(self.scheduler),
                           rng=ckpt.rng_state(), scaler=self.scaler.state_dict())
        return payload

    def save(self, path: Path, resumable: bool = True) -> None:
        if self.dist.main:
            ckpt.atomic_torch_save(self._payload(resumable), path)

    def _resume(self) -> bool:
        if not self.last_path.is_file():
            return False
        data = ckpt.load_checkpoint(self.last_path)
        if "optimizer" not in data or "rng" not in data:
            raise CheckpointError(f"{self.last_path} holds weights only (a best.pt-style checkpoint): it cannot be "
                                  "resumed; resume needs the last.pt that training wrote")
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        ckpt.load_scheduler_state(self.scheduler, data["scheduler"])
        if data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        self.epoch, self.step, self.step_in_epoch = data["epoch"], data["step"], data["step_in_epoch"]
        self.best = -math.inf if data["best"] is None else data["best"]
        self.history = list(data.get("history", []))
        ckpt.set_rng_state(data["rng"])
        return True

    # ----------------------------------------------------------------------------------------- the data
    def epoch_plan(self, dataset: CachedSegmentation | CachedVideo, batches: list[list[int]], stream: int
                   ) -> tuple[list[list], AugmentParams]:
        """This epoch's loader keys (training crops at drawn offsets) and augmentation parameters, drawn from a
        generator seeded by (seed, epoch, rank, stream): known in advance, so a resumed run draws the same."""
        g = torch.Generator().manual_seed(int(config_hash(self.seed, self.epoch, self.dist.rank, stream), 16))
        params = draw_params(self.recipe.data.augment, sum(map(len, batches)), g)
        return training_keys(dataset, batches, g), params

    def diverged_hint(self) -> str:
        return f", the last good checkpoint is kept at {self.last_path}" + (
            "" if self.last_path.is_file() else " (none written yet)")

    def validate(self) -> float:
        bs = self.recipe.robustness.batch_size
        conf = confusion_on(self.model.segmenter(), self.seg_val, self.recipe.model.num_classes,
                            bs if isinstance(bs, int) else self.seg_batch, self.device, self.precision, self.dist)
        self.model.train()
        return miou(conf)

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to the recipe's epochs. ``resume`` continues from ``last.pt``; a folder that already holds a model
        is never emptied silently: without ``resume`` it needs ``overwrite``, which keeps the old files in
        ``previous-<time>/``."""
        self._setup()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir, self.dist.main), math_mode(self.precision.tf32, self.recipe.train.deterministic):
            return self._fit(resume, overwrite)

    def _fit(self, resume: bool, overwrite: bool) -> TrainResult:
        resumed = resume and self._resume()
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
        t = self.recipe.train
        log = MetricsLog(self.metrics_path, self.dist.main, t.tensorboard)
        if self.precision.compile and self.dist.main and self.show_progress:
            print(f"[compile] torch.compile ({self.precision.compile}): the first step compiles the model, which takes "
                  "a minute or more; the steps after it reuse the compiled graphs")
        hooks = get_plugins().hook
        total_steps = t.epochs * self.steps_per_epoch
        images_per_step = self.seg_batch + self.depth_batch
        ls, ld = self.seg_batch // self.dist.world, self.depth_batch // self.dist.world  # samples per rank and step
        d = self.recipe.data
        workers = default_workers(d.num_workers)
        pin = resolve_pin_memory(d.pin_memory, self.device)
        seg_loader = EpochLoader(self.seg_train, workers, pin, d.persistent_workers)
        dep_loader = EpochLoader(self.depth_train, workers, pin, d.persistent_workers) \
            if self.depth_train is not None else None
        self.model.train()
        with progress_bar(self.show_progress and self.dist.main, total_steps, self.spec.name, self.step) as advance:
            while self.epoch < t.epochs:
                seg_b = epoch_batches(len(self.seg_train), self.seg_batch, self.steps_per_epoch, self.seed, self.epoch,
                                      self.dist)
                seg_keys, seg_p = self.epoch_plan(self.seg_train, seg_b, 0)
                dep_keys, dep_p = self.epoch_plan(self.depth_train, epoch_batches(
                    len(self.depth_train), self.depth_batch, self.steps_per_epoch, self.seed + 7919, self.epoch,
                    self.dist), 1) if self.depth_train is not None else (None, None)
                skip = self.step_in_epoch
                seg_it = seg_loader.epoch(seg_keys[skip:])
                dep_it = dep_loader.epoch(dep_keys[skip:]) if dep_loader is not None and dep_keys else None
                sums: dict[str, float] = {}
                window: list[dict[str, torch.Tensor]] = []  # the steps' terms not yet read back
                tick, ticked = time.perf_counter(), self.step
                for k, seg_raw in enumerate(seg_it, start=skip):
                    seg, dep = self.augment(seg_raw, next(dep_it) if dep_it is not None else None,
                                            seg_p[k * ls:(k + 1) * ls],
                                            dep_p[k * ld:(k + 1) * ld] if dep_p is not None else None)
                    window.append(self.train_step(seg, dep))
                    self.step += 1
                    self.step_in_epoch += 1
                    save = t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                        and self.step_in_epoch < self.steps_per_epoch
                    info = None
                    # read back (and check for NaN) at log steps, before a checkpoint and at the epoch's end only
                    if self.step % t.log_every == 0 or save or self.step_in_epoch == self.steps_per_epoch:
                        values = self.read_back(window)
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
                                       "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                                       "images_per_s": rate, **values[-1]})
                    advance(description=f"{self.spec.name} epoch {self.epoch + 1}/{t.epochs}", info=info)
                    if save:
                        self.save(self.last_path)
                self.read_back(window)  # an epoch cut short (a resumed one with nothing left) reads the rest
                n = max(self.step_in_epoch - skip, 1)
                self.epoch += 1
                self.step_in_epoch = 0
                self.scheduler.step()
                val = self.validate()
                record = {"type": "epoch", "model": self.spec.name, "epoch": self.epoch, "step": self.step,
                          "val_miou": val, **{f"train_{k}": v / n for k, v in sums.items()}}
                self.history.append(record)
                log.write(record)
                if val > self.best:
                    self.best = val
                    self.save(self.best_path, resumable=False)
                self.save(self.last_path)
                if self.dist.main:
                    hooks.mtkit_after_epoch(run_dir=str(self.run_dir), model_name=self.spec.name,
                                            epoch=self.epoch, metrics=record)
        log.close()
        if self.dist.enabled:
            dist.barrier()
        last_val = self.history[-1]["val_miou"] if self.history else float("nan")
        return TrainResult(self.spec.name, self.run_dir, self.best_path, self.last_path, self.epoch, self.step,
                           last_val, self.best, self.history,
                           None if self.weights is None else self.weights.tolist(), self.weights_key)


def train(recipe: Recipe, spec: ModelSpec | str, run_dir: str | Path, seed: int | None = None,
          resume: bool = False, progress: bool = True, force_statistics: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train one model of ``recipe`` (by spec or name) into ``run_dir``."""
    if isinstance(spec, str):
        names = [m.name for m in recipe.models]
        if spec not in names:
            raise MtkitError(f"no model '{spec}' in the recipe; its models are {names}")
        spec = recipe.models[names.index(spec)]
    return Trainer(recipe, spec, run_dir, seed, progress, force_statistics).fit(resume=resume, overwrite=overwrite)
