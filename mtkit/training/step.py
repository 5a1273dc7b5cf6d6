"""One optimisation step of a recipe's model: the network, its losses, optimizer, loss scaler and precision, and
the step on a batch already loaded (augmentation on the device, forward, eq. 1 + eq. 4 with eq. 5's gradient
scaling, backward, update). No data sets and no files: ``mtkit.training.trainer.Trainer`` adds those and the
loop, and the benchmarks and tests drive ``train_step`` with batches of their own."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core.errors import MtkitError, TrainingDiverged
from ..core.precision import resolve_cuda_graphs, resolve_precision
from ..core.runtime import init_distributed, resolve_device
from ..core.schema import ModelSpec, Recipe
from ..data.augment import AugmentParams, augment_segmentation, augment_video
from ..models import MultiTaskNet
from ..ops.edge_consistency import edge_consistency_loss
from ..recipe.build import build_depth_loss, build_model, build_segmentation_loss

#: the devices with a fused Adam kernel (torch.optim.Adam(fused=True)); elsewhere (the meta stand-in) it is unfused
FUSED_ADAM_DEVICES = frozenset({"cuda", "cpu", "xpu", "mps", "hpu"})


class StepEngine:
    """The model of one spec of a recipe, built for its device and precision, and its training step."""

    def __init__(self, recipe: Recipe, spec: ModelSpec, seed: int | None = None) -> None:
        self.recipe = recipe
        self.spec = spec
        self.seed = recipe.seed if seed is None else seed
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
        # fused Adam: one kernel for all parameters, its step counts on the device (no read-back in a step); the
        # meta device of the tests' device stand-in has no fused kernel (FUSED_ADAM_DEVICES: the one seam)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=r.train.lr,
                                          fused=self.device.type in FUSED_ADAM_DEVICES)
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
        self.cuda_graphs, self.cuda_graphs_reason = resolve_cuda_graphs(r.train.cuda_graphs, self.device,
                                                                        self.dist.enabled)
        # the captured part: forward and losses (and with them, through AOT autograd, the backward); the optimizer's
        # fused step is one kernel and stays outside
        self.losses = torch.compile(self.forward_losses, mode="reduce-overhead") if self.cuda_graphs \
            else self.forward_losses

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
        if self.cuda_graphs:  # a new iteration of the captured graphs: the last step's outputs are replaced
            torch.compiler.cudagraph_mark_step_begin()
        total, terms = self.losses(seg, dep)
        # a non-finite loss must not reach the weights: fused Adam skips such a step on the device (GradScaler's
        # found_inf protocol), and the loop reports it at the next read-back
        if not self.scaler.is_enabled() and self.optimizer.defaults.get("fused"):
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
        # a graph replay reuses its output memory: the terms the loop keeps until its read-back are copies then
        return {k: v.detach().float().clone() if self.cuda_graphs else v.detach().float() for k, v in terms.items()}

    def forward_losses(self, seg: dict[str, torch.Tensor], dep: dict[str, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass and the loss of a step: eq. 1 (+ the plugin tasks' losses) and, multi-task, eq. 2-4
        with eq. 5's gradient scaling inside the network. What ``train.cuda_graphs`` captures."""
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
            if self.recipe.loss.edge_consistency:  # Klingner et al. (IROS 2022): predictions' edges where the image's
                seg_probs = torch.softmax(out["seg_logits"].float(), 1)
                terms["edge"] = (edge_consistency_loss(x, seg_probs).mean()
                                 + edge_consistency_loss(frames[:, 1], disp[0]).mean())
                total = total + self.recipe.loss.edge_consistency * terms["edge"]
        return total, terms

    def read_back(self, window: list[dict[str, torch.Tensor]], step: int, epoch: int, hint: str = ""
                  ) -> list[dict[str, float]]:
        """The loss terms of the steps since the last read-back (``window``, oldest first, the last of them step
        ``step`` of epoch ``epoch``, counted from 0) as floats, in one device-to-host transfer; under DDP their
        mean over the ranks (every rank reads back at the same steps). A non-finite term stops training on every
        rank with the first step it appeared at; ``hint`` ends that message (the last good checkpoint)."""
        if not window:
            return []
        names = list(window[0])
        values = torch.stack([torch.stack([w[n] for n in names]) for w in window])  # (steps, terms)
        if self.dist.enabled:  # the mean over ranks (the global batch); a NaN on any rank reaches every rank
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.dist.world
        rows = values.cpu().tolist()
        first = step - len(window) + 1
        for i, row in enumerate(rows):
            for name, value in zip(names, row):
                if not math.isfinite(value):
                    raise TrainingDiverged(f"loss term '{name}' is {value} at step {first + i} (epoch "
                                           f"{epoch + 1}); training stopped{hint}")
        return [dict(zip(names, row)) for row in rows]
