"""The recipe schema: typed config objects that a recipe file is validated into (``mtkit.recipe`` loads them).

Every key is read by some part of mtkit; an unknown key is an error. Options of registry entries (datasets,
perturbations) are declared by the entries themselves and validated when the recipe loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

PAPER_EPSILONS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


class Strict(BaseModel):
    # every number of a recipe is finite: `train.lr: inf` is as wrong as `nan`
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False)


def plain_name(value: str) -> str:
    """A name that becomes a folder or file name: not empty, no path separator, not "." or ".."."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\x00"):
        raise ValueError(f"'{value}' is not a plain name: use letters, digits and - _ . without path separators "
                         "or '..' (it names a folder)")
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]


class DatasetConfig(Strict):
    """One dataset: a registered loader, its root on disk and the split and resolution to load."""

    name: str
    root: str | None = Field(None, description="folder; null: the dataset's environment variable or cache")
    split: str = "train"
    height: int = Field(192, gt=0)
    width: int = Field(640, gt=0)
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    options: dict[str, Any] = Field(default_factory=dict)


class AugmentConfig(Strict):
    """The paper's training augmentation (sec. 4)."""

    hflip: bool = True
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)


class DataConfig(Strict):
    segmentation: DatasetConfig
    segmentation_val: DatasetConfig
    depth: DatasetConfig | None = None
    eval: dict[str, DatasetConfig] = Field(default_factory=dict, description="key (e.g. CS, K) -> dataset")
    depth_eval: dict[str, DatasetConfig] = Field(
        default_factory=dict, description="key (e.g. Eigen) -> dataset with ground-truth depth, for multi-task models")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    num_workers: int | None = Field(None, ge=0, description="loader and prepare processes; null: one per core")
    pin_memory: bool | Literal["auto"] = Field("auto", description="auto: on when training on a GPU")
    persistent_workers: bool = Field(True, description="keep loader workers alive between epochs")


class ModelConfig(Strict):
    backbone: str = "resnet18"
    pretrained: bool | str = False
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model args")
    head: str = "monodepth2"
    depth_head: str = "monodepth2_depth"
    num_classes: int = Field(19, gt=1)
    min_depth: float = Field(0.1, gt=0)
    max_depth: float = Field(100.0, gt=0)
    pose_backbone: str = "resnet18"
    pose_pretrained: bool | str = False
    # zero-mean normalization inside the model; inputs are gray values 0..255
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @model_validator(mode="after")
    def _depth_range(self) -> ModelConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be below max_depth ({self.max_depth})")
        return self


class LossConfig(Strict):
    segmentation: str = "weighted_ce"
    depth: str = "monodepth"
    class_weights: Literal["enet", "none"] | list[float] = "enet"
    ssim_alpha: float = Field(0.85, ge=0, le=1)
    smoothness: float = Field(1e-3, ge=0)
    num_scales: int = Field(4, ge=1, le=4)
    automask: bool = False
    edge_consistency: float = Field(0.0, ge=0, description="weight of the edge consistency loss of multi-task "
                                                           "models (Klingner et al., IROS 2022): the segmentation's "
                                                           "and the disparity's edges against the image's; 0: off "
                                                           "(the paper's training)")


class TrainConfig(Strict):
    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_drop_epochs: list[PositiveInt] = Field(default_factory=lambda: [30])
    lr_drop_factor: float = Field(0.1, gt=0)
    batch_size: int = Field(12, ge=1, description="single-task segmentation batch")
    seg_batch_size: int = Field(6, ge=1, description="multi-task: segmentation samples per step")
    depth_batch_size: int = Field(6, ge=1, description="multi-task: depth samples per step")
    steps_per_epoch: int | None = Field(None, ge=1, description="null: one pass over the segmentation set")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="autocast dtype; auto: bf16 on CUDA, "
                                                        "fp32 on the CPU; fp16 adds a gradient scaler")
    channels_last: bool | Literal["auto"] = Field("auto", description="auto: on CUDA")
    compile: bool | str = Field(False, description="torch.compile: true (inductor) or a backend name, e.g. aot_eager")
    tf32: bool = Field(True, description="CUDA: fp32 matmuls and convolutions may use TF32 (the forward runs in "
                                         "bf16 under amp anyway)")
    deterministic: bool = Field(False, description="CUDA: deterministic cuDNN/cuBLAS, cudnn.benchmark off (slower); "
                                                   "grid_sample's backward stays nondeterministic on CUDA")
    grad_clip: PositiveFloat | None = Field(None, description="max gradient norm; null: no clipping")
    log_every: int = Field(10, ge=1)
    tensorboard: bool = False
    checkpoint_every: int = Field(0, ge=0, description="also save every N steps (0: only per epoch)")


class ModelSpec(Strict):
    """One model of the experiment: single-task (segmentation) or multi-task (segmentation + depth)."""

    name: PlainName = Field(description="a plain name (it names the model's folders)")
    tasks: list[str] = Field(default_factory=lambda: ["segmentation"])
    lam: float = Field(None, alias="lambda", ge=0, le=1, validate_default=False,
                       description="eq. 5 gradient scale; required for a multi-task model (the paper's: 0.1)")
    task_scales: dict[str, float] = Field(default_factory=dict,
                                          description="plugin task -> encoder gradient scale (default 1-λ)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if "segmentation" not in v:
            raise ValueError("every model needs the 'segmentation' task (it is what robustness evaluates)")
        return v

    @model_validator(mode="after")
    def _lambda(self) -> ModelSpec:
        if self.lam is None:
            if len(self.tasks) > 1:
                raise ValueError(f"model '{self.name}' has the tasks {self.tasks} but no lambda: give the eq. 5 "
                                 "gradient scale, e.g. lambda: 0.1 (the paper's best)")
            self.lam = 1.0
        return self

    @model_validator(mode="after")
    def _scales(self) -> ModelSpec:
        unknown = sorted(set(self.task_scales) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_scales names {unknown}, which are not among the model's tasks {self.tasks}")
        return self


class SanityConfig(Strict):
    """Gradient-masking sanity checks (Carlini et al. 2019), run with every sweep that has a gradient attack:
    mIoU does not rise with ε, an iterative attack is at least as strong as FGSM, an unbounded attack drives mIoU
    to about zero, a gradient attack is at least as strong as Gaussian noise. A failure is flagged in the
    report's verdict: the numbers under attack may overstate robustness."""

    enabled: bool = True
    iterations: PositiveInt = Field(10, description="APGD iterations of the unbounded (ε = 255) attack")
    tolerance: float = Field(1.0, ge=0, description="mIoU points [%] a comparison may miss by before it fails")
    near_zero: float = Field(5.0, ge=0, le=100, description="the most mIoU [%] the unbounded attack may leave")


def check_epsilons(v: list[float]) -> list[float]:
    """An ε list: non-empty, positive, finite, each strength once; sorted."""
    if not v:
        raise ValueError("the ε list is empty: give at least one strength, e.g. [0.25, 0.5, 1, 2, 4, 8, 16]")
    bad = [e for e in v if not e > 0]
    if bad:
        raise ValueError(f"ε must be positive gray values, got {bad}")
    if not all(math.isfinite(e) for e in v):
        raise ValueError(f"ε must be finite gray values (the RMS of a perturbation of 0..255 images), got {v}")
    twice = sorted({e for e in v if v.count(e) > 1})
    if twice:
        raise ValueError(f"ε {twice} listed more than once: give each strength once, e.g. {sorted(set(v))}")
    return sorted(v)


class RobustnessConfig(Strict):
    perturbations: list[str] = Field(default_factory=lambda: ["gaussian", "salt_pepper", "fgsm", "pgd"])
    epsilons: list[float] = Field(default_factory=lambda: list(PAPER_EPSILONS))
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

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        return check_epsilons(v)


class DetectionConfig(Strict):
    """Attack detection (``mtkit.detection``) for every multi-task model: the detector's threshold is fitted on
    the clean images of each evaluation set with an even index (0, 2, 4, …) for the target false-positive rate;
    the detection rate, the measured false-positive rate and the ROC curve come from the odd-indexed images,
    clean and perturbed."""

    enabled: bool = False
    detector: PlainName = "edge_consistency"
    options: dict[str, Any] = Field(default_factory=dict, description="the detector's options")
    fpr: float = Field(0.05, gt=0, lt=1, description="target false-positive rate on clean images")
    perturbations: list[str] | None = Field(None, description="null: robustness.perturbations")
    epsilons: list[float] | None = Field(None, description="null: robustness.epsilons")
    datasets: list[str] | None = Field(None, description="keys of data.eval; null: robustness.datasets")
    batch_size: PositiveInt = 8

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else check_epsilons(v)


class DepthEvaluationConfig(Strict):
    """The depth evaluation protocol (monodepth2 / SGDepth on the KITTI Eigen split)."""

    min_depth: float = Field(1e-3, gt=0, description="ground truth and predictions are capped to [min, max] m")
    max_depth: float = Field(80.0, gt=0)
    garg_crop: bool = True
    median_scaling: bool = Field(True, description="per-image median scaling (monocular models)")
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _range(self) -> DepthEvaluationConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be below max_depth ({self.max_depth})")
        return self


class Recipe(Strict):
    name: PlainName = Field(description="the run folder's name under output_dir: a plain name, no path separators "
                                        "and no '..' (output_dir and --out may be any folder)")
    description: str = ""
    seed: int = 0
    seeds: list[int] | None = Field(None, min_length=1, description="null: [seed]")
    output_dir: str = "runs"
    device: str = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    models: list[ModelSpec] = Field(min_length=1)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    depth_evaluation: DepthEvaluationConfig = Field(default_factory=DepthEvaluationConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    source: str | None = Field(None, description="set by the loader: the recipe file")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"'{v}' is not a device: use auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if any("depth" in m.tasks for m in self.models) and self.data.depth is None:
            raise ValueError("a model has the 'depth' task but data.depth is not set")
        if self.robustness.datasets:
            missing = [k for k in self.robustness.datasets if k not in self.data.eval]
            if missing:
                raise ValueError(f"robustness.datasets names {missing}, not keys of data.eval {list(self.data.eval)}")
        missing = [k for k in self.detection.datasets or () if k not in self.data.eval]
        if missing:
            raise ValueError(f"detection.datasets names {missing}, not keys of data.eval {list(self.data.eval)}")
        return self

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude={"source"})


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able config pieces (stage caching)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def expand_root(root: str | None, env_var: str | None) -> str | None:
    """A dataset root with ``~`` and ``$VARS`` expanded; null falls back to ``env_var``."""
    if root is None and env_var:
        root = os.environ.get(env_var)
    if root is None:
        return None
    return os.path.expanduser(os.path.expandvars(root))
