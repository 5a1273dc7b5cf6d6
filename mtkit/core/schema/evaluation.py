"""The evaluations of a recipe: robustness (sec. 3.4-3.5) with its gradient-masking checks, attack
detection, depth."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from .base import PAPER_EPSILONS, PlainName, Strict, check_epsilons


class SanityConfig(Strict):
    """Gradient-masking sanity checks (Carlini et al. 2019), run with every sweep that has a gradient attack:
    mIoU does not rise with ε, an iterative attack is at least as strong as FGSM, an unbounded attack drives mIoU
    to about zero, a gradient attack is at least as strong as Gaussian noise. A failure is flagged in the
    report's verdict: the numbers under attack may overstate robustness."""

    enabled: bool = True
    """run the gradient-masking checks with every sweep that has a gradient attack"""
    iterations: PositiveInt = Field(10, description="APGD iterations of the unbounded (ε = 255) attack")
    tolerance: float = Field(1.0, ge=0, description="mIoU points [%] a comparison may miss by before it fails")
    near_zero: float = Field(5.0, ge=0, le=100, description="the most mIoU [%] the unbounded attack may leave")


class RobustnessConfig(Strict):
    """The robustness evaluation (sec. 3.4-3.5): every perturbation at every ε on each evaluation set."""

    perturbations: list[str] = Field(default_factory=lambda: ["gaussian", "salt_pepper", "fgsm", "pgd"])
    """registered perturbations to sweep (`mtkit list` shows them); the paper: gaussian, salt_pepper, fgsm, pgd"""
    epsilons: list[float] = Field(default_factory=lambda: list(PAPER_EPSILONS))
    """strengths ε in gray values (the RMS of the perturbation of eq. 7 for the noises and FGSM; PGD's L∞ bound),
    sorted, each once"""
    batch_size: PositiveInt | Literal["auto"] = Field(
        8, description="images per loaded batch; auto: what fits the device's memory with every ε of the sweep")
    pass_images: PositiveInt | Literal["auto"] = Field(
        "auto", description="most images in one forward/backward pass of a batched sweep (the ε copies of a batch "
                            "go through together); auto: what fits the device's memory")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "off", description="autocast of the model's forward passes; attack gradients are always taken in fp32")
    channels_last: bool | Literal["auto"] = Field("auto", description="auto: on CUDA")
    compile: bool | str = Field(False, description="torch.compile the segmenter: true (inductor) or a backend name")
    tf32: bool = Field(False, description="CUDA: let fp32 matmuls and convolutions use TF32 (off: the evaluation and "
                                          "its attack gradients are IEEE fp32, the paper's numbers)")
    datasets: list[str] | None = Field(None, description="keys of data.eval; null: all")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="perturbation -> kwargs")
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    """the gradient-masking sanity checks"""

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        return check_epsilons(v)


class DetectionConfig(Strict):
    """Attack detection (``mtkit.ops.edge_consistency``) for every multi-task model: the detector's threshold is
    fitted on the clean images of each evaluation set with an even index (0, 2, 4, …) for the target false-positive
    rate; the detection rate, the measured false-positive rate and the ROC curve come from the odd-indexed images,
    clean and perturbed."""

    enabled: bool = False
    """evaluate the attack detector for every multi-task model"""
    detector: PlainName = "edge_consistency"
    """the registered detector (registry kind 'detector')"""
    options: dict[str, Any] = Field(default_factory=dict, description="the detector's options")
    fpr: float = Field(0.05, gt=0, lt=1, description="target false-positive rate on clean images")
    perturbations: list[str] | None = Field(None, description="null: robustness.perturbations")
    epsilons: list[float] | None = Field(None, description="null: robustness.epsilons")
    datasets: list[str] | None = Field(None, description="keys of data.eval; null: robustness.datasets")
    batch_size: PositiveInt = 8
    """images per batch of the detection evaluation"""

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else check_epsilons(v)


class DepthEvaluationConfig(Strict):
    """The depth evaluation protocol (monodepth2 / SGDepth on the KITTI Eigen split)."""

    min_depth: float = Field(1e-3, gt=0, description="ground truth and predictions are capped to [min, max] m")
    max_depth: float = Field(80.0, gt=0)
    """the largest depth evaluated, in metres (KITTI: 80)"""
    garg_crop: bool = True
    """evaluate inside the Garg/Eigen crop (the standard KITTI protocol)"""
    median_scaling: bool = Field(True, description="per-image median scaling (monocular models)")
    batch_size: int = Field(8, ge=1)
    """images per batch of the depth evaluation"""

    @model_validator(mode="after")
    def _range(self) -> DepthEvaluationConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be below max_depth ({self.max_depth})")
        return self
