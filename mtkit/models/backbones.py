"""Encoders: any timm model that supports ``features_only``, by name, with timm's or local weights.

Local weights (``pretrained: PATH`` to a ``.pth`` or ``.safetensors`` classification or feature-extractor state
dict) are loaded by timm itself (``pretrained_cfg_overlay=dict(file=PATH)``), which also drops the classifier
and adapts a 3-channel first convolution to more input channels (the 6-channel pose encoder: duplicated and
halved, as monodepth2). mtkit adds one check timm leaves to a log line: the file's keys must match the
backbone, so that weights of another architecture are refused instead of half-loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError, MtkitError
from ..core.registry import register

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "global_pool.")


class TimmEncoder(nn.Module):
    """A timm feature extractor returning one feature map per stage (strides 2, 4, 8, 16, 32 for ResNets)."""

    def __init__(self, name: str, pretrained: bool | str = False, in_chans: int = 3, **kwargs: object) -> None:
        super().__init__()
        local = isinstance(pretrained, str) and bool(pretrained)
        if local and not Path(pretrained).is_file():
            raise CheckpointError(f"weights file not found: {pretrained} (set model.pretrained to a .pth or "
                                  ".safetensors file)")
        overlay = {"pretrained_cfg_overlay": {"file": str(pretrained)}} if local else {}
        import timm  # half a second to import: only when a model is built, not for mtkit list or show

        try:
            self.body = timm.create_model(name, features_only=True, pretrained=bool(pretrained), in_chans=in_chans,
                                          **overlay, **kwargs)
        except RuntimeError as exc:
            if local:
                raise CheckpointError(f"weights in {pretrained} do not fit backbone '{name}': "
                                      f"{_first_problem(str(exc))}") from None
            raise MtkitError(f"cannot build backbone '{name}' (features_only, kwargs {kwargs}): {exc}") from None
        except (TypeError, ValueError) as exc:
            raise MtkitError(f"cannot build backbone '{name}' (features_only, kwargs {kwargs}): {exc}") from None
        if local:
            check_keys(self.body, Path(pretrained), name)
        self.name = name
        self.channels: list[int] = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


def _first_problem(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else lines[0]


def check_keys(body: nn.Module, path: Path, name: str) -> None:
    """The weight file holds the backbone's parameters: no missing key, no key of another architecture."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # timm already read it once; a second failure is still the file's fault
        raise CheckpointError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = body.state_dict()
    extra = [k for k in state if k not in own and not k.startswith(CLASSIFIER_PREFIXES)]
    missing = [k for k in own if k not in state]
    if missing or extra:
        raise CheckpointError(f"weights in {path} do not match backbone '{name}': missing keys {missing[:5]}"
                              + (f", unexpected keys {extra[:5]}" if extra else ""))


@register("backbone", "timm")
def timm_backbone(name: str = "resnet18", pretrained: bool | str = False, in_chans: int = 3,
                  **kwargs: object) -> TimmEncoder:
    """Any timm model with features_only (the fallback for backbone names that are not registered)."""
    return TimmEncoder(name, pretrained, in_chans, **kwargs)


@register("backbone", "resnet18")
def resnet18(name: str = "resnet18", pretrained: bool | str = False, in_chans: int = 3,
             **kwargs: object) -> TimmEncoder:
    """ResNet18 from timm (the paper's encoder)."""
    return TimmEncoder("resnet18", pretrained, in_chans, **kwargs)


@register("backbone", "resnet50")
def resnet50(name: str = "resnet50", pretrained: bool | str = False, in_chans: int = 3,
             **kwargs: object) -> TimmEncoder:
    """ResNet50 from timm."""
    return TimmEncoder("resnet50", pretrained, in_chans, **kwargs)
