"""Statistics derived from a training set, cached by the content they came from: the ENet class weights (eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Recipe
from ..errors import MtkitError
from ..losses import enet_class_weights
from .base import SegmentationDataset
from .common import atomic_save_npz, cache_dir


@dataclass
class ClassWeights:
    """ENet class weights with the pixel counts they came from and the content key they are cached under."""

    weights: torch.Tensor
    counts: torch.Tensor
    key: str


def class_weights(ds: SegmentationDataset, num_classes: int, force: bool = False) -> ClassWeights:
    """ENet class weights over the training labels, cached under the labels' content key (files, sizes, mtimes,
    label mapping) and the class count: relabelled or other data is counted anew; ``force`` always recounts."""
    key = f"{ds.content_key()}-{num_classes}"
    path = cache_dir() / "class_weights" / f"{key}.npz"
    if path.is_file() and not force:
        with np.load(path) as data:
            counts = torch.from_numpy(data["counts"])
    else:
        counts = ds.label_counts(num_classes)
        atomic_save_npz(path, counts=counts.numpy())
    return ClassWeights(enet_class_weights(counts), counts, key)


def build_class_weights(recipe: Recipe, seg_train, force: bool = False) -> tuple[torch.Tensor | None, str | None]:
    """The class weights of eq. 1 and their cache key: ENet weights over the training labels (cached by the
    labels' content; ``force`` recounts), the recipe's own weights, or none."""
    cw = recipe.loss.class_weights
    if cw == "none":
        return None, None
    if isinstance(cw, list):
        if len(cw) != recipe.model.num_classes:
            raise MtkitError(f"loss.class_weights has {len(cw)} values, model.num_classes is "
                             f"{recipe.model.num_classes}")
        return torch.tensor(cw, dtype=torch.float32), None
    weights = class_weights(seg_train, recipe.model.num_classes, force)
    return weights.weights, weights.key
