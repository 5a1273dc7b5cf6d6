"""The datasets of a recipe: each a registered loader at a split and a size, and the training augmentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
)

from .base import Strict


class DatasetConfig(Strict):
    """One dataset: a registered loader, its root on disk and the split and resolution to load."""

    name: str
    """the registered dataset loader (`mtkit list` shows them): cityscapes, kitti, kitti_2015, kitti_eigen,
    synthetic, ..."""
    root: str | None = Field(None, description="folder; null: the dataset's environment variable or cache")
    split: str = "train"
    """the split to load (train, val, test, or what the loader defines)"""
    height: int = Field(192, gt=0, le=8192)
    """height in pixels the images are resized to (the network's input)"""
    width: int = Field(640, gt=0, le=8192)
    """width in pixels the images are resized to (the network's input)"""
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    options: dict[str, Any] = Field(default_factory=dict)
    """the loader's own options (`mtkit list` shows each loader's), validated when the recipe loads"""


class AugmentConfig(Strict):
    """The paper's training augmentation (sec. 4)."""

    hflip: bool = True
    """random horizontal flip (probability 0.5)"""
    brightness: float = Field(0.2, ge=0)
    """colour jitter: brightness factor drawn from [1 - b, 1 + b]"""
    contrast: float = Field(0.2, ge=0)
    """colour jitter: contrast factor drawn from [1 - c, 1 + c]"""
    saturation: float = Field(0.2, ge=0)
    """colour jitter: saturation factor drawn from [1 - s, 1 + s]"""
    hue: float = Field(0.1, ge=0, le=0.5)
    """colour jitter: hue shift drawn from [-h, h] (fractions of the colour circle)"""


class DataConfig(Strict):
    """The datasets of a run by role; each is a registered loader at a split and a size."""

    segmentation: DatasetConfig
    """the labelled training set of the segmentation task (the paper: Cityscapes train)"""
    segmentation_val: DatasetConfig
    """the labelled set validated on after every epoch (the paper: Cityscapes val)"""
    depth: DatasetConfig | None = None
    """the video the self-supervised depth task trains on (the paper: KITTI); needed by multi-task models"""
    eval: dict[str, DatasetConfig] = Field(default_factory=dict, description="key (e.g. CS, K) -> dataset")
    depth_eval: dict[str, DatasetConfig] = Field(
        default_factory=dict, description="key (e.g. Eigen) -> dataset with ground-truth depth, for multi-task models")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """training augmentation of both tasks"""
    num_workers: int | None = Field(None, ge=0, description="loader and prepare processes; null: one per core")
    pin_memory: bool | Literal["auto"] = Field("auto", description="auto: on when training on a GPU")
    persistent_workers: bool = Field(True, description="keep loader workers alive between epochs")
