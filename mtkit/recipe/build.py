"""The one place where names become objects (mmengine's ``build_from_cfg``, timm's ``create_model``): each
function looks a name up in the registry of built-ins and plugins, validates the entry's options against its
typed model, and builds it. Nothing below this module looks anything up by name."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.utils.data import Dataset

from ..core.errors import MtkitError, RecipeError, did_you_mean, value_problem
from ..core.registry import Entry
from ..core.schema import AugmentConfig, DatasetConfig, ModelConfig, Recipe
from ..models import MultiTaskNet
from ..models.backbones import TimmEncoder
from ..models.pose import PoseNet
from ..models.tasks import BUILTIN_TASKS, AuxiliaryTask
from ..perturbations import Perturbation
from ..plugins.manager import get_registry


def options_for(entry: Entry, options: dict[str, Any] | None, where: str) -> BaseModel | None:
    """An entry's options validated against its typed model; ``where`` is the recipe path for the error
    (e.g. ``data.segmentation.options``). An entry without a model takes no options."""
    options = dict(options or {})
    if entry.options is None:
        if options:
            raise RecipeError(f"key '{where}': {entry.kind} '{entry.name}' ({entry.origin}) takes no options, "
                              f"got {sorted(options)}")
        return None
    try:
        return entry.options.model_validate(options)
    except ValidationError as exc:
        raise RecipeError(_options_error(exc, entry, where)) from None


def _options_error(exc: ValidationError, entry: Entry, where: str) -> str:
    allowed = list(entry.options.model_fields)
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (where, *err["loc"]))
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown option '{path}' of {entry.kind} '{entry.name}'"
                            f"{did_you_mean(str(err['loc'][-1]), allowed)} (allowed: {', '.join(allowed) or 'none'})")
        else:
            problems.append(value_problem(path, err))
    return "; ".join(problems)


# ------------------------------------------------------------------------------------------------- models

def build_backbone(name: str, pretrained: bool | str = False, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A registered backbone by name, else any timm model name (features_only)."""
    registry = get_registry()
    if ("backbone", name) in registry:
        return registry.get("backbone", name)(name=name, pretrained=pretrained, in_chans=in_chans, **kwargs)
    import timm

    if timm.is_model(name):
        return TimmEncoder(name, pretrained, in_chans, **kwargs)
    hint = did_you_mean(name, [*registry.names("backbone"), *timm.list_models()])
    raise MtkitError(f"unknown backbone '{name}': neither registered nor a timm model{hint} "
                     "(see mtkit list backbone and timm.list_models())")


def build_head(name: str, enc_channels: list[int], cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    return get_registry().get("head", name)(enc_channels=enc_channels, num_classes=cfg.num_classes, **kwargs)


def build_pose_net(cfg: ModelConfig) -> PoseNet:
    """monodepth2's separate pose network: the pose backbone on 6 channels (two frames) and its decoder."""
    encoder = build_backbone(cfg.pose_backbone, cfg.pose_pretrained, in_chans=6, **cfg.backbone_kwargs)
    return PoseNet(encoder, cfg.mean, cfg.std)


def auxiliary_task(name: str) -> AuxiliaryTask:
    """The registered task ``name`` as an instance (a clear error if it is unknown or not an AuxiliaryTask)."""
    entry = get_registry().entry("task", name)
    obj = entry.obj() if isinstance(entry.obj, type) else entry.obj
    if not isinstance(obj, AuxiliaryTask):
        raise MtkitError(f"task '{name}' ({entry.origin}) is not an mtkit.plugin_api.AuxiliaryTask")
    return obj


def build_model(cfg: ModelConfig, tasks: list[str] | tuple[str, ...] = ("segmentation",), lam: float = 1.0,
                num_scales: int = 4, task_scales: dict[str, float] | None = None) -> MultiTaskNet:
    """The network of one model spec: encoder, segmentation head, and for the depth task the depth head and
    the pose network; plugin tasks come from the task registry."""
    encoder = build_backbone(cfg.backbone, cfg.pretrained, **cfg.backbone_kwargs)
    channels = list(encoder.channels)
    depth = "depth" in tasks
    return MultiTaskNet(
        cfg, encoder, build_head(cfg.head, channels, cfg), tuple(tasks), lam,
        depth_head=build_head(cfg.depth_head, channels, cfg, num_scales=num_scales) if depth else None,
        pose_net=build_pose_net(cfg) if depth else None,
        aux_tasks={t: auxiliary_task(t) for t in tasks if t not in BUILTIN_TASKS}, task_scales=task_scales)


# --------------------------------------------------------------------------------------------------- data

def build_dataset(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None,
                  where: str = "data") -> Dataset:
    """A dataset by its registered name, its options validated (``where``: the recipe path, for errors)."""
    entry = get_registry().entry("dataset", cfg.name)
    options = options_for(entry, cfg.options, f"{where}.options")
    return entry.obj(cfg, options, train=train, augment=augment)


# ----------------------------------------------------------------------------------------- losses, attacks

def build_segmentation_loss(name: str, class_weights: torch.Tensor | None) -> nn.Module:
    """The segmentation loss ``loss.segmentation`` (default: the weighted cross-entropy of eq. 1), used by the
    trainer and by the gradient attacks alike."""
    return get_registry().get("loss", name)(weights=class_weights)


def build_depth_loss(recipe: Recipe) -> nn.Module:
    """The self-supervised depth loss ``loss.depth`` (default: eq. 2-4) with the recipe's settings."""
    r = recipe
    return get_registry().get("loss", r.loss.depth)(
        alpha=r.loss.ssim_alpha, smoothness_weight=r.loss.smoothness, num_scales=r.loss.num_scales,
        automask=r.loss.automask, min_depth=r.model.min_depth, max_depth=r.model.max_depth)


def build_perturbation(name: str, options: dict[str, Any] | None = None,
                       where: str | None = None) -> Perturbation:
    """A perturbation by name with its options validated against its ``Options`` model."""
    entry = get_registry().entry("perturbation", name)
    opts = options_for(entry, options, where or f"robustness.options.{name}")
    return entry.obj(opts) if opts is not None else entry.obj()


def build_detector(name: str, options: dict[str, Any] | None = None) -> Any:
    """An attack detector by name (registry kind ``detector``) with its options validated."""
    entry = get_registry().entry("detector", name)
    opts = options_for(entry, options, "detection.options")
    return entry.obj(opts) if opts is not None else entry.obj()


def build_perturbations(names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Perturbation]:
    """The recipe's perturbations with their options. Options of a registered perturbation that the list leaves
    out are validated and kept for later (a recipe that extends another may shorten the list); options under a
    name that is no perturbation at all are a mistake."""
    registry = get_registry()
    for name, opts in options.items():
        if name not in names:
            options_for(registry.entry("perturbation", name), opts, f"robustness.options.{name}")
    return {n: build_perturbation(n, options.get(n)) for n in names}
