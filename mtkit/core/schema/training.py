"""The network, its losses, its optimisation, and the models a recipe trains (sec. 3-4 of the paper)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from ..errors import MtkitWarning
from .base import PlainName, Strict


class ModelConfig(Strict):
    """The network: a timm encoder shared by the task decoders (sec. 3.1), the depth range and the input
    normalisation."""

    backbone: str = "resnet18"
    """the shared encoder: any timm model name that supports features_only (the paper: resnet18)"""
    pretrained: bool | str = False
    """encoder weights: false, true (timm's pretrained weights) or the path of a .pth/.safetensors file"""
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model args")
    head: str = "monodepth2"
    """the segmentation decoder (registry kind 'head')"""
    depth_head: str = "monodepth2_depth"
    """the depth decoder of multi-task models (registry kind 'head'): the segmentation decoder's architecture with a
    sigmoid disparity output"""
    num_classes: int = Field(19, gt=1)
    """segmentation classes (Cityscapes trainIds: 19)"""
    min_depth: float = Field(0.1, gt=0)
    """depth of the largest disparity, in metres: depth = 1/(aσ+b) lies in [min_depth, max_depth]"""
    max_depth: float = Field(100.0, gt=0)
    """depth of the smallest disparity, in metres"""
    pose_backbone: str = "resnet18"
    """the pose network's encoder (timm name), which sees two stacked frames"""
    pose_pretrained: bool | str = False
    """pose encoder weights: false, true (timm's pretrained weights) or the path of a weights file"""
    # zero-mean normalization inside the model; inputs are gray values 0..255
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    """per-channel mean in gray values subtracted inside the model (inputs are gray values 0..255)"""
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    """per-channel standard deviation in gray values the model divides by"""

    @model_validator(mode="after")
    def _depth_range(self) -> ModelConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be below max_depth ({self.max_depth})")
        return self


class LossConfig(Strict):
    """The training losses: segmentation (eq. 1), self-supervised depth (eq. 2-4) and their settings."""

    segmentation: str = "weighted_ce"
    """the segmentation loss (registry kind 'loss'): weighted_ce is J^ce of eq. 1; also the loss gradient attacks
    attack"""
    depth: str = "monodepth"
    """the self-supervised depth loss (registry kind 'loss'): monodepth is eq. 2-4"""
    class_weights: Literal["enet", "none"] | list[float] = "enet"
    """class weights of eq. 1: enet (ENet's 1/ln(1.02 + p_s) from the training labels), none, or one weight per class"""
    ssim_alpha: float = Field(0.85, ge=0, le=1)
    """α of eq. 3: the SSIM share of the photometric error (1 - α: L1)"""
    smoothness: float = Field(1e-3, ge=0)
    """β of eq. 4: weight of the edge-aware smoothness term"""
    num_scales: int = Field(4, ge=1, le=4)
    """decoder scales the depth loss is taken at (the paper: 4)"""
    automask: bool = False
    """monodepth2's identity reprojection in the minimum of eq. 2 (off in the paper)"""
    edge_consistency: float = Field(0.0, ge=0, description="weight of the edge consistency loss of multi-task "
                                                           "models (Klingner et al., IROS 2022): the segmentation's "
                                                           "and the disparity's edges against the image's; 0: off "
                                                           "(the paper's training)")


class TrainConfig(Strict):
    """The optimisation (sec. 4): Adam, the learning-rate schedule, batches, precision and logging."""

    epochs: int = Field(40, ge=1)
    """epochs of training (one epoch: one pass over the segmentation set, or steps_per_epoch steps)"""
    lr: float = Field(1e-4, gt=0)
    """Adam's learning rate"""
    lr_drop_epochs: list[PositiveInt] = Field(default_factory=lambda: [30])
    """epochs after which the learning rate is multiplied by lr_drop_factor"""
    lr_drop_factor: float = Field(0.1, gt=0)
    """factor of each learning-rate drop"""
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
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="capture the step's forward, losses and backward as CUDA graphs and replay them "
                            "(torch.compile mode reduce-overhead: ~1,100 kernel launches a step become a few replays); "
                            "auto: on for one CUDA process (the training crops have static shapes), off under DDP "
                            "and on the CPU; true on a CPU is an error")
    grad_clip: PositiveFloat | None = Field(None, description="max gradient norm; null: no clipping")
    log_every: int = Field(10, ge=1)
    """write the loss terms to metrics.jsonl every N steps"""
    tensorboard: bool = False
    """mirror metrics.jsonl to TensorBoard (pip install mtkit[tensorboard])"""
    checkpoint_every: int = Field(0, ge=0, description="also save every N steps (0: only per epoch)")

    @model_validator(mode="after")
    def _milestones(self) -> TrainConfig:
        late = [e for e in self.lr_drop_epochs if e >= self.epochs]
        if late:
            warnings.warn(MtkitWarning(
                f"train.lr_drop_epochs {late} lie at or beyond train.epochs ({self.epochs}): the learning rate never "
                + (f"drops there (drops happen after epochs 1..{self.epochs - 1})" if self.epochs > 1 else
                   "drops in a run of one epoch")), stacklevel=2)
        return self


class ModelSpec(Strict):
    """One model of the experiment: single-task (segmentation) or multi-task (segmentation + depth)."""

    name: PlainName = Field(description="a plain name (it names the model's folders)")
    tasks: list[str] = Field(default_factory=lambda: ["segmentation"])
    """segmentation, and depth for a multi-task model, or tasks that plugins add"""
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
