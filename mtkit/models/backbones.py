"""Encoders: any timm model that supports ``features_only``, by name, with local or timm weights."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import CheckpointError, MtkitError
from ..registry import register


class TimmEncoder(nn.Module):
    """A timm feature extractor returning one feature map per stage (strides 2, 4, 8, 16, 32 for ResNets)."""

    def __init__(self, name: str, pretrained: bool | str = False, in_chans: int = 3, **kwargs: object) -> None:
        super().__init__()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise MtkitError(f"unknown backbone '{name}': not a timm model{hint} (see timm.list_models())")
        use_timm_weights = pretrained is True
        try:
            self.body = timm.create_model(name, features_only=True, pretrained=use_timm_weights, in_chans=in_chans,
                                          **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise MtkitError(f"cannot build backbone '{name}' (features_only, kwargs {kwargs}): {exc}") from None
        self.name = name
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())
        if isinstance(pretrained, str) and pretrained:
            load_local_weights(self.body, Path(pretrained), in_chans)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (set model.pretrained to a .pth/.safetensors file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_local_weights(body: nn.Module, path: Path, in_chans: int = 3) -> None:
    """Load a classification or feature-extractor state dict into a timm ``features_only`` model.

    Classifier keys (``fc.*``, ``head.*``, ``classifier.*``) are ignored; a missing key or a shape mismatch
    raises an error naming the file and the first offending keys. A 3-channel first conv loaded into a model
    with more input channels is repeated and rescaled (timm's ``adapt_input_conv``: for 6 channels, duplicated
    and halved, as monodepth2's pose encoder).
    """
    state = _read_state_dict(path)
    own = body.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    extra = [k for k in state if k not in own and k.split(".")[0] not in ("fc", "head", "classifier", "global_pool")]
    missing = [k for k in own if k not in state]
    if missing or extra:
        raise CheckpointError(
            f"weights in {path} do not match backbone: missing keys {missing[:5]}"
            + (f", unexpected keys {extra[:5]}" if extra else "")
        )
    loaded = {}
    wrong = []
    for k, v in own.items():
        w = state[k]
        if w.shape != v.shape:
            if w.ndim == 4 and v.ndim == 4 and w.shape[1] == 3 and v.shape[1] == in_chans and w.shape[0] == v.shape[0]:
                from timm.models import adapt_input_conv

                w = adapt_input_conv(in_chans, w)
            else:
                wrong.append(f"{k}: file {tuple(w.shape)} vs model {tuple(v.shape)}")
                continue
        loaded[k] = w
    if wrong:
        raise CheckpointError(f"weights in {path} have mismatching shapes: {'; '.join(wrong[:5])}")
    body.load_state_dict(loaded, strict=True)


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


def build_backbone(name: str, pretrained: bool | str = False, in_chans: int = 3, **kwargs: object) -> nn.Module:
    """A registered backbone by name, else any timm model name (features_only)."""
    from ..plugins import get_registry

    registry = get_registry()
    if ("backbone", name) in registry:
        return registry.get("backbone", name)(name=name, pretrained=pretrained, in_chans=in_chans, **kwargs)
    if timm.is_model(name):
        return TimmEncoder(name, pretrained, in_chans, **kwargs)
    registry.get("backbone", name)  # raises with suggestions from the registry
    raise AssertionError  # pragma: no cover
