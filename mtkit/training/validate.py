"""Validation during training: the confusion counts of a segmenter's clean predictions over a whole set."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..core.precision import Precision
from ..core.runtime import Dist, all_reduce_sum, current_dist
from ..data.sampling import evaluation_batches
from ..ops.metrics import confusion_counts, confusion_from_counts


@torch.no_grad()
def confusion_on(segmenter: torch.nn.Module, dataset, num_classes: int, batch_size: int,
                 device: torch.device, precision: Precision | None = None, dist: Dist | None = None
                 ) -> torch.Tensor:
    """Confusion counts of a segmenter's clean predictions over a whole set (validation during training). Under
    torchrun each rank predicts every world-th batch and the counts are summed over the ranks."""
    d = dist or current_dist()
    precision = precision or Precision(device_type=torch.device(device).type)
    segmenter.eval()
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)  # on the device
    for batch in DataLoader(dataset, batch_sampler=evaluation_batches(len(dataset), batch_size, d)):
        with precision.autocast():
            pred = segmenter(precision.input(batch["image"].to(device))).argmax(1)
        counts += confusion_counts(pred, batch["label"], num_classes)
    return confusion_from_counts(all_reduce_sum(counts.cpu(), d), num_classes)
