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


class PredictionsConfig(Strict):
    """Per-image predictions written during the evaluation (``mtkit.evaluation.predictions``), at each image's
    original resolution (logits upsampled bilinearly), named as the Cityscapes benchmark expects:
    ``<folder>/<model>/<dataset key>/<condition>/<format>/<city>_<seq>_<frame>_pred.png``. Needs datasets read
    from files (cityscapes, kitti2015)."""

    folder: str | None = None
    """where to write them; null: no predictions (`mtkit eval --save-predictions DIR`)"""
    conditions: list[str] = Field(default_factory=lambda: ["clean"])
    """'clean' and '<perturbation>@<ε>' (e.g. fgsm@4): a perturbation of robustness.perturbations at an ε of its
    sweep"""
    formats: list[Literal["labelIds", "trainIds", "color"]] = Field(default_factory=lambda: ["labelIds"])
    """labelIds (the benchmark's input), trainIds, color (the Cityscapes colours)"""


class RobustnessConfig(Strict):
    """The robustness evaluation (sec. 3.4-3.5): every perturbation at every ε on each evaluation set."""

    perturbations: list[str] = Field(default_factory=lambda: ["gaussian", "salt_pepper", "fgsm", "pgd"])
    """registered perturbations to sweep (`mtkit list` shows them); the paper: gaussian, salt_pepper, fgsm, pgd"""
    epsilons: list[float] = Field(default_factory=lambda: list(PAPER_EPSILONS))
    """strengths ε in gray values (the RMS of the perturbation of eq. 7 for the noises, FGSM and pgd_rms; PGD's L∞
    bound), sorted, each once"""
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
    epsilon_axis: Literal["requested", "measured", "both"] = Field(
        "requested", description="the x axis of Figure 5: the requested ε, the measured ε (the RMS of eq. 7 each "
                                 "perturbation reached: PGD's L∞ bound measures well below its ε), or both figures")
    label_resolution: Literal["recipe", "original"] = Field(
        "recipe", description="recipe: score at the dataset's size with labels resized nearest-neighbour (the "
                              "paper's protocol, which trains and evaluates at one size); original: logits upsampled "
                              "bilinearly to each image's original size and scored against its full-resolution "
                              "labels (the Cityscapes benchmark's protocol; datasets read from files only)")
    qualitative_images: int = Field(2, ge=0, le=16, description="images of the report's Figure 1-style panel "
                                                                  "(mtkit run, with a single- and a multi-task "
                                                                  "model); 0: none")
    predictions: PredictionsConfig = Field(default_factory=PredictionsConfig)
    """per-image predictions to write (for the benchmark's scripts and test server)"""
    datasets: list[str] | None = Field(None, description="keys of data.eval; null: all")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="perturbation -> kwargs")
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    """the gradient-masking sanity checks"""

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        return check_epsilons(v)

    @model_validator(mode="after")
    def _conditions(self) -> RobustnessConfig:
        for text in self.predictions.conditions:
            name, _, level = text.partition("@")
            if text == "clean":
                continue
            if name not in self.perturbations:
                raise ValueError(f"predictions.conditions '{text}': {name or '(empty)'} is not one of "
                                 f"robustness.perturbations {self.perturbations} (write 'clean' or "
                                 "'<perturbation>@<ε>', e.g. fgsm@4)")
            try:
                float(level)
            except ValueError:
                raise ValueError(f"predictions.conditions '{text}': '{level}' is not a number (e.g. fgsm@4)") \
                    from None
        return self


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
