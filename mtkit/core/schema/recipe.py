"""The recipe: a whole experiment, validated from its YAML file (``mtkit.recipe.load``)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from .base import PlainName, Strict
from .data import DataConfig, DatasetConfig
from .evaluation import DepthEvaluationConfig, DetectionConfig, RobustnessConfig
from .launcher import LauncherConfig
from .training import LossConfig, ModelConfig, ModelSpec, TrainConfig


class Recipe(Strict):
    """A whole experiment: the model, data, losses, training, the models to compare and their evaluations."""

    name: PlainName = Field(description="the run folder's name under output_dir: a plain name, no path separators "
                                        "and no '..' (output_dir and --out may be any folder)")
    description: str = ""
    """one line the report shows under the recipe's name"""
    seed: int = 0
    """the seed of a one-seed run (initial weights, data order, augmentation, evaluation noise)"""
    seeds: list[int] | None = Field(None, min_length=1, description="null: [seed]")
    output_dir: str = "runs"
    """folder the run folder <output_dir>/<name> is made in (--out overrides it)"""
    device: str = "auto"
    """auto (the first GPU, else the CPU), cpu, cuda or cuda:N"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """the network shared by every model of the run"""
    data: DataConfig
    """the datasets: training, validation, evaluation and depth evaluation"""
    loss: LossConfig = Field(default_factory=LossConfig)
    """the training losses (eq. 1-4)"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """the optimisation: epochs, learning rate, batches, precision"""
    models: list[ModelSpec] = Field(min_length=1)
    """the models to train and compare: single-task and multi-task with their λ of eq. 5"""
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    """the robustness evaluation: perturbations, ε and how the sweep runs"""
    depth_evaluation: DepthEvaluationConfig = Field(default_factory=DepthEvaluationConfig)
    """the depth evaluation protocol of multi-task models"""
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    """attack detection by edge consistency (off by default)"""
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    """where the run's (model, seed) units run: this machine or a SLURM cluster (mtkit run --launcher)"""
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

    def datasets(self, used_only: bool = True) -> dict[str, DatasetConfig]:
        """Every dataset of the recipe by its key (``data.segmentation``, ``data.eval.CS``, ...): the one rule that
        preparing, checking and validating follow. ``used_only`` leaves out the depth sets when no model has the
        depth task (they are then neither read nor needed)."""
        d = self.data
        depth = not used_only or any("depth" in m.tasks for m in self.models)
        out = {"data.segmentation": d.segmentation, "data.segmentation_val": d.segmentation_val}
        if d.depth is not None and depth:
            out["data.depth"] = d.depth
        out.update({f"data.eval.{k}": v for k, v in d.eval.items()})
        if depth:
            out.update({f"data.depth_eval.{k}": v for k, v in d.depth_eval.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude={"source"})
