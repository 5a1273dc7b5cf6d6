"""Evaluation metrics: mIoU from summed confusion counts (eq. 9), the mIoU ratio Q (eq. 10), depth metrics."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import MtkitError
from .losses import IGNORE_INDEX


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat (num_classes² + 1,) int64 counts on ``pred``'s device, without a host synchronisation (no boolean
    indexing, no ``bincount``, whose CUDA kernel reads its maximum back): bin t·n + p for each labelled pixel of
    ground truth t and prediction p; the last bin counts the labels outside 0..n-1 that are not void, which
    ``confusion_from_counts`` refuses. Sum these over a whole set, then turn them into the matrix once."""
    n = num_classes
    t = target.to(pred.device).long().flatten()
    p = pred.long().flatten()
    idx = torch.where((t >= 0) & (t < n), t * n + p, n * n)
    idx = torch.where(t == ignore_index, n * n + 1, idx)  # void: a bin that is dropped
    counts = torch.zeros(n * n + 2, dtype=torch.int64, device=pred.device)
    return counts.scatter_add_(0, idx, torch.ones_like(idx))[:-1]


def confusion_from_counts(counts: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The (…, num_classes, num_classes) matrices of summed ``confusion_counts`` (rows = ground truth, columns =
    prediction), on the CPU; a label outside the classes is an error that says how to fix it."""
    counts = counts.cpu()
    bad = int(counts[..., -1].sum())
    if bad:
        raise MtkitError(f"{bad} labelled pixel(s) hold a class outside 0..{num_classes - 1} (and not the void label "
                         f"{ignore_index}): the labels have more classes than model.num_classes = {num_classes}")
    return counts[..., :-1].reshape(*counts.shape[:-1], num_classes, num_classes)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; void ignored."""
    return confusion_from_counts(confusion_counts(pred, target, num_classes, ignore_index), num_classes, ignore_index)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """TP / (TP + FP + FN) per class from counts summed over the whole set; NaN for a class that never appears
    in ground truth nor prediction."""
    conf = confusion.double()
    tp = conf.diag()
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


def miou(confusion: torch.Tensor) -> float:
    """mIoU of eq. 9: mean over classes of TP/(TP+FP+FN), counts summed over all images first.

    Classes absent from both ground truth and predictions of the whole set (0/0) are left out of the mean.
    """
    ious = iou_per_class(confusion)
    valid = ~torch.isnan(ious)
    return float(ious[valid].mean()) if valid.any() else float("nan")


def q_ratio(miou_adv: float, miou_clean: float) -> float:
    """Q = mIoU_adv / mIoU_clean (eq. 10)."""
    if miou_clean == 0 or math.isnan(miou_clean):
        return float("nan")
    return miou_adv / miou_clean


def garg_crop_mask(height: int, width: int) -> torch.Tensor:
    """The Garg/Eigen crop used for KITTI depth evaluation, as a boolean (H, W) mask."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    y0, y1 = int(0.40810811 * height), int(0.99189189 * height)
    x0, x1 = int(0.03594771 * width), int(0.96405229 * width)
    mask[y0:y1, x0:x1] = True
    return mask


DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")


def depth_errors(gt: torch.Tensor, pred: torch.Tensor) -> dict[str, float]:
    """abs_rel, sq_rel, rmse, rmse_log, δ<1.25 (a1), δ<1.25² (a2), δ<1.25³ (a3) over matching 1-D tensors."""
    gt = gt.double()
    pred = pred.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    return {
        "abs_rel": float(((gt - pred).abs() / gt).mean()),
        "sq_rel": float((((gt - pred) ** 2) / gt).mean()),
        "rmse": float(((gt - pred) ** 2).mean().sqrt()),
        "rmse_log": float(((gt.log() - pred.log()) ** 2).mean().sqrt()),
        "a1": float((thresh < 1.25).double().mean()),
        "a2": float((thresh < 1.25**2).double().mean()),
        "a3": float((thresh < 1.25**3).double().mean()),
    }


def _median(t: torch.Tensor) -> float:
    """numpy's median (the mean of the two middle values of an even count), as monodepth2's evaluation; torch's
    median would take the lower one."""
    return float(np.median(t.detach().cpu().double().numpy()))


def evaluate_depth(gt: torch.Tensor, pred: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 80.0,
                   garg_crop: bool = True, median_scaling: bool = True) -> dict[str, float]:
    """Depth metrics of one image (monodepth2's protocol): valid ground truth in (min_depth, max_depth), the
    Garg/Eigen crop, per-image median scaling (numpy's median, as monodepth2), predictions clamped to
    [min_depth, max_depth]."""
    gt = gt.squeeze()
    pred = pred.squeeze()
    if pred.shape != gt.shape:
        pred = torch.nn.functional.interpolate(pred[None, None], size=gt.shape, mode="bilinear",
                                               align_corners=False)[0, 0]
    mask = (gt > min_depth) & (gt < max_depth)
    if garg_crop:
        mask &= garg_crop_mask(*gt.shape).to(mask.device)
    g, p = gt[mask], pred[mask]
    if g.numel() == 0:
        raise ValueError("no valid ground-truth depth in the evaluated region")
    ratio = _median(g) / _median(p) if median_scaling else 1.0
    p = (p * ratio).clamp(min_depth, max_depth)
    out = depth_errors(g, p)
    out["scale"] = ratio
    return out


def targeted_counts(pred: torch.Tensor, labels: torch.Tensor, kind: str, hidden: int | None = None,
                    reference: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Counts (B, 6) int64 of a targeted attack's outcome per image of a batch (B, H, W), on the device (kept per
    image for the cluster bootstrap of the report, read back once): pixels that took their target and pixels with
    a target; for a dynamic target (Metzen et al.) also the hidden class's pixels of the clean prediction
    ``reference`` that no longer show it, their number, the other pixels whose label the attack kept, and their
    number."""
    has = labels != ignore_index
    per = lambda m: m.flatten(1).sum(1)  # noqa: E731
    counts = [per((pred == labels) & has), per(has)]
    if kind == "dynamic" and reference is not None and hidden is not None:
        was = reference == hidden
        counts += [per(was & (pred != hidden)), per(was), per(~was & (pred == reference)), per(~was)]
    else:
        counts += [torch.zeros(pred.shape[0], dtype=torch.long, device=pred.device)] * 4
    return torch.stack(counts, 1).long()


def targeted_rates(counts: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    """(success, removed, kept) shares from ``targeted_counts`` summed over their images (any leading dimensions);
    None where a share has no pixels."""
    c = counts.reshape(-1, 6).sum(0).tolist()
    return tuple(c[i] / c[i + 1] if c[i + 1] else None for i in (0, 2, 4))  # type: ignore[return-value]
