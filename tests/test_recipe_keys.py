"""Every recipe key is live: for each key of the schema, two values give two different behaviours, observed where
mtkit uses the key (a model, a dataset, the trainer, a loss, an evaluation). A schema key without a probe here
fails ``test_every_schema_key_has_a_probe``, so a new key must come with its proof."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from pydantic import BaseModel
from support import multitask_batch, tiny_recipe

from mtkit.core.runtime import resolve_device
from mtkit.core.schema import DatasetConfig, ModelSpec, Recipe
from mtkit.data.augment import draw_params
from mtkit.data.stats import build_class_weights
from mtkit.evaluation.depth import evaluate_depth_model
from mtkit.evaluation.detection import detection_datasets
from mtkit.evaluation.robustness import evaluation_sets
from mtkit.pipeline.runner import new_results, run_folder
from mtkit.pipeline.stages import detection_units
from mtkit.recipe import build
from mtkit.recipe.load import model_in, validate
from mtkit.report import write_report
from mtkit.training.step import StepEngine
from mtkit.training.trainer import Trainer, train

X = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 255
PROBE_PROVIDER = "recipe-key-probes"


def _recipe(**over: Any) -> Recipe:
    return validate(tiny_recipe(**over))


def _model(r: Recipe, seed: int = 0, tasks=("segmentation", "depth")):
    torch.manual_seed(seed)
    spec = next(m for m in r.models if m.tasks == list(tasks)) if any(m.tasks == list(tasks) for m in r.models) \
        else r.models[0]
    return build.build_model(r.model, spec.tasks, spec.lam, r.loss.num_scales, spec.task_scales).eval()


def _seg_out(r: Recipe) -> torch.Tensor:
    with torch.no_grad():
        return _model(r).segmenter()(X)


def _depth_out(r: Recipe) -> torch.Tensor:
    with torch.no_grad():
        return _model(r).predict_depth(X)


def _trainer(r: Recipe, tmp: Path, name: str = "multi", setup: bool = False) -> Trainer | StepEngine:
    """A trainer set up on its data (``setup``), or the step engine of the model built without data."""
    spec = next(m for m in r.models if m.name == name)
    if setup:
        tr = Trainer(r, spec, tmp, progress=False)
        tr._setup()
        return tr
    engine = StepEngine(r, spec)
    engine.build(None)
    return engine


def _dataset(r: Recipe, key: str):
    node: Any = r.data
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return build.build_dataset(node)


def _fit(r: Recipe, tmp: Path, name: str = "single"):
    return train(r, name, tmp, progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _depth_loss_value(r: Recipe) -> float:
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 32, 64
    disps = {s: torch.rand(b, 1, h // 2**s, w // 2**s, generator=g) + 0.1 for s in range(4)}
    frames = [torch.rand(b, 3, h, w, generator=g) * 255 for _ in range(3)]
    k = torch.eye(4).repeat(b, 1, 1)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = 0.58 * w, 1.92 * h, w / 2, h / 2
    pose = torch.eye(4).repeat(b, 1, 1)
    pose[:, 2, 3] = 0.3
    return float(build.build_depth_loss(r)(disps, frames, k, {-1: pose, 1: pose}).total)


class _Depth(torch.nn.Module):
    def predict_depth(self, images):
        ramp = torch.linspace(2.0, 60.0, images.shape[-1])
        return ramp.expand(images.shape[0], 1, *images.shape[-2:]).clone()


class _DepthSet(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        gt = torch.linspace(3.0, 90.0, 64).expand(32, 64).clone()
        return {"image": torch.zeros(3, 32, 64), "depth": gt}


def _batch_sizes(module: str, monkeypatch) -> list:
    """The batch sizes of the DataLoaders that ``module`` creates from now on."""
    sizes = []
    real = torch.utils.data.DataLoader

    def spy(*a, **k):
        sizes.append(k.get("batch_size") or len(k["batch_sampler"][0]))
        return real(*a, **k)

    monkeypatch.setattr(f"{module}.DataLoader", spy)
    return sizes


def _eval_passes(r: Recipe, trained, monkeypatch) -> Any:
    """How many forward passes of an evaluation had each (logits dtype, images, channels_last input), and the
    torch.compile calls (recorded, not compiled: tests/test_scale.py compiles)."""
    from mtkit.evaluation.robustness import evaluate_checkpoint

    seen, compiled = [], []
    monkeypatch.setattr("torch.compile", lambda m, **k: compiled.append(k) or m)  # recorded, not compiled
    seg = trained[0].segmenter
    hook = seg.register_forward_hook(lambda m, i, o: seen.append(
        (str(o.dtype), i[0].shape[0], i[0].is_contiguous(memory_format=torch.channels_last))))
    try:
        evaluate_checkpoint(trained[0], r, ["CS"], 0)
    finally:
        hook.remove()
        seg.to(memory_format=torch.contiguous_format)
    return sorted(Counter(seen).items()), list(compiled)


def _depth_eval(r: Recipe, monkeypatch) -> Any:
    sizes = _batch_sizes("mtkit.evaluation.depth", monkeypatch)
    res = evaluate_depth_model(_Depth(), _DepthSet(), r.depth_evaluation)
    return res.metrics, res.scale_median, sizes


def _robustness_rows(r: Recipe, trained, monkeypatch) -> Any:
    from mtkit.evaluation.robustness import evaluate_checkpoint

    sizes = _batch_sizes("mtkit.evaluation.sweep", monkeypatch)
    loaded = trained[0]
    out = evaluate_checkpoint(loaded, r, ["CS"], 0)
    return [(x.perturbation, x.level, round(x.miou, 6)) for x in out.robustness], sizes


def _masking(r: Recipe) -> list:
    """The gradient-masking checks of a made-up sweep whose FGSM mIoU rises by 5 points from ε 1 to 2 and whose
    unbounded attack leaves 50 %, under the recipe's thresholds."""
    from mtkit.core.results import CleanRow, ResultRow
    from mtkit.evaluation.masking import masking_checks
    from mtkit.evaluation.sweep import Sweep

    def row(name: str, eps: float, value: float) -> ResultRow:
        return ResultRow(model="m", seed=0, dataset="CS", perturbation=name, level=eps, epsilon=eps,
                         epsilon_measured=eps, miou=value, miou_clean=0.6, q=value / 0.6, attack=True)

    sweep = Sweep(CleanRow(model="m", seed=0, dataset="CS", miou=0.6), [row("fgsm", 1, 0.40), row("fgsm", 2, 0.45)],
                  4, row("unbounded", 255, 0.5))
    return [(c.check, c.passed) for c in masking_checks(sweep, r.robustness.sanity)]


def _attack_passes(r: Recipe, trained) -> list:
    """Each row's backward passes per batch: what an attack option (an iteration count) changes on any CPU, where
    the mIoU of 4 images may not."""
    from mtkit.evaluation.robustness import evaluate_checkpoint

    return [(x.perturbation, x.level, x.backward_passes_per_batch)
            for x in evaluate_checkpoint(trained[0], r, ["CS"], 0).robustness]


def _figures(r: Recipe, c) -> list[str]:
    """The PNG files the report of an evaluation under ``r`` draws (its ``epsilon_axis``)."""
    from mtkit.core.results import RunResults
    from mtkit.evaluation.robustness import evaluate_checkpoint

    res = RunResults(seeds=[0], epsilon_axis=r.robustness.epsilon_axis)
    res.extend(evaluate_checkpoint(c.trained[0], r, ["CS"], 0))
    return sorted(p.name for p in write_report(res, c.tmp / "report").values() if p.suffix == ".png")


def _cityscapes_eval(r: Recipe, c, folder: bool = False) -> tuple[float, list[str]]:
    """The clean mIoU of an evaluation of ``r`` on a Cityscapes tree at 64x128 (evaluated at the recipe's 32x64)
    and the prediction files it wrote (relative to the predictions folder; ``folder``: one under ``c.tmp``)."""
    from mtkit.data import layouts, synthetic
    from mtkit.evaluation.robustness import evaluate_checkpoint
    from mtkit.recipe.load import apply_overrides

    root = c.tmp / "cityscapes"
    city = synthetic.generate(synthetic.SyntheticSpec("city", sequences=1, frames=2, height=64, width=128, seed=5))
    layouts.write_cityscapes(root, city, "val")
    cs = {"name": "cityscapes", "root": str(root), "split": "val", "height": 32, "width": 64}
    over = [f"data.eval.CS={json.dumps(cs)}"]
    if folder:
        over.append(f"robustness.predictions.folder={json.dumps(str(c.tmp / 'pred'))}")
    r = validate(apply_overrides(r.to_dict(), over))
    res = evaluate_checkpoint(c.trained[0], r, ["CS"], 0)
    out = Path(r.robustness.predictions.folder or c.tmp / "none")
    return res.clean[0].miou, sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def _figure1_calls(r: Recipe, c) -> list:
    """The images ``mtkit run``'s Figure 1 panel is drawn for under ``r`` (models and drawing stood in for)."""
    from types import SimpleNamespace

    import mtkit.pipeline.runner as runner
    from mtkit.pipeline.stages import UnitFiles

    for spec in r.models:
        folder = UnitFiles.of(r, c.tmp / "run", spec, 0).train_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "last.pt").touch()
    calls: list = []
    c.mp.setattr(runner, "load_model", lambda path, device: SimpleNamespace(segmenter=None, model=None,
                                                                            class_weights=None))
    c.mp.setattr(runner, "eval_dataset", lambda *a, **k: [None] * 4)
    c.mp.setattr(runner, "qualitative_panel", lambda *a: calls.append(a[7]) or a[5])
    runner.figure1_panel(r, c.tmp / "run", 0, SimpleNamespace(opened=lambda: {}), "cpu")
    return calls


def _math_modes(r: Recipe, c, where: str) -> list[tuple[bool, bool]]:
    """The (tf32, deterministic) policies ``math_mode`` is entered with while training (``where`` "train") or
    evaluating ("evaluate") under recipe ``r``."""
    import mtkit.core.precision

    seen = []
    real = mtkit.core.precision.math_mode
    module = {"train": "mtkit.training.trainer", "evaluate": "mtkit.evaluation.robustness"}[where]
    c.mp.setattr(f"{module}.math_mode", lambda tf32, deterministic=False: seen.append((tf32, deterministic))
                 or real(tf32, deterministic))
    if where == "train":
        _fit(r, c.tmp)
    else:
        _robustness_rows(r, c.trained, c.mp)
    return seen


def _weights_file(tmp: Path, name: str = "resnet18") -> str:
    torch.manual_seed(1)
    path = tmp / f"{name}.pth"
    torch.save(timm.create_model(name).state_dict(), path)
    return str(path)


# key → (value a, value b, probe(recipe, ctx) → observable). ``ctx`` gives tmp_path, monkeypatch, trained.
PROBES: dict[str, tuple[Any, Any, Callable[..., Any]]] = {
    "name": ("a", "b", lambda r, c: run_folder(r)),
    "description": ("one", "two", lambda r, c: write_report(new_results(r, [0], "cpu"), c.tmp / r.description)[
        "report"].read_text().splitlines()[2]),
    "seed": (0, 1, lambda r, c: next(_trainer(r, c.tmp).model.seg_head.parameters()).sum()),
    "seeds": ([0], [0, 1], lambda r, c: r.run_seeds()),
    "output_dir": ("runs", "elsewhere", lambda r, c: run_folder(r)),
    "device": ("cpu", "cuda", lambda r, c: _outcome(lambda: resolve_device(r.device))),
    "model.backbone": ("resnet18", "resnet10t", lambda r, c: _seg_out(r)),
    "model.pretrained": (False, "FILE", lambda r, c: _model(r).encoder.body.conv1.weight.sum()),
    "model.backbone_kwargs": ({}, {"output_stride": 16}, lambda r, c: _model(r).encoder(X)[-1].shape),
    "model.head": ("monodepth2", "fpn", lambda r, c: type(_model(r).seg_head).__name__),
    "model.depth_head": ("monodepth2_depth", "probe_depth_head", lambda r, c: type(_model(r).depth_head).__name__),
    "model.num_classes": (19, 7, lambda r, c: _seg_out(r).shape[1]),
    "model.min_depth": (0.1, 1.0, lambda r, c: _depth_out(r).min()),
    "model.max_depth": (100.0, 20.0, lambda r, c: _depth_out(r).max()),
    "model.pose_backbone": ("resnet18", "resnet10t", lambda r, c: _model(r).pose_net.encoder.name),
    "model.pose_pretrained": (False, "FILE", lambda r, c: _model(r).pose_net.encoder.body.conv1.weight.sum()),
    "model.mean": ([123.675, 116.28, 103.53], [0.0, 0.0, 0.0], lambda r, c: _seg_out(r)),
    "model.std": ([58.395, 57.12, 57.375], [1.0, 1.0, 1.0], lambda r, c: _seg_out(r)),
    "data.segmentation": (None, "limit", lambda r, c: len(_trainer(r, c.tmp, setup=True).seg_train)),
    "data.segmentation_val": (None, "limit", lambda r, c: len(_trainer(r, c.tmp, setup=True).seg_val)),
    "data.depth": (None, "limit", lambda r, c: len(_trainer(r, c.tmp, setup=True).depth_train)),
    "data.eval": (None, "limit", lambda r, c: len(_dataset(r, "eval.CS"))),
    "data.depth_eval": (None, "limit", lambda r, c: len(_dataset(r, "depth_eval.Eigen"))),
    "data.num_workers": (0, 1, lambda r, c: _loader_kwargs(r, c, "num_workers")),
    "data.pin_memory": ("auto", True, lambda r, c: _loader_kwargs(r, c, "pin_memory")),
    "data.persistent_workers": (True, False, lambda r, c: _loader_kwargs(r, c, "persistent_workers", 1)),
    "DatasetConfig.name": ("synthetic", "synthetic_depth", lambda r, c: sorted(_dataset(r, "eval.K")[0])),
    "DatasetConfig.root": (None, "ROOT", lambda r, c: _dataset(r, "eval.K") and sorted(
        p.name.split("-")[0] for p in c.tmp.glob("root/*.npz"))),
    "DatasetConfig.split": ("test", "val", lambda r, c: _dataset(r, "eval.K")[0]["image"].sum()),
    "DatasetConfig.height": (32, 64, lambda r, c: _dataset(r, "eval.K")[0]["image"].shape),
    "DatasetConfig.width": (64, 96, lambda r, c: _dataset(r, "eval.K")[0]["image"].shape),
    "DatasetConfig.limit": (4, 2, lambda r, c: len(_dataset(r, "eval.K"))),
    "DatasetConfig.options": ({"domain": "drive"}, {"domain": "city"},
                              lambda r, c: _dataset(r, "eval.K")[0]["image"].sum()),
    "data.augment.hflip": (True, False, lambda r, c: _augment(r, "flip")),
    "data.augment.brightness": (0.2, 0.0, lambda r, c: _augment(r, "b")),
    "data.augment.contrast": (0.2, 0.0, lambda r, c: _augment(r, "c")),
    "data.augment.saturation": (0.2, 0.0, lambda r, c: _augment(r, "s")),
    "data.augment.hue": (0.1, 0.0, lambda r, c: _augment(r, "h")),
    "loss.segmentation": ("weighted_ce", "cross_entropy", lambda r, c: _seg_loss(r)),
    "loss.depth": ("monodepth", "probe_depth_loss", lambda r, c: _depth_loss_value(r)),
    "loss.class_weights": ("enet", "none", lambda r, c: build_class_weights(r, _dataset(r, "segmentation"))[1]),
    "loss.ssim_alpha": (0.85, 0.5, lambda r, c: _depth_loss_value(r)),
    "loss.smoothness": (1e-3, 1.0, lambda r, c: _depth_loss_value(r)),
    "loss.num_scales": (4, 1, lambda r, c: (_depth_loss_value(r), len(_model(r).depth_head(
        _model(r).encoder(X), (32, 64))))),
    "loss.automask": (False, True, lambda r, c: _depth_loss_value(r)),
    "train.epochs": (1, 2, lambda r, c: _fit(r, c.tmp).steps),
    "train.lr": (1e-4, 1e-3, lambda r, c: _trainer(r, c.tmp).optimizer.param_groups[0]["lr"]),
    "train.lr_drop_epochs": ([30], [1], lambda r, c: _lr_after_one_epoch(r, c)),
    "train.lr_drop_factor": (0.1, 0.5, lambda r, c: _lr_after_one_epoch(r, c)),
    "train.batch_size": (4, 2, lambda r, c: _trainer(r, c.tmp, "single").seg_batch),
    "train.seg_batch_size": (2, 4, lambda r, c: _trainer(r, c.tmp).seg_batch),
    "train.depth_batch_size": (2, 4, lambda r, c: _trainer(r, c.tmp).depth_batch),
    "train.steps_per_epoch": (2, 3, lambda r, c: _trainer(r, c.tmp, setup=True).steps_per_epoch),
    "train.amp": ("off", "bf16", lambda r, c: str(_trainer(r, c.tmp).precision.dtype)),
    "train.channels_last": (False, True, lambda r, c: _trainer(r, c.tmp).precision.channels_last),
    "train.compile": (False, True, lambda r, c: type(_trainer(r, c.tmp).net).__name__),
    "train.cuda_graphs": (False, "auto", lambda r, c: _trainer(r, c.tmp).cuda_graphs_reason),
    "train.tf32": (True, False, lambda r, c: (_trainer(r, c.tmp).precision.tf32, _math_modes(r, c, "train"))),
    "train.deterministic": (False, True, lambda r, c: _math_modes(r, c, "train")),
    "train.grad_clip": (None, 1e-6, lambda r, c: _one_step_update(r, c)),
    "train.log_every": (1, 2, lambda r, c: len(_jsonl(_fit(r, c.tmp).run_dir / "metrics.jsonl"))),
    "train.tensorboard": (False, True, lambda r, c: (_fit(r, c.tmp).run_dir / "tensorboard").is_dir()),
    "train.checkpoint_every": (0, 1, lambda r, c: _saves(r, c)),
    "models": (None, "lambda", lambda r, c: _model(r).lam),
    "ModelSpec.name": ("multi", "other", lambda r, c: [m.name for m in r.models]),
    "ModelSpec.tasks": (["segmentation", "depth"], ["segmentation"],
                        lambda r, c: _model(r, tasks=r.models[1].tasks).depth_head is None),
    "ModelSpec.lambda": (0.1, 0.5, lambda r, c: _model(r).lam),
    "ModelSpec.task_scales": ({}, {"edges": 0.3}, lambda r, c: _model(r, tasks=r.models[1].tasks).aux_scales),
    "robustness.perturbations": (["fgsm"], ["gaussian"], lambda r, c: _robustness_rows(r, c.trained, c.mp)[0]),
    "robustness.epsilons": ([1.0], [2.0], lambda r, c: _robustness_rows(r, c.trained, c.mp)[0]),
    "robustness.batch_size": (4, 2, lambda r, c: _robustness_rows(r, c.trained, c.mp)[1]),
    "robustness.datasets": (None, ["K"], lambda r, c: evaluation_sets(r)),
    "robustness.pass_images": (1, 4, lambda r, c: _eval_passes(r, c.trained, c.mp)),
    "robustness.amp": ("off", "bf16", lambda r, c: _eval_passes(r, c.trained, c.mp)),
    "robustness.channels_last": (False, True, lambda r, c: _eval_passes(r, c.trained, c.mp)),
    "robustness.compile": (False, "aot_eager", lambda r, c: _eval_passes(r, c.trained, c.mp)[1]),
    "robustness.tf32": (False, True, lambda r, c: _math_modes(r, c, "evaluate")),
    "robustness.options": ({}, {"pgd": {"iterations": 1}}, lambda r, c: _attack_passes(r, c.trained)),
    "robustness.epsilon_axis": ("requested", "both", _figures),
    "robustness.label_resolution": ("recipe", "original", lambda r, c: _cityscapes_eval(r, c)[0]),
    "robustness.predictions.folder": (None, "PRED", lambda r, c: _cityscapes_eval(r, c)[1]),
    "robustness.predictions.conditions": (["clean"], ["clean", "fgsm@1"],
                                          lambda r, c: _cityscapes_eval(r, c, folder=True)[1]),
    "robustness.predictions.formats": (["labelIds"], ["color"], lambda r, c: _cityscapes_eval(r, c, folder=True)[1]),
    "robustness.qualitative_images": (0, 1, _figure1_calls),
    "robustness.sanity.enabled": (True, False, lambda r, c: _eval_passes(r, c.trained, c.mp)),
    "robustness.sanity.iterations": (3, 1, lambda r, c: _eval_passes(r, c.trained, c.mp)),
    "robustness.sanity.tolerance": (1.0, 10.0, lambda r, c: _masking(r)),
    "robustness.sanity.near_zero": (5.0, 60.0, lambda r, c: _masking(r)),
    "depth_evaluation.min_depth": (1e-3, 10.0, lambda r, c: _depth_eval(r, c.mp)[0]),
    "depth_evaluation.max_depth": (80.0, 40.0, lambda r, c: _depth_eval(r, c.mp)[0]),
    "depth_evaluation.garg_crop": (True, False, lambda r, c: _depth_eval(r, c.mp)[0]),
    "depth_evaluation.median_scaling": (True, False, lambda r, c: _depth_eval(r, c.mp)[1]),
    "depth_evaluation.batch_size": (8, 2, lambda r, c: _depth_eval(r, c.mp)[2]),
    "loss.edge_consistency": (0.0, 1.0, lambda r, c: _multitask_step_terms(r, c)),
    "detection.enabled": (False, True, lambda r, c: detection_units(r, r.models[1])),
    "detection.detector": ("edge_consistency", "probe_detector", lambda r, c: _detection(r, c)[0]),
    "detection.options": ({}, {"measures": ["image-depth"]}, lambda r, c: _detection(r, c)[0]),
    "detection.fpr": (0.4, 0.5, lambda r, c: _detection(r, c)[0]),
    "detection.perturbations": (["fgsm"], ["gaussian"], lambda r, c: _detection(r, c)[1]),
    "detection.epsilons": ([1.0], [2.0], lambda r, c: _detection(r, c)[1]),
    "detection.datasets": (None, ["K"], lambda r, c: detection_datasets(r)),
    "detection.batch_size": (8, 2, lambda r, c: _detection(r, c)[2]),
    "launcher.kind": ("local", "slurm", lambda r, c: _launcher_refusal(r)),
    "launcher.slurm_partition": (None, "gpu", lambda r, c: _sbatch(r, c)),
    "launcher.slurm_account": (None, "lab", lambda r, c: _sbatch(r, c)),
    "launcher.slurm_gpus_per_job": (1, 2, lambda r, c: _sbatch(r, c)),
    "launcher.slurm_cpus_per_job": (8, 4, lambda r, c: _sbatch(r, c)),
    "launcher.slurm_mem_gb": (None, 16, lambda r, c: _sbatch(r, c)),
    "launcher.slurm_time": (1440, "0-02:00:00", lambda r, c: _sbatch(r, c)),
    "launcher.slurm_extra": ({}, {"constraint": "a100"}, lambda r, c: _sbatch(r, c)),
    "launcher.slurm_setup": ([], ["module load cuda"], lambda r, c: _sbatch(r, c)),
}


def _multitask_step_terms(r: Recipe, c) -> dict[str, float]:
    """The loss terms of one multi-task step on a fixed random batch."""
    tr = _trainer(r, c.tmp)
    terms = tr.train_step(*multitask_batch())
    return {name: round(float(v), 6) for name, v in terms.items()}


def _detection(r: Recipe, c) -> tuple[list, list, list]:
    """The detection rows of an untrained multi-task model on the test's sets: (threshold, target rate) of the
    first, (perturbation, ε) of each, and the batch sizes the detector measured."""
    from mtkit.evaluation.detection import evaluate_detection
    from mtkit.evaluation.robustness import LoadedModel
    from mtkit.ops.edge_consistency import EdgeConsistency

    if r.detection.fpr == 0.05:  # the test's set fits on 2 images: a 5 % rate needs 19 (the conformal rank)
        r = r.model_copy(update={"detection": r.detection.model_copy(update={"fpr": 0.4})})
    model = _model(r)
    loaded = LoadedModel(model.segmenter().eval(), None, r.models[1], r, {}, model)
    sizes = []
    real = EdgeConsistency.measures
    c.mp.setattr(EdgeConsistency, "measures", lambda self, m, x: sizes.append(x.shape[0]) or real(self, m, x))
    rows = evaluate_detection(loaded, r, ["CS"], 0)
    return ([round(rows[0].threshold, 6), rows[0].fpr_target], [(row.perturbation, row.epsilon) for row in rows],
            sizes)



def _launcher_refusal(r: Recipe) -> str:
    """What ``mtkit run --detach`` says before any work: local refuses --detach, slurm asks for SLURM's commands."""
    from mtkit.pipeline.jobs import check_launcher

    try:
        check_launcher(r.launcher, detach=True)
    except Exception as exc:  # the observable behaviour is the message
        return str(exc).split(":")[0]
    return "accepted"


def _sbatch(r: Recipe, c) -> str:
    """The sbatch script submitit writes for the recipe's launcher (a stand-in srun on PATH: submitit looks for
    it before it makes an executor)."""
    import os

    from mtkit.pipeline.jobs import slurm_executor

    bin_dir = c.tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{path}"
    try:
        return slurm_executor(r.launcher, c.tmp / "jobs", r.name, 1)._make_submission_file_text("mtkit", "uid")
    finally:
        os.environ["PATH"] = path


def _outcome(fn: Callable[[], Any]) -> str:
    try:
        return str(fn())
    except Exception as exc:  # the observable behaviour is the error
        return type(exc).__name__


def _loader_kwargs(r: Recipe, c, name: str, workers: int | None = None) -> list:
    """What the training loaders were built with (``workers``: with this many loader processes)."""
    if workers is not None:
        r.data.num_workers = workers
    seen = []
    real = torch.utils.data.DataLoader
    c.mp.setattr("mtkit.data.sampling.DataLoader", lambda *a, **k: seen.append(k[name]) or real(*a, **k))
    _fit(r, c.tmp)
    return seen


def _augment(r: Recipe, key: str) -> list:
    p = draw_params(r.data.augment, 8, torch.Generator().manual_seed(0))
    values = p.flip if key == "flip" else p.factors["bcsh".index(key)]
    return None if values is None else values.tolist()


def _seg_loss(r: Recipe) -> float:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 19, 8, 8), torch.randint(0, 19, (2, 8, 8))
    weights = torch.linspace(0.5, 3.0, 19)
    return float(build.build_segmentation_loss(r.loss.segmentation, weights)(logits, labels))


def _lr_after_one_epoch(r: Recipe, c) -> float:
    return _trainer_after_fit(r, c).engine.optimizer.param_groups[0]["lr"]


def _trainer_after_fit(r: Recipe, c) -> Trainer:
    tr = Trainer(r, r.models[0], c.tmp, progress=False)
    tr.fit()
    return tr


def _one_step_update(r: Recipe, c) -> float:
    tr = _trainer(r, c.tmp, "single")
    before = next(tr.model.seg_head.parameters()).detach().clone()
    g = torch.Generator().manual_seed(0)
    seg = {"image": torch.rand(2, 3, 32, 64, generator=g) * 255,
           "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    tr.train_step(seg, None)
    return float((next(tr.model.seg_head.parameters()).detach() - before).abs().sum())


def _saves(r: Recipe, c) -> int:
    calls = []
    real = Trainer.save
    c.mp.setattr(Trainer, "save", lambda self, path, resumable=True: calls.append(path) or real(self, path, resumable))
    _fit(r, c.tmp)
    return len(calls)


def _schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if name == "source":
            continue
        key = f"{prefix}{field.alias or name}"
        keys.append(key)
        inner = model_in(field.annotation)
        if inner is not None and inner.__name__ not in ("DatasetConfig", "ModelSpec"):
            keys += _schema_keys(inner, key + ".")
    return keys


def test_every_schema_key_has_a_probe():
    keys = _schema_keys(Recipe)
    keys += [f"DatasetConfig.{k}" for k in DatasetConfig.model_fields]
    keys += [f"ModelSpec.{f.alias or n}" for n, f in ModelSpec.model_fields.items()]
    containers = {"model", "data", "loss", "train", "robustness", "depth_evaluation", "data.augment",
                  "robustness.sanity", "robustness.predictions", "detection", "launcher"}
    missing = [k for k in keys if k not in PROBES and k not in containers]
    assert not missing, f"recipe keys without a probe: {missing}"


def _apply(data: dict, key: str, value: Any, tmp: Path) -> dict:
    if value == "FILE":
        value = _weights_file(tmp)
    if value == "PRED":
        value = str(tmp / "pred")
    if key.startswith("DatasetConfig."):
        field = key.split(".", 1)[1]
        if value == "ROOT":
            value = str(tmp / "root")
        if value is None:
            data["data"]["eval"]["K"].pop(field, None)
        else:
            data["data"]["eval"]["K"][field] = value
        return data
    if key.startswith("ModelSpec."):
        field = key.split(".", 1)[1]
        data["models"][1][field] = value
        if field == "task_scales":
            data["models"][1]["tasks"] = ["segmentation", "depth", "edges"]
        return data
    if key == "train.lr_drop_factor":
        data["train"]["lr_drop_epochs"] = [1]
    if key == "robustness.options":
        data["robustness"]["perturbations"] = ["pgd"]
    if value is None:
        return data
    if value == "limit":
        node = data["data"][key.split(".")[1]]
        targets = node.values() if key in ("data.eval", "data.depth_eval") else [node]
        for t in targets:
            t["limit"] = 3
        return data
    if value == "lambda":
        data["models"][1]["lambda"] = 0.7
        return data
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return data


@pytest.mark.parametrize("key", sorted(PROBES))
def test_recipe_key_changes_behaviour(key, tmp_path, monkeypatch, trained, request):
    from types import SimpleNamespace

    from mtkit.plugins.manager import get_registry

    reg = get_registry()
    request.addfinalizer(lambda: reg.remove_provider(PROBE_PROVIDER))  # the probe entries leave with the test
    if ("head", "probe_depth_head") not in reg:
        from mtkit.models.decoders import DepthDecoder

        class ProbeDepthHead(DepthDecoder):
            """A depth head registered by this test (another class than the built-in)."""

        reg.add("head", "probe_depth_head", ProbeDepthHead, provider=PROBE_PROVIDER)
    if ("loss", "probe_depth_loss") not in reg:
        from mtkit.ops.losses import MonodepthLoss

        class ProbeDepthLoss(MonodepthLoss):
            """The monodepth loss doubled (a registered alternative)."""

            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                return type(out)(2 * out.total, out.photometric, out.smoothness)

        reg.add("loss", "probe_depth_loss", ProbeDepthLoss, provider=PROBE_PROVIDER)
    if ("detector", "probe_detector") not in reg:
        from mtkit.ops.edge_consistency import EdgeConsistency

        class ProbeDetector(EdgeConsistency):
            """The edge-consistency detector with its score negated (a registered alternative)."""

            def score(self, measures):
                return -super().score(measures)

        reg.add("detector", "probe_detector", ProbeDetector, provider=PROBE_PROVIDER)
    a, b, probe = PROBES[key]
    base = tiny_recipe(**{"train.amp": "off", "train.channels_last": False, "robustness.epsilons": [1.0],
                          "robustness.perturbations": ["fgsm"], "robustness.options": {},
                          "robustness.sanity.enabled": key.startswith("robustness.sanity.")})  # only where probed
    base["data"]["eval"]["K"]["options"] = {"domain": "drive", "sequences": 2, "frames": 8}
    base["models"][1]["task_scales"] = {}
    observed = []
    for i, value in enumerate((a, b)):
        folder = tmp_path / str(i)
        folder.mkdir()
        data = _apply(json.loads(json.dumps(base)), key, value, folder)
        ctx = SimpleNamespace(tmp=folder, mp=monkeypatch, trained=trained)
        observed.append(_normalise(probe(validate(data), ctx)))
    assert observed[0] != observed[1], f"{key}: {a!r} and {b!r} behave the same ({observed[0]!r})"


def _normalise(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().flatten()[:64].tolist()
    if isinstance(value, Path):
        return str(value)
    return value
