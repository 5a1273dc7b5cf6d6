"""Typed results: what an evaluation produces and what every report, table, plot and plugin hook reads.

``RunResults`` is written to and read from ``results.json`` (strict JSON: a NaN, e.g. the mIoU of a set without
labelled pixels, is written as null) and carries ``schema_version``; a file of another version is refused with a
message instead of being misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import MtkitError
from .io import atomic_write_text

SCHEMA_VERSION = 2
#: the row of the per-image strongest of the gradient attacks at each ε
WORST_CASE = "worst_case"
#: the gradient-masking checks' unbounded attack (``Unbounded``), kept out of the sweep's rows
UNBOUNDED = "unbounded"
NO_LABELS = "no labelled pixel in the evaluation set: mIoU (and Q) undefined"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _nan_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, float) and v != v else v


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


class Spread(Record):
    """The spread of one row's per-image measured ε (gray values)."""

    min: float
    max: float
    mean: float
    sd: float


class CleanRow(Record):
    """Clean segmentation quality of one model on one evaluation set."""

    model: str
    seed: int
    dataset: str
    miou: float | None = Field(description="mIoU of eq. 9 in [0, 1]; null when the set has no labelled pixel")
    per_class_iou: list[float | None] = Field(default_factory=list, description="null: class absent (0/0)")
    note: str | None = Field(None, description="why a value is null")
    images: int | None = Field(None, description="images of the evaluation set behind the row")


class ResultRow(Record):
    """One (model, seed, dataset, perturbation, level) of a robustness sweep."""

    model: str
    seed: int
    dataset: str
    perturbation: str
    level_kind: str = Field("epsilon", description="'epsilon', or another sweep key such as 'severity'")
    level: float = Field(description="the sweep key: the requested ε, or e.g. a corruption's severity")
    epsilon: float | None = Field(description="requested RMS ε in gray values (eq. 7); null for another level")
    epsilon_measured: float = Field(description="RMS of x_adv - x over the whole set after clipping (eq. 7)")
    epsilon_measured_per_image: Spread | None = None
    miou: float | None = Field(description="mIoU under the perturbation (eq. 9), same units as the clean mIoU")
    miou_clean: float | None
    q: float | None = Field(description="Q = mIoU_adv / mIoU_clean (eq. 10)")
    changed: float | None = Field(None, description="share of the pixels whose predicted label differs from the "
                                                    "clean prediction (0 for a model that ignores its input)")
    per_class_iou: list[float | None] = Field(default_factory=list)
    attack: bool = Field(False, description="a gradient attack (or the worst case over them), not noise")
    seconds_sweep: float = 0.0
    backward_passes_per_batch: float = 0.0
    note: str | None = Field(None, description="why a value is null")

    @property
    def is_epsilon(self) -> bool:
        return self.level_kind == "epsilon"


#: the gradient-masking checks (``mtkit.evaluation.masking.masking_checks``) in report order: id → what passing means
SANITY_CHECKS = {
    "monotone": "mIoU does not rise with ε",
    "iterative_vs_fgsm": "iterative attacks ≥ FGSM",
    "unbounded": "unbounded attack → mIoU ≈ 0 (heuristic)",
    "attack_vs_noise": "gradient attacks ≥ Gaussian noise",
    "input_dependent": "predictions change under perturbation",
}


class SanityRow(Record):
    """One gradient-masking sanity check of one (model, seed, dataset) (``mtkit.evaluation.masking``)."""

    model: str
    seed: int
    dataset: str
    check: str = Field(description="a key of SANITY_CHECKS")
    passed: bool | None = Field(description="null: not applicable to this sweep (e.g. no FGSM to compare with)")
    detail: str = Field(description="the numbers behind the outcome")


class DepthRow(Record):
    """Depth metrics of one multi-task model on one set (KITTI Eigen protocol, see ``mtkit.evaluation.depth``)."""

    model: str
    seed: int
    dataset: str
    metrics: dict[str, float]
    images: int
    skipped: int = 0
    scale_median: float | None = None
    scale_std: float | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class TargetedRow(Record):
    """A targeted attack (``Perturbation.targeted``) on one set at one ε: the share of pixels that took their
    target, and for a dynamic target (hide a class) the share of the hidden class's pixels removed and of the other
    pixels kept (Metzen et al.'s two numbers); beside the mIoU and the measured ε of its robustness row."""

    model: str
    seed: int
    dataset: str
    perturbation: str
    epsilon: float
    epsilon_measured: float
    kind: str = Field(description="static | per_pixel | dynamic")
    success: float | None = Field(description="share of the pixels with a target that took it")
    success_clean: float | None = Field(None, description="the same share for the clean prediction: what the "
                                                          "target already agreed with before the attack")
    removed: float | None = Field(None, description="dynamic: share of the hidden class's pixels removed")
    kept: float | None = Field(None, description="dynamic: share of the other pixels whose label was kept")
    miou: float | None = None
    image_counts: list[list[int]] = Field(default_factory=list, description=(
        "per evaluated image, in index order: [image index, pixels that took their target, pixels with a target, "
        "hidden pixels removed, hidden pixels, other pixels kept, other pixels]: the report's cluster bootstrap "
        "over images resamples these"))
    clean_image_counts: list[list[int]] = Field(default_factory=list, description=(
        "the same counts for the clean prediction (what the target already agreed with)"))


class DetectionRow(Record):
    """The attack detector of one multi-task model on one evaluation set under one perturbation at one ε
    (``mtkit.ops.edge_consistency``): threshold fitted on the set's even-indexed clean images for ``fpr_target``; the
    rates, AUC and ROC curve from its odd-indexed images, clean and perturbed."""

    model: str
    seed: int
    dataset: str
    detector: str
    perturbation: str
    epsilon: float
    epsilon_measured: float = Field(description="RMS of the perturbations of the evaluated images (eq. 7)")
    fpr_target: float
    threshold: float
    fpr: float = Field(description="share of the held-out clean images flagged")
    detection_rate: float = Field(description="share of the perturbed images flagged")
    auc: float = Field(description="area under the ROC curve (clean vs perturbed scores)")
    images: int = Field(description="held-out images scored, clean and perturbed each")
    fit_images: int = Field(description="clean images the threshold was fitted on")
    miou_attacked: float | None = Field(None, description="mIoU of the perturbed held-out images")
    roc: list[tuple[float, float]] = Field(default_factory=list, description="(false-positive, true-positive) rate "
                                                                             "points of the ROC curve")
    seconds: float = 0.0


class DataRow(Record):
    """One prepared dataset a run read: how many samples, at which size, and the source items left out."""

    key: str
    name: str
    split: str
    samples: int
    height: int
    width: int
    skipped: int = 0
    skipped_items: list[str] = Field(default_factory=list, description="the first unreadable sources left out")
    folder: str


class ModelInfo(Record):
    tasks: list[str]
    lam: float = Field(alias="lambda")
    checkpoint: str | None = None
    #: an external network (``mtkit eval --model-factory``): its factory, e.g. package.module:function
    factory: str | None = None


class RunResults(Record):
    """Everything one run or evaluation produced."""

    schema_version: Literal[2] = SCHEMA_VERSION
    recipe_name: str = ""
    recipe_description: str = ""
    recipe_source: str | None = None
    seeds: list[int] = Field(default_factory=list)
    models: dict[str, ModelInfo] = Field(default_factory=dict)
    clean: list[CleanRow] = Field(default_factory=list)
    robustness: list[ResultRow] = Field(default_factory=list)
    depth: list[DepthRow] = Field(default_factory=list)
    detection: list[DetectionRow] = Field(default_factory=list, description="attack detection (detection section)")
    targeted: list[TargetedRow] = Field(default_factory=list, description="targeted attacks' success")
    sanity: list[SanityRow] = Field(default_factory=list, description="gradient-masking sanity checks")
    data: list[DataRow] = Field(default_factory=list)
    training: list[dict[str, Any]] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None
    epsilon_axis: Literal["requested", "measured", "both"] = Field(
        "requested", description="Figure 5's x axis (the recipe's robustness.epsilon_axis)")
    epsilon_meanings: dict[str, str] = Field(default_factory=dict, description=(
        "perturbation → what its requested ε is (an RMS, a bound: Perturbation.epsilon_meaning)"))

    def extend(self, other: RunResults) -> RunResults:
        self.models.update(other.models)
        self.epsilon_meanings.update(other.epsilon_meanings)
        self.clean += other.clean
        self.robustness += other.robustness
        self.depth += other.depth
        self.detection += other.detection
        self.targeted += other.targeted
        self.sanity += other.sanity
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> RunResults:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MtkitError(f"cannot read results {path}: {exc}") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise MtkitError(f"{path} holds results of schema version {version}, this mtkit reads version "
                             f"{SCHEMA_VERSION}: re-run the evaluation (mtkit run or mtkit eval)")
        return cls.model_validate(data)
