"""Statistics derived from a training set, cached by the content they came from: the ENet class weights (eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import MtkitError
from ..core.io import cache_dir
from ..core.schema import Recipe
from ..ops.losses import enet_class_weights
from .base import SegmentationDataset
from .common import atomic_save_npz


@dataclass
class ClassWeights:
    """ENet class weights with the pixel counts they came from and the content key they are cached under."""

    weights: torch.Tensor
    counts: torch.Tensor
    key: str


LABEL_VALUES = 256  # labels are stored as uint8 trainIds, 255 void


def label_histogram(ds: SegmentationDataset, force: bool = False) -> tuple[torch.Tensor, str]:
    """Pixel counts of every label value 0..255 over the training labels, and the labels' content key (files,
    sizes, mtimes, label mapping) they are cached under: relabelled or other data is counted anew; ``force``
    always recounts. One pass over the labels serves the class weights and the label check."""
    key = ds.content_key()
    path = cache_dir() / "label_counts" / f"{key}.npz"
    if path.is_file() and not force:
        with np.load(path) as data:
            counts = torch.from_numpy(data["counts"])
    else:
        counts = ds.label_counts(LABEL_VALUES)
        atomic_save_npz(path, counts=counts.numpy())
    return counts, key


def class_weights(ds: SegmentationDataset, num_classes: int, force: bool = False) -> ClassWeights:
    """ENet class weights over the training labels (``label_histogram``), cached by the labels' content."""
    counts, key = label_histogram(ds, force)
    counts = counts[:num_classes]
    return ClassWeights(enet_class_weights(counts), counts, f"{key}-{num_classes}")


def check_labels(ds: SegmentationDataset, num_classes: int, force: bool = False) -> None:
    """Every training label is a class 0..num_classes-1 or void (255): checked once, from the cached histogram,
    so the training step reads nothing back from the device to check it."""
    counts, _ = label_histogram(ds, force)
    bad = [v for v in range(num_classes, 255) if counts[v] > 0]
    if bad:
        raise MtkitError(f"a training label holds class {max(bad)}, but model.num_classes is {num_classes}: set "
                         "model.num_classes to the labels' class count")


def build_class_weights(recipe: Recipe, seg_train, force: bool = False) -> tuple[torch.Tensor | None, str | None]:
    """The class weights of eq. 1 and their cache key: ENet weights over the training labels (cached by the
    labels' content; ``force`` recounts), the recipe's own weights, or none."""
    check_labels(seg_train, recipe.model.num_classes, force)
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
