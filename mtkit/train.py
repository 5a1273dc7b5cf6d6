"""Training engine: single-task (segmentation) and multi-task (segmentation + self-supervised depth) models.

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
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .build import build_depth_loss, build_model, build_segmentation_loss
from .config import ModelSpec, Recipe, config_hash
from .data.augment import AugmentParams, augment_segmentation, augment_video, draw_params
from .data.cache import CachedSegmentation, CachedVideo, training_keys
from .data.stats import build_class_weights
from .errors import CheckpointError, MtkitError, TrainingDiverged
from .io import run_lock
from .metrics import confusion_on, miou
from .metrics_log import MetricsLog, truncate_log
from .models import MultiTaskNet
from .plugins import get_plugins
from .prepare import default_workers, prepared_dataset
from .progress import progress_bar
from .runtime import (
    init_distributed,
    math_mode,
    resolve_device,
    resolve_pin_memory,
    resolve_precision,
    seed_everything,
)
from .sampling import EpochLoader, epoch_batches


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


class Trainer:
    """Trains one model spec of a recipe into ``run_dir`` (best.pt, last.pt, metrics.jsonl)."""

    def __init__(self, recipe: Recipe, spec: ModelSpec, run_dir: str | Path, seed: int | None = None,
                 progress: bool = True, force_statistics: bool = False) -> None:
        self.recipe = recipe
        self.force_statistics = force_statistics
        self.weights_key: str | None = None
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.seed = recipe.seed if seed is None else seed
        self.show_progress = progress
        self.device = resolve_device(recipe.device)
        self.dist = init_distributed(self.device)
        self.multitask = "depth" in spec.tasks
        t = recipe.train
        self.seg_batch = t.seg_batch_size if self.multitask else t.batch_size
        self.depth_batch = t.depth_batch_size if self.multitask else 0
        for name, b in (("segmentation", self.seg_batch), ("depth", self.depth_batch)):
            if b % self.dist.world:
                raise MtkitError(f"the {name} batch ({b}) must divide evenly over {self.dist.world} processes")
        self.precision = resolve_precision(t.amp, t.channels_last, t.compile, self.device, tf32=t.tf32)

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

    def build(self, class_weights: torch.Tensor | None) -> None:
        """Model, losses, optimizer and schedule (no data: benchmarks drive ``train_step`` with their own batches)."""
        r = self.recipe
        self.weights = class_weights
        torch.manual_seed(self.seed)  # identical initial weights on every rank and for every data set-up
        self.model: MultiTaskNet = build_model(r.model, self.spec.tasks, self.spec.lam, r.loss.num_scales,
                                              self.spec.task_scales)
        self.model.to(self.device)
        if self.precision.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.depth_loss = build_depth_loss(r) if self.multitask else None
        self.seg_loss = build_segmentation_loss(r.loss.segmentation, self.weights).to(self.device)
        # fused Adam: one kernel for all parameters, its step counts on the device (no read-back in a step)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=r.train.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, r.train.lr_drop_epochs,
                                                              r.train.lr_drop_factor)
        # fp16 needs loss scaling (bf16 has fp32's range); the scaler's state is part of last.pt
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.dtype == torch.float16)
        self.net: torch.nn.Module = self.model
        if self.dist.enabled:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if
                                               self.device.type == "cuda" else None)
        if self.precision.compile:
            self.net = torch.compile(self.net, backend=self.precision.compile)
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.best = -math.inf
        self.history: list[dict[str, Any]] = []

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

    def augment(self, seg: dict[str, torch.Tensor], dep: dict[str, torch.Tensor] | None, seg_p: AugmentParams,
                dep_p: AugmentParams | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """A loaded uint8 batch moved to the device and augmented there (flip and colour jitter per sample)."""
        dev = self.device
        out = augment_segmentation(seg["image"].to(dev, non_blocking=True), seg["label"].to(dev, non_blocking=True),
                                   seg_p)
        if dep is None or dep_p is None:
            return out, None
        return out, augment_video(dep["frames"].to(dev, non_blocking=True), dep["K"].to(dev, non_blocking=True),
                                  dep_p)

    # ----------------------------------------------------------------------------------------- one step
    def train_step(self, seg: dict[str, torch.Tensor], dep: dict[str, torch.Tensor] | None
                   ) -> dict[str, torch.Tensor]:
        """One optimisation step on a segmentation batch and (multi-task) a video batch. Returns the loss terms as
        detached fp32 scalars on the device: nothing in a step reads a value back to the host (the labels are
        checked once at set-up, ``data.stats.check_labels``; the loop reads the terms and checks them for NaN at
        log steps, ``read_back``), so a GPU never waits for the host between steps."""
        dev = self.device
        x = seg["image"].to(dev, non_blocking=True)
        y = seg["label"].to(dev, non_blocking=True)
        frames = None if dep is None else dep["frames"].to(dev, non_blocking=True)
        with self.precision.autocast():
            out = self.net(self.precision.input(x), frames)
        terms: dict[str, torch.Tensor] = {"seg": self.seg_loss(out["seg_logits"].float(), y)}
        total = terms["seg"]
        for name, task in self.model.aux_tasks.items():  # plugin tasks, on the segmentation batch's images
            terms[name] = task.loss(out["aux"][name].float(), x)
            total = total + terms[name]
        if dep is not None:
            raw = dep["frames_raw"].to(dev, non_blocking=True)
            disp = {s: v.float() for s, v in out["disp"].items()}
            poses = {k: v.float() for k, v in out["poses"].items()}
            d = self.depth_loss(disp, [raw[:, 0], raw[:, 1], raw[:, 2]], dep["K"].to(dev, non_blocking=True), poses)
            terms.update(depth=d.total, photometric=d.photometric, smoothness=d.smoothness)
            # eq. 5: each decoder sees its own unscaled loss, the encoder (1-λ)·g_depth + λ·g_seg
            total = total + d.total
        if not self.scaler.is_enabled():  # a non-finite loss must not reach the weights: fused Adam skips such a
            # step on the device (GradScaler's found_inf protocol), and the loop reports it at the next read-back
            found_inf = (~torch.isfinite(total.detach())).float()
            if self.dist.enabled:  # every rank skips alike (the gradients are all-reduced: a NaN reaches all)
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            self.optimizer.found_inf = found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.recipe.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip)
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
        self.scaler.update()
        return {k: v.detach().float() for k, v in terms.items()}

    def read_back(self, window: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
        """The loss terms of the steps since the last read-back (``window``, oldest first) as floats, in one
        device-to-host transfer; under DDP their mean over the ranks (every rank reads back at the same steps).
        A non-finite term stops training on every rank with the first step it appeared at."""
        if not window:
            return []
        names = list(window[0])
        values = torch.stack([torch.stack([w[n] for n in names]) for w in window])  # (steps, terms)
        if self.dist.enabled:  # the mean over ranks (the global batch); a NaN on any rank reaches every rank
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.dist.world
        rows = values.cpu().tolist()
        first = self.step - len(window) + 1
        for i, row in enumerate(rows):
            for name, value in zip(names, row):
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss term '{name}' is {value} at step {first + i} (epoch {self.epoch + 1}); training "
                        f"stopped, the last good checkpoint is kept at {self.last_path}"
                        + ("" if self.last_path.is_file() else " (none written yet)"))
        return [dict(zip(names, row)) for row in rows]

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
