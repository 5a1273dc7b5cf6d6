"""Recipes: YAML files validated into typed config objects before anything runs.

A recipe may ``extends: other.yaml`` (path relative to the recipe; mappings merge key by key, lists and scalars
are replaced) and the CLI may override any key with ``-o dotted.key=value`` (the value is parsed as YAML).
Validation errors name the file, the dotted key path and what was expected, with suggestions for misspellings.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

PAPER_EPSILONS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


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
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    num_workers: int = Field(0, ge=0)


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


class TrainConfig(Strict):
    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_drop_epochs: list[int] = Field(default_factory=lambda: [30])
    lr_drop_factor: float = Field(0.1, gt=0)
    batch_size: int = Field(12, ge=1, description="single-task segmentation batch")
    seg_batch_size: int = Field(6, ge=1, description="multi-task: segmentation samples per step")
    depth_batch_size: int = Field(6, ge=1, description="multi-task: depth samples per step")
    steps_per_epoch: int | None = Field(None, ge=1, description="null: one pass over the segmentation set")
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    grad_clip: float | None = None
    log_every: int = Field(10, ge=1)
    tensorboard: bool = False
    checkpoint_every: int = Field(0, ge=0, description="also save every N steps (0: only per epoch)")


class ModelSpec(Strict):
    """One model of the experiment: single-task (segmentation) or multi-task (segmentation + depth)."""

    name: str
    tasks: list[str] = Field(default_factory=lambda: ["segmentation"])
    lam: float = Field(1.0, alias="lambda", ge=0, le=1, description="eq. 5 gradient scale")
    task_scales: dict[str, float] = Field(default_factory=dict,
                                          description="plugin task -> encoder gradient scale (default 1-λ)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if "segmentation" not in v:
            raise ValueError("every model needs the 'segmentation' task (it is what robustness evaluates)")
        return v

    @model_validator(mode="after")
    def _scales(self) -> ModelSpec:
        unknown = sorted(set(self.task_scales) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_scales names {unknown}, which are not among the model's tasks {self.tasks}")
        return self


class RobustnessConfig(Strict):
    perturbations: list[str] = Field(default_factory=lambda: ["gaussian", "salt_pepper", "fgsm", "pgd"])
    epsilons: list[float] = Field(default_factory=lambda: list(PAPER_EPSILONS))
    batch_size: int = Field(8, ge=1)
    datasets: list[str] | None = Field(None, description="keys of data.eval; null: all")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="perturbation -> kwargs")

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("the ε list is empty: give at least one strength, e.g. [0.25, 0.5, 1, 2, 4, 8, 16]")
        bad = [e for e in v if not e > 0]
        if bad:
            raise ValueError(f"ε must be positive gray values, got {bad}")
        return sorted(v)


class Recipe(Strict):
    name: str
    description: str = ""
    seed: int = 0
    seeds: list[int] | None = None
    output_dir: str = "runs"
    device: str = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    models: list[ModelSpec]
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    source: str | None = Field(None, description="set by the loader: the recipe file")

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
        return self

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude={"source"})


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able config pieces (stage caching)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- loading

def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's merged mapping (``extends`` resolved), before validation."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: key 'extends' expected a file name (string), got {parent!r}")
    base = load_raw(path.parent / parent, (*_seen, path))
    return _deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like dotted.key=value, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override '{text}': empty key path")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    # YAML reads "1e-4" as a string: accept float-looking strings as floats
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            pass
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, k, keys[: i + 1], text)]
                continue
            if k not in node or not isinstance(node[k], dict | list):
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, keys, text)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, k: str, path: list[str], text: str) -> int:
    if not k.lstrip("-").isdigit() or not -len(node) <= int(k) < len(node):
        raise RecipeError(f"override '{text}': '{'.'.join(path)}' needs a list index below {len(node)}")
    return int(k)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names (with aliases) of the model at ``loc`` for suggestions."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        fields = cls.model_fields
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f.alias or n for n, f in cls.model_fields.items() if n != "source"]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _fields_at(Recipe, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            lines.append(f"unknown key '{path}'{hint} (allowed here: {', '.join(known)})")
        elif kind == "missing":
            lines.append(f"missing required key '{path}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"key '{path}': {msg}{got_s}")
    head = f"{source}: invalid recipe: "
    return head + lines[0] if len(lines) == 1 else head + "; ".join(lines)


def validate(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge (``extends``), override (``-o``) and validate a recipe file."""
    data = apply_overrides(load_raw(path), list(overrides))
    return validate(data, str(path))


def expand_root(root: str | None, env_var: str | None) -> str | None:
    """A dataset root with ``~`` and ``$VARS`` expanded; null falls back to ``env_var``."""
    if root is None and env_var:
        root = os.environ.get(env_var)
    if root is None:
        return None
    return os.path.expanduser(os.path.expandvars(root))
