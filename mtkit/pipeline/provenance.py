"""What a run records of where it ran: versions, the machine, the git commit, and the math policy of each
phase (autocast dtype, channels_last, compile, TF32, cudnn.benchmark, determinism)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..core.precision import resolve_precision
from ..core.schema import Recipe


def math_policy(recipe: Recipe, device: str) -> dict[str, Any]:
    """What each phase runs in on ``device`` (``precision.resolve_precision`` and ``precision.math_mode``): autocast
    dtype, channels_last, compile, TF32, cudnn.benchmark and determinism."""
    dev = torch.device(device)
    t, r = recipe.train, recipe.robustness
    out = {}
    for phase, keys, deterministic in (("train", t, t.deterministic), ("evaluation", r, False)):
        p = resolve_precision(keys.amp, keys.channels_last, keys.compile, dev, phase, keys.tf32)
        cuda = dev.type == "cuda"
        out[phase] = {"amp": str(p.dtype).replace("torch.", "") if p.dtype else "fp32",
                      "channels_last": p.channels_last, "compile": p.compile,
                      "tf32": p.tf32 and cuda, "cudnn_benchmark": cuda and not deterministic,
                      "deterministic": deterministic if cuda else True}
    return out


def environment(device: str, recipe: Recipe | None = None) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("mtkit", "torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy", "pluggy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "device": device, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda_version": torch.version.cuda, "gpu_count": torch.cuda.device_count(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": commit,
            **({"math": math_policy(recipe, device)} if recipe is not None else {})}


