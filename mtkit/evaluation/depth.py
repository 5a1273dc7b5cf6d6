"""Depth evaluation of multi-task models (the protocol SGDepth and monodepth2 report on the KITTI Eigen split).

Per image: the predicted depth (scale 0, from the sigmoid of the depth head, paper sec. 3.2) is turned into inverse
depth, resized bilinearly to the ground truth's native size and inverted again (monodepth2 resizes the disparity);
the ground truth is kept where it lies in (min_depth, max_depth) = (1e-3, 80) m and inside the Garg/Eigen crop; a
monocular model's depth is scaled by the per-image ratio median(gt) / median(pred) and clamped to the same range;
then abs_rel, sq_rel, rmse, rmse_log, δ<1.25, δ<1.25², δ<1.25³. Metrics are averaged over images; the median and
the spread of the scale ratios are reported with them.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..core.errors import MtkitError
from ..core.precision import math_mode
from ..core.progress import progress_bar
from ..core.results import DepthRow
from ..core.schema import DepthEvaluationConfig
from ..ops.metrics import DEPTH_METRICS, evaluate_depth


def resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Depth (H, W) resized to ``size`` through its inverse (bilinear on disparity, as monodepth2)."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    disp = F.interpolate((1.0 / depth)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return 1.0 / disp


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]), "depth": [s["depth"] for s in samples]}


def evaluate_depth_model(model: nn.Module, dataset, settings: DepthEvaluationConfig | None = None,
                         batch_size: int | None = None, device: torch.device | str = "cpu", progress: bool = False,
                         label: str = "depth", model_name: str = "", seed: int = 0, dataset_name: str = "",
                         tf32: bool = False) -> DepthRow:
    """Evaluate ``model.predict_depth`` (images in gray values → depth in metres) on ``dataset`` (samples with
    ``image`` and native-size ``depth``; see ``mtkit.data.depth_gt``), under the evaluation phase's CUDA math
    policy (``math_mode``; ``tf32``: the recipe's ``robustness.tf32``, off by default: IEEE fp32)."""
    settings = settings or DepthEvaluationConfig()
    if not hasattr(model, "predict_depth"):
        raise MtkitError("depth evaluation needs a model with a depth head (a multi-task model)")
    model.eval()
    device = torch.device(device)
    per_image: list[dict[str, float]] = []
    loader = DataLoader(dataset, batch_size=batch_size or settings.batch_size, collate_fn=_collate)
    with progress_bar(progress, len(loader), label) as advance, torch.no_grad(), math_mode(tf32):
        for batch in loader:
            pred = model.predict_depth(batch["image"].to(device)).float().cpu()
            for p, gt in zip(pred, batch["depth"]):
                p = resize_depth(p[0], tuple(gt.shape))
                try:
                    per_image.append(evaluate_depth(gt, p, settings.min_depth, settings.max_depth,
                                                    settings.garg_crop, settings.median_scaling))
                except ValueError:
                    continue  # an image without valid ground truth in the crop (sky only) is left out
            advance()
    if not per_image:
        raise MtkitError(f"{label}: no image has valid ground-truth depth in the evaluated region")
    metrics = {k: statistics.fmean(m[k] for m in per_image) for k in DEPTH_METRICS}
    ratios = [m["scale"] for m in per_image]
    med = statistics.median(ratios) if settings.median_scaling else None
    std = statistics.pstdev([r / med for r in ratios]) if med else None
    return DepthRow(model=model_name, seed=seed, dataset=dataset_name, metrics=metrics, images=len(per_image),
                    skipped=getattr(dataset, "skipped", 0), scale_median=med, scale_std=std,
                    settings=settings.model_dump())
