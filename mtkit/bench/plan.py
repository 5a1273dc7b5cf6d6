"""``mtkit run --plan``: the projected time of a recipe's stages on this machine, from a few measured steps of each
model's training and of each perturbation's sweep."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from ..core.precision import math_mode, resolve_precision
from ..core.progress import hms
from ..core.runtime import resolve_device
from ..evaluation.robustness import evaluation_sets
from ..evaluation.sweep import pass_size, robustness_sweep
from ..recipe.build import build_dataset, build_perturbations, build_segmentation_loss
from ..training.step import StepEngine


@dataclass
class PlanRow:
    """One stage of a run, of one model: what was measured (seconds per unit: a step, a batch, an image), how many
    units the recipe asks for, and the projected seconds."""

    model: str
    stage: str
    unit: str
    seconds_per_unit: float
    units: int
    #: the CUDA math policy the stage was measured under (``math_mode``'s record): the one its phase runs in
    math: dict = field(default_factory=dict)
    #: floating-point operations of one unit (``torch.utils.flop_counter``: matmuls and convolutions, forward and
    #: backward), the machine-independent measure of the stage's cost
    flops_per_unit: float = 0.0

    @property
    def seconds(self) -> float:
        return self.seconds_per_unit * self.units

    @property
    def flops(self) -> float:
        return self.flops_per_unit * self.units


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker, whose backward hooks ``torch.autograd.grad`` (the attacks'
    input gradients) cannot run through: every FLOP is counted under "Global", the total the plan reports."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def _timed(fn, repeats: int, device, policy: tuple[bool, bool]) -> tuple[float, dict, float]:
    """Seconds per call of ``fn`` on ``device`` under the math policy (tf32, deterministic) of the phase it stands
    for (``math_mode``), that policy, and the FLOPs of one call: one warm-up call (allocation, cudnn autotuning)
    counted by ``torch.utils.flop_counter.FlopCounterMode``, then the mean of ``repeats`` calls, each ended by a
    device synchronisation (``repeats`` 0: the count alone, 0 seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    with math_mode(*policy) as mode:
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
        with counter:
            fn()
        if not repeats:
            return 0.0, mode, float(counter.get_total_flops())
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t0) / repeats, mode, float(counter.get_total_flops())


def _architecture(module: torch.nn.Module) -> tuple:
    """What a sweep's cost depends on in a model: its class and every parameter's and buffer's name and shape
    (the models of a λ study share it, and one measured sweep stands for all of them)."""
    return (type(module).__qualname__, *((k, tuple(v.shape)) for k, v in module.state_dict().items()))


def plan(recipe, steps: int = 3, log=print, sweep_images: int | None = None,
         seeds_of: dict[str, int] | None = None) -> list[PlanRow]:
    """Project the run of ``recipe`` on this machine's device without running it: a few training steps of each
    model on batches of the recipe's shapes, one validation batch, one robustness batch of every perturbation at
    every ε (the recipe's options) on each evaluation set's image size, one depth batch; each multiplied by the
    counts the recipe implies (steps per epoch × epochs, batches or images per set, seeds). The data is not read:
    the batches are random, the set sizes come from the datasets' indexes.

    ``steps`` 0 counts the FLOPs alone (every row's seconds 0). ``sweep_images`` measures each sweep on a batch of
    that many images instead of the recipe's batch (its FLOPs grow with the images; its time per image is a
    little higher on fewer). A sweep is measured once per model architecture and set: the models of a λ study
    share one. ``seeds_of`` projects only some (model: number of seeds) units, as a run that resumes has left."""
    device = resolve_device(recipe.device)
    seeds_of = seeds_of if seeds_of is not None else {m.name: len(recipe.run_seeds()) for m in recipe.models}
    # each stage is timed under the math policy of its phase: training's (train.tf32, train.deterministic) and
    # the evaluation's (robustness.tf32; never deterministic), as the run would enter them
    training = (recipe.train.tf32, recipe.train.deterministic)
    evaluation = (recipe.robustness.tf32, False)
    rows: list[PlanRow] = []
    d, t, rob = recipe.data, recipe.train, recipe.robustness
    g = torch.Generator().manual_seed(0)
    n = recipe.model.num_classes

    sizes: dict[str, int] = {}

    def size_of(key: str, cfg) -> int:  # each dataset's index built once, whatever the number of models
        if key not in sizes:
            sizes[key] = len(build_dataset(cfg, where=key))
        return sizes[key]

    def images(b: int, cfg) -> torch.Tensor:
        return torch.rand(b, 3, cfg.height, cfg.width, generator=g) * 255

    seg_len = size_of("data.segmentation", d.segmentation)
    val_len = size_of("data.segmentation_val", d.segmentation_val)
    sweeps: dict[tuple, tuple[float, dict, float]] = {}
    for spec in recipe.models:
        seeds = seeds_of.get(spec.name, 0)
        if not seeds:
            continue
        log(f"[plan] measuring {spec.name} on {device}")
        tr = StepEngine(recipe, spec)
        tr.build(torch.ones(n))
        seg = {"image": images(tr.seg_batch, d.segmentation).to(device),
               "label": torch.randint(0, n, (tr.seg_batch, d.segmentation.height, d.segmentation.width),
                                      generator=g).to(device)}
        dep = None
        if tr.multitask:
            frames = torch.rand(tr.depth_batch, 3, 3, d.depth.height, d.depth.width, generator=g) * 255
            k = torch.eye(4).repeat(tr.depth_batch, 1, 1)
            k[:, 0, 0], k[:, 1, 1] = 0.58 * d.depth.width, 1.92 * d.depth.height
            k[:, 0, 2], k[:, 1, 2] = d.depth.width / 2, d.depth.height / 2
            dep = {"frames": frames.to(device), "frames_raw": frames.to(device), "K": k.to(device)}
        per_epoch = t.steps_per_epoch or max(1, seg_len // tr.seg_batch)
        step, mode, fl = _timed(lambda tr=tr, seg=seg, dep=dep: tr.train_step(seg, dep), steps, device, training)
        rows.append(PlanRow(spec.name, f"train {spec.name}", f"step ({tr.seg_batch} + {tr.depth_batch} images)", step,
                            per_epoch * t.epochs * seeds, mode, fl))
        segmenter = tr.model.segmenter().eval()
        vb = rob.batch_size if isinstance(rob.batch_size, int) else tr.seg_batch
        val = images(vb, d.segmentation_val).to(device)
        with torch.no_grad():  # validation runs inside training, under its policy
            v, mode, fl = _timed(lambda s=segmenter, x=val: s(x), steps, device, training)
        rows.append(PlanRow(spec.name, f"validate {spec.name}", f"batch of {vb}", v,
                            math.ceil(val_len / vb) * t.epochs * seeds, mode, fl))
        perts = build_perturbations(rob.perturbations, rob.options)
        loss = build_segmentation_loss(recipe.loss.segmentation, torch.ones(n))
        precision = resolve_precision(rob.amp, rob.channels_last, rob.compile, device, "robustness", rob.tf32)
        for key in evaluation_sets(recipe):
            cfg = d.eval[key]
            b = rob.batch_size if isinstance(rob.batch_size, int) else 8
            b = min(b, sweep_images) if sweep_images else b
            shape = (_architecture(segmenter), cfg.height, cfg.width, b)
            if shape not in sweeps:
                batch = [{"image": x, "label": y} for x, y in zip(
                    images(b, cfg), torch.randint(0, n, (b, cfg.height, cfg.width), generator=g))]
                # the pass size the run's sweep resolves once per set (a probing forward pass, left out of the count)
                passes = pass_size(segmenter, (3, cfg.height, cfg.width), torch.device(device)) \
                    if rob.pass_images == "auto" else rob.pass_images
                run_sweep = partial(robustness_sweep, segmenter, batch, perts, rob.epsilons, n, torch.ones(n), b, 0,
                                    device, loss=loss, precision=precision, pass_images=passes, sanity=rob.sanity)
                sweeps[shape] = _timed(run_sweep, min(steps, 1), device, evaluation)
            sweep, mode, fl = sweeps[shape]  # per image: a set's last batch may be short, its cost is not
            rows.append(PlanRow(spec.name, f"evaluate {spec.name} on {key}",
                                f"image (of a batch of {b}): clean, {len(perts)} perturbations × "
                                f"{len(rob.epsilons)} ε", sweep / b, size_of(f"data.eval.{key}", cfg) * seeds, mode,
                                fl / b))
        if tr.multitask:
            for key, cfg in d.depth_eval.items():
                x = images(recipe.depth_evaluation.batch_size, cfg).to(device)
                with torch.no_grad():
                    dt, mode, fl = _timed(lambda m=tr.model, x=x: m.predict_depth(x), steps, device, evaluation)
                rows.append(PlanRow(spec.name, f"evaluate depth {spec.name} on {key}",
                                    f"batch of {recipe.depth_evaluation.batch_size}", dt,
                                    math.ceil(size_of(f"data.depth_eval.{key}", cfg)
                                              / recipe.depth_evaluation.batch_size) * seeds, mode, fl))
        del tr
    return rows


def projection(recipe, seeds_of: dict[str, int] | None = None) -> str:
    """The line ``mtkit run`` prints before its first stage: the projected time and FLOPs of the stages still to
    run (``seeds_of``: model → seeds not yet done), from one measured step of each model's training and one
    two-image sweep per evaluation set and architecture (seconds, where ``--plan`` takes minutes), and what the
    projection took. Measured on the quickstart (2 AVX-512 cores): 3 min 26 s projected in 12 s, its stages ran
    3 min 27 s and 3 min 44 s; one-image sweeps over-projected by 10 % more, their time per image being higher."""
    t0 = time.perf_counter()
    rows = plan(recipe, steps=1, log=lambda *_: None, sweep_images=2, seeds_of=seeds_of)
    total, flops = sum(r.seconds for r in rows), sum(r.flops for r in rows)
    return (f"[plan] projected: {hms(total)} in one process for {flops / 1e12:.3g} TFLOP on "
            f"{resolve_device(recipe.device)} (one training step and a two-image sweep measured, "
            f"{time.perf_counter() - t0:.0f} s; `mtkit run --plan` measures more)")
