"""The stable names a plugin may import: ``from mtkit.plugin_api import ...``. Nothing else of mtkit is API for
plugins; the shipped plugins import only this module (import-linter checks it in CI).

A plugin package names a module in its entry points (group ``mtkit``) that implements hooks of
``mtkit.hookspecs`` with ``@hookimpl``; ``mtkit_register(registry)`` adds its entries. It must not change global
state when it is imported.
"""

from __future__ import annotations

from pydantic import Field

from .build import build_dataset
from .checkpoint import atomic_torch_save, load_checkpoint
from .config import DatasetConfig, ModelConfig, config_hash
from .data.base import DatasetOptions, SegmentationDataset, VideoDataset
from .data.common import cache_dir
from .detection import Detector, DetectorOptions, consistency_measures, edge_consistency_loss
from .errors import MtkitError
from .hookspecs import hookimpl
from .losses import IGNORE_INDEX, weighted_cross_entropy
from .models.decoders import SegmentationDecoder
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
from .registry import RegistryView
from .tasks import AuxiliaryTask

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
