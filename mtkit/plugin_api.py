"""The stable names a plugin may import: ``from mtkit.plugin_api import ...``. Nothing else of mtkit is API for
plugins; the shipped plugins import only this module (import-linter checks it in CI).

A plugin package names a module in its entry points (group ``mtkit``) that implements hooks of
``mtkit.plugins.hookspecs`` with ``@hookimpl``; ``mtkit_register(registry)`` adds its entries. It must not change global
state when it is imported.
"""

from __future__ import annotations

from pydantic import Field

from .core.checkpoint import atomic_torch_save, load_checkpoint
from .core.errors import MtkitError
from .core.io import cache_dir
from .core.registry import RegistryView
from .core.schema import DatasetConfig, ModelConfig, config_hash
from .data.base import DatasetOptions, SegmentationDataset, VideoDataset
from .models.decoders import SegmentationDecoder
from .models.tasks import AuxiliaryTask
from .ops.edge_consistency import Detector, DetectorOptions, consistency_measures, edge_consistency_loss
from .ops.losses import IGNORE_INDEX, weighted_cross_entropy
from .perturbations import (
    AttackContext,
    Perturbation,
    PerturbationOptions,
    Targets,
    clip_image,
    draw,
    fgsm_direction,
    measured_epsilon,
    pgd_iterations,
    project,
)
from .plugins.hookspecs import hookimpl
from .recipe.build import build_dataset

__all__ = [
    "IGNORE_INDEX", "AttackContext", "AuxiliaryTask", "DatasetConfig", "DatasetOptions", "Detector", "DetectorOptions",
    "Field", "ModelConfig",
    "MtkitError", "Perturbation", "PerturbationOptions", "RegistryView", "SegmentationDataset", "SegmentationDecoder",
    "Targets",
    "VideoDataset", "atomic_torch_save",
    "build_dataset", "cache_dir", "clip_image", "config_hash", "consistency_measures", "draw", "edge_consistency_loss",
    "fgsm_direction", "hookimpl", "load_checkpoint",
    "measured_epsilon", "pgd_iterations", "project", "weighted_cross_entropy",
]
