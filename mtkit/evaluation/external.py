"""Bring your own network: any ``nn.Module`` that maps images to per-pixel logits, made to speak mtkit's
convention (gray values 0..255 in, logits over the dataset's classes at the label size out), so that the paper's
SNR-equal perturbations, mIoU and Q apply to it unchanged.

Preprocessing is declared, never guessed (``InputSpec``): attacks always act on gray values, so ε stays the
paper's RMS in gray values whatever the model expects. The output adapter takes dict outputs (torchvision's
``out``), tuples, logits at a lower resolution (upsampled bilinearly to the label size) and a class map when the
model's classes differ from the dataset's.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..core.errors import CheckpointError, MtkitError
from ..plugins.manager import get_registry


class InputSpec(BaseModel):
    """What the model expects: ``range`` gray (0..255) or unit ([0, 1]), then (x - mean) / std per channel in
    that range (none: no normalisation). ImageNet statistics in the unit range: mean (0.485, 0.456, 0.406),
    std (0.229, 0.224, 0.225)."""

    model_config = ConfigDict(extra="forbid")

    range: Literal["gray", "unit"] = "gray"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = Field(None, description="required with mean")


class OutputSpec(BaseModel):
    """How to read the model's output: ``key`` of a dict output (default "out", torchvision's; a single-entry
    dict needs none), ``class_map`` = for each dataset class, the model's output channel (none: the channels are
    the dataset's classes)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    class_map: list[int] | None = None


class ExternalSegmenter(nn.Module):
    """``model`` behind mtkit's convention: gray values in, (N, num_classes, H, W) logits at the input size out."""

    def __init__(self, model: nn.Module, num_classes: int, inputs: InputSpec | None = None,
                 outputs: OutputSpec | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.inputs = inputs or InputSpec()
        self.outputs = outputs or OutputSpec()
        if (self.inputs.mean is None) != (self.inputs.std is None):
            raise MtkitError("give mean and std together (the model's normalisation), or neither")
        if self.outputs.class_map is not None and len(self.outputs.class_map) != num_classes:
            raise MtkitError(f"class_map has {len(self.outputs.class_map)} entries; it needs one model channel "
                             f"for each of the dataset's {num_classes} classes")
        stats = [torch.tensor(v).view(1, 3, 1, 1) if v else torch.zeros(0) for v in (self.inputs.mean,
                                                                                   self.inputs.std)]
        self.register_buffer("mean", stats[0], persistent=False)
        self.register_buffer("std", stats[1], persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Gray values → the model's declared input."""
        z = x / 255.0 if self.inputs.range == "unit" else x
        return (z - self.mean) / self.std if self.mean.numel() else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adapt_output(self.model(self.preprocess(x)), x.shape, self.num_classes, self.outputs)


def adapt_output(out: Any, input_shape: Sequence[int], num_classes: int, spec: OutputSpec) -> torch.Tensor:
    """A model's raw output as (N, num_classes, H, W) logits at the input's size (see ``OutputSpec``)."""
    if isinstance(out, dict):
        key = spec.key or ("out" if "out" in out else next(iter(out)) if len(out) == 1 else None)
        if key not in out:
            raise MtkitError(f"the model returns a dict with keys {list(out)}; name the logits with the output key "
                             "(--output-key / OutputSpec.key)")
        out = out[key]
    elif isinstance(out, tuple | list):
        out = out[0]
    n, _, h, w = input_shape
    labels = f"the labels ({n}, {h}, {w}) with {num_classes} classes"
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MtkitError(f"the model's output {shape} does not fit {labels}: a segmentation model must return "
                         "per-pixel logits (N, classes, H, W)")
    if spec.class_map is not None:
        if max(spec.class_map) >= out.shape[1]:
            raise MtkitError(f"class_map names channel {max(spec.class_map)}, but the model's output "
                             f"{tuple(out.shape)} has {out.shape[1]} channels")
        out = out[:, spec.class_map]
    if out.shape[1] != num_classes:
        raise MtkitError(f"the model's output {tuple(out.shape)} does not fit {labels}: give a class_map "
                         f"(--class-map) from the dataset's classes to the model's {out.shape[1]} channels")
    if tuple(out.shape[-2:]) != (h, w):
        if out.shape[-2] > h or out.shape[-1] > w:
            raise MtkitError(f"the model's output {tuple(out.shape)} is larger than {labels}")
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out


def import_factory(spec: str) -> Callable[..., Any]:
    """``package.module:function`` (or a ``model`` entry of the registry, added by a plugin)."""
    if ":" not in spec:
        reg = get_registry()
        if ("model", spec) not in reg:
            raise MtkitError(f"model factory '{spec}': give package.module:function, or the name of a registered "
                             f"model (mtkit list model: {', '.join(reg.names('model')) or 'none registered'})")
        return reg.get("model", spec)
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MtkitError(f"model factory '{spec}': cannot import {module} ({exc})") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise MtkitError(f"model factory '{spec}': {module} has no '{attr}'")
    if not callable(fn):
        raise MtkitError(f"model factory '{spec}' is not callable")
    return fn


def build_external(factory: str, kwargs: dict[str, Any] | str | None = None, weights: str | Path | None = None
                   ) -> nn.Module:
    """Call ``factory`` with ``kwargs`` (a dict, or JSON text) and load ``weights`` (a state dict, alone or under
    "state_dict" / "model", read with ``weights_only=True``)."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError as exc:
            raise MtkitError(f"--model-kwargs is not JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise MtkitError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 19}'")
    try:
        model = import_factory(factory)(**(kwargs or {}))
    except MtkitError:
        raise
    except Exception as exc:
        raise MtkitError(f"model factory '{factory}' failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise MtkitError(f"model factory '{factory}' returned an object of type {type(model).__name__}, not a "
                         "torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {path} with weights_only=True: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model: {str(exc)[:300]}") from None


def has_gradient_path(segmenter: nn.Module, x: torch.Tensor) -> bool:
    """Whether the logits depend differentiably on the input (an exported, quantized or no_grad model does not)."""
    x = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = segmenter(x)
    if not out.requires_grad:
        return False
    (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
    return grad is not None
