"""Attack detection from the disagreement of image, depth and segmentation edges: Klingner, Kumar, Yogamani, Bär,
Fingscheidt, "Detecting Adversarial Perturbations in Multi-Task Perception" (IROS 2022; the authors' code is the
public repository ifnspaml/AdvAttackDet, ``detection.py`` and ``losses/baselosses.py``).

A clean image, its predicted depth and its predicted segmentation have edges in the same places; a perturbation
of the image breaks that agreement. Per image, the detector computes the edge maps of the three (horizontal and
vertical neighbour differences, each map scaled to [0, 1]) and their pairwise structural similarity (an 11x11
Gaussian-window SSIM, averaged over the x and y maps): three consistency measures, image–segmentation,
image–depth and segmentation–depth. A threshold fitted on clean images for a target false-positive rate flags
the rest.

Where mtkit differs from the authors' code (said again in the README):

- *One score.* The authors threshold each measure at the target rate and flag an image when at least two of the
  three fall below their thresholds, so the overall false-positive rate is not the target. mtkit flags an image
  when the mean of the three measures falls below one threshold (``score`` is minus that mean): the threshold
  reproduces the target rate on the fitting images, and the ROC curve and its AUC describe the same detector.
- *Per-image scaling.* The authors scale each edge map by the minimum and maximum over the whole batch, so an
  image's measures depend on the others in its batch; mtkit scales per image.
- *Edge maps as theirs:* mean absolute neighbour difference over the channels for the image (in [0, 1]) and for
  the disparity aσ+b = 1/depth divided by its mean per image (their harness enters ``disps_scaled_pred``, the
  scaled disparity, through ``enter_depth``), "unequal" (the label changes) for the segmentation.
- *A differentiable form of the same score* (``soft_consistency_measures``, ``EdgeConsistency.
  differentiable_score``): the softmax probabilities in place of the labels, with the "abs" edge map. On one-hot
  probabilities it equals the detector's score exactly (a label change moves 2 of the C channels by 1, which the
  per-image scaling maps to 1, as "unequal" does), so the adaptive attack (``perturbations.adaptive``) attacks
  the detector that is reported. The authors' own attack loss is an option there (``detector_loss: authors``).

The training loss of the same paper (``edge_consistency_loss``) and the adaptive attack against the detector
(``perturbations.adaptive``) use a differentiable form: monodepth2's 3x3 structural dissimilarity between the
edge maps of the softmax segmentation (or the disparity) and of the image (the authors' ``SSIMGradLoss``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import MtkitError
from ..core.registry import register
from .losses import dssim

MEASURES = ("image-segmentation", "image-depth", "segmentation-depth")


def edge_maps(t: torch.Tensor, kind: str = "abs") -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical edge maps (B, 1, H, W-1) and (B, 1, H-1, W) of ``t`` (B, C, H, W), each scaled to
    [0, 1] per image: ``abs`` the mean absolute neighbour difference over the channels, ``unequal`` the share of
    channels whose value changes (a label map's boundaries)."""
    if kind == "abs":
        gx, gy = _differences(t)
    elif kind == "unequal":
        gx = (t[..., :, :-1] != t[..., :, 1:]).float().mean(1, keepdim=True)
        gy = (t[..., :-1, :] != t[..., 1:, :]).float().mean(1, keepdim=True)
    else:
        raise MtkitError(f"unknown edge map kind '{kind}'; use abs or unequal")
    return _unit_range(gx), _unit_range(gy)


def _unit_range(g: torch.Tensor) -> torch.Tensor:
    lo = g.amin(dim=(1, 2, 3), keepdim=True)
    hi = g.amax(dim=(1, 2, 3), keepdim=True)
    return (g - lo) / (hi - lo).clamp_min(1e-12)


def gaussian_ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5,
                  data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of single-channel maps (B, 1, H, W) with a ``size`` Gaussian window of ``sigma``,
    no padding (the window's valid positions), averaged per image (B,): the authors' ``utils/ssim.py``."""
    coords = torch.arange(size, dtype=a.dtype, device=a.device) - size // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, g), g.transpose(2, 3))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)) * ((2 * cov + c2) / (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def normalised_disparity(depth: torch.Tensor) -> torch.Tensor:
    """The map the detector compares (B, 1, H, W): the disparity 1/depth (= aσ+b, ``disp_to_depth``) divided by
    its mean per image, as the authors' ``enter_depth`` divides their scaled disparity."""
    disp = 1.0 / depth
    return disp / disp.mean(dim=(1, 2, 3), keepdim=True)


def consistency_measures(images: torch.Tensor, labels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The three edge consistencies (B, 3) of ``MEASURES``: images (B, 3, H, W) in gray values, predicted labels
    (B, H, W), predicted depth (B, 1, H, W), whose disparity the detector compares (``normalised_disparity``);
    each the SSIM of the two edge maps, the mean of x and y. 1 for edges in the same places, lower the more they
    disagree."""
    return _pairwise(images, edge_maps(labels.unsqueeze(1), "unequal"), depth)


def soft_consistency_measures(images: torch.Tensor, probabilities: torch.Tensor, depth: torch.Tensor | None
                              ) -> torch.Tensor:
    """``consistency_measures`` made differentiable (B, 3): the softmax ``probabilities`` (B, C, H, W) in place of
    the labels, through the "abs" edge map. Equal to ``consistency_measures`` of the argmax where the
    probabilities are one-hot (see the module), and what the adaptive attack differentiates. ``depth`` None (a
    model without a depth head): the image–segmentation measure alone (B, 1)."""
    return _pairwise(images, edge_maps(probabilities, "abs"), depth)


#: the two edge maps each measure compares, in ``MEASURES``' column order
PAIRS = tuple(tuple(m.split("-")) for m in MEASURES)


def _pairwise(images: torch.Tensor, segmentation: tuple[torch.Tensor, torch.Tensor], depth: torch.Tensor | None
              ) -> torch.Tensor:
    if images.shape[-2] < 12 or images.shape[-1] < 12:
        raise MtkitError(f"edge consistency needs images of at least 12x12 pixels (the 11x11 SSIM window), "
                         f"got {images.shape[-1]}x{images.shape[-2]}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    maps = {"image": edge_maps(images.to(dtype) / 255.0, "abs"),
            "segmentation": (segmentation[0].to(dtype), segmentation[1].to(dtype))}
    if depth is not None:
        maps["depth"] = edge_maps(normalised_disparity(depth.to(dtype)), "abs")
    return torch.stack([(gaussian_ssim(maps[a][0], maps[b][0]) + gaussian_ssim(maps[a][1], maps[b][1])) / 2
                        for a, b in PAIRS if a in maps and b in maps], 1)


def edge_consistency_loss(images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The differentiable edge consistency of a prediction with its image, per image (B,): ``ssim_grad_loss`` of
    ``outputs`` (softmax probabilities (B, C, H, W) or a disparity (B, 1, H, W)) and the images in gray values
    (scaled to [0, 1]). 0 for edges in the same places; the training loss (``loss.edge_consistency``)."""
    return ssim_grad_loss(outputs.float(), images.float() / 255.0)


def ssim_grad_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The authors' ``SSIMGradLoss`` per image (B,): monodepth2's 3x3 structural dissimilarity (1 - SSIM)/2,
    clamped, between the mean absolute neighbour differences of ``a`` and ``b`` (B, C, H, W); the x and y maps
    each averaged over pixels, then summed."""
    (ax, ay), (bx, by) = _differences(a), _differences(b)
    return dssim(ax, bx).mean(dim=(1, 2, 3)) + dssim(ay, by).mean(dim=(1, 2, 3))


def _differences(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute horizontal and vertical neighbour differences over the channels."""
    return ((t[..., :, :-1] - t[..., :, 1:]).abs().mean(1, keepdim=True),
            (t[..., :-1, :] - t[..., 1:, :]).abs().mean(1, keepdim=True))


# ------------------------------------------------------------------------------------------- ROC statistics
def roc_auc(clean: np.ndarray, perturbed: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher: flagged) = P(perturbed score > clean score) + ½ P(tie): the
    Mann–Whitney U statistic over n_clean · n_perturbed (scipy)."""
    from scipy.stats import mannwhitneyu

    if len(clean) == 0 or len(perturbed) == 0:
        return float("nan")
    return float(mannwhitneyu(perturbed, clean).statistic) / (len(clean) * len(perturbed))


def roc_points(clean: np.ndarray, perturbed: np.ndarray) -> tuple[list[float], list[float]]:
    """The ROC curve (false-positive rates, true-positive rates) over every threshold, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([clean, perturbed]))[::-1]
    fpr = [0.0] + [float((clean >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((perturbed >= t).mean()) for t in thresholds]
    return fpr, tpr


def min_fit_images(fpr: float) -> int:
    """The fewest clean fitting images with which ``fit_threshold`` can meet a false-positive rate ``fpr``: the
    conformal rank ⌈(n+1)(1 - fpr)⌉ must be a rank of the n scores, so n ≥ (1 - fpr)/fpr (19 for 5 %)."""
    return math.ceil((1 - fpr) / fpr - 1e-9)


def require_fit_images(n: int, fpr: float) -> None:
    """Refuse ``n`` fitting images that cannot meet ``fpr`` (fewer than ``min_fit_images``), in one line."""
    if n < min_fit_images(fpr):
        raise MtkitError(f"detection.fpr {fpr:g}: {n} clean fitting image(s) cannot give a false-positive rate of "
                         f"{100 * fpr:g} % (a fresh clean image exceeds even the largest of n scores with "
                         f"probability 1/(n+1)); give at least {min_fit_images(fpr)} (the set's even-indexed "
                         f"images fit the threshold: {2 * min_fit_images(fpr)} images in the set), or raise "
                         f"detection.fpr")


def fit_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The threshold that flags (score > threshold) a fresh clean image with probability at most ``fpr``: the
    score of rank k = ⌈(n+1)(1 - fpr)⌉ among the n fitting scores (split conformal; by exchangeability a new
    clean score exceeds it with probability (n + 1 - k)/(n + 1) ≤ fpr, 1/25 = 4 % with 24 images at 5 %). The
    plain (1 - fpr) quantile of the fitting scores misses it: rank 23 of 24 is exceeded with probability 2/25 =
    8 %. Fewer than ``min_fit_images(fpr)`` scores cannot meet ``fpr`` at all: an error says how many."""
    n = len(clean_scores)
    if n == 0:
        raise MtkitError("no clean images to fit the detector's threshold on")
    require_fit_images(n, fpr)
    rank = math.ceil((n + 1) * (1 - fpr) - 1e-9)
    return float(np.sort(np.asarray(clean_scores, dtype=np.float64))[rank - 1])


# ----------------------------------------------------------------------------------------------- detectors
class DetectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Detector:
    """Base of the registry's detectors (kind ``detector``): ``measures`` per image from a model and its input,
    ``score`` (higher: more likely perturbed). Plugins register their own through the plugin API."""

    Options: ClassVar[type[BaseModel]] = DetectorOptions
    #: the names of the columns ``measures`` returns
    measure_names: tuple[str, ...] = ()

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def measures(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def measures_and_prediction(self, model: torch.nn.Module, images: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``measures`` and, when the detector predicts the segmentation on its way, the predicted labels
        (B, H, W), so that the evaluation needs no second pass of the network; None when it does not."""
        return self.measures(model, images), None

    def score(self, measures: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def differentiable_score(self, model: torch.nn.Module, images: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The segmentation logits and a differentiable form of ``score`` per image (B,), from one pass with
        gradients: what an adaptive attack (``opgd``) lowers so that its images are not flagged. A detector
        without one cannot be attacked adaptively."""
        raise MtkitError(f"the {type(self).__name__} detector has no differentiable score, so the adaptive attack "
                         "(opgd) cannot attack it; implement Detector.differentiable_score")


class EdgeConsistencyOptions(DetectorOptions):
    measures: list[str] = Field(default_factory=lambda: list(MEASURES),
                                description="which consistency measures the score averages")


@register("detector", "edge_consistency")
class EdgeConsistency(Detector):
    """Klingner et al. (IROS 2022): the edges of the image, the predicted depth and the predicted segmentation
    agree on clean images; the score is minus the mean of the chosen consistency measures. Needs a multi-task
    model with a depth head (``MultiTaskNet.predict``)."""

    Options = EdgeConsistencyOptions
    measure_names = MEASURES

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        unknown = sorted(set(self.options.measures) - set(MEASURES))  # type: ignore[attr-defined]
        if unknown or not self.options.measures:  # type: ignore[attr-defined]
            raise MtkitError(f"edge_consistency measures: {unknown or 'none given'}; choose from {list(MEASURES)}")
        self.columns = [MEASURES.index(m) for m in self.options.measures]  # type: ignore[attr-defined]

    def measures(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.measures_and_prediction(model, images)[0]

    def measures_and_prediction(self, model: torch.nn.Module, images: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        _needs_depth(model)
        with torch.no_grad():
            logits, depth = model.predict(images)
        labels = logits.argmax(1)
        return consistency_measures(images, labels, depth), labels

    def score(self, measures: torch.Tensor) -> torch.Tensor:
        return -measures[:, self.columns].mean(1)

    def differentiable_score(self, model: torch.nn.Module, images: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` of ``soft_consistency_measures`` (the softmax in place of the labels): the reported score
        wherever the softmax is one-hot (see the module), with gradients."""
        _needs_depth(model)
        logits, depth = model.predict(images)
        return logits, self.score(soft_consistency_measures(images, F.softmax(logits.float(), 1), depth))


def _needs_depth(model: torch.nn.Module) -> None:
    if not hasattr(model, "predict") or getattr(model, "depth_head", None) is None:
        raise MtkitError("the edge_consistency detector needs a multi-task model with a depth head (tasks "
                         "[segmentation, depth]); a single-task or external segmenter has no depth to compare")
