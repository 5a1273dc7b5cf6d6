"""mtkit-corruptions: the common image corruptions (Hendrycks & Dietterich 2019) as mtkit perturbations.

Each corruption is registered as ``corrupt_<name>``. Its sweep runs over severities 1-5 (``level_kind =
"severity"``); the evaluation records the measured RMS ε of every severity (eq. 7), which puts the corruptions on
the paper's SNR axis.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch

from mtkit import hookimpl
from mtkit.errors import MtkitError
from mtkit.perturbations import AttackContext, Perturbation, clip_image

__version__ = "0.1.0"

SEVERITIES = (1, 2, 3, 4, 5)


@functools.cache
def _imagecorruptions():
    """Import imagecorruptions with two narrow compatibility shims for NumPy 2 / scikit-image >= 0.19."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation warning
        import imagecorruptions
        from imagecorruptions import corruptions
    if not hasattr(np, "float_"):  # fog: np.float_ was removed in NumPy 2.0
        np.float_ = np.float64  # type: ignore[attr-defined]
    original = corruptions.gaussian

    def gaussian(image, sigma=1, *args, multichannel=None, **kwargs):  # glass_blur, gaussian_blur
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return original(image, sigma, *args, **kwargs)

    corruptions.gaussian = gaussian  # once: this function is cached
    return imagecorruptions


def corruption_names() -> list[str]:
    return list(_imagecorruptions().get_corruption_names("all"))


def corrupt_batch(x: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """Corrupt a batch (B, 3, H, W) of gray values 0..255 with ``imagecorruptions.corrupt`` at ``severity``.

    The package draws from NumPy's global generator: it is seeded from ``seed`` and restored afterwards.
    """
    ic = _imagecorruptions()
    images = x.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        out = []
        for img in images:
            c = np.asarray(ic.corrupt(np.ascontiguousarray(img), corruption_name=name, severity=severity))
            if c.shape[:2] != img.shape[:2]:  # a few corruptions round the size: crop or pad back
                c = _fit(c, img.shape[:2])
            out.append(c.astype(np.float32))
    finally:
        np.random.set_state(state)
    return clip_image(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype))


def _fit(c: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    c = c[:h, :w]
    return np.pad(c, ((0, h - c.shape[0]), (0, w - c.shape[1]), (0, 0)), mode="edge")


class Corruption(Perturbation):
    """One common corruption at severities 1-5; ε is measured (eq. 7), not requested."""

    level_kind = "severity"
    corruption = ""

    def __init__(self, severities: list[int] | None = None) -> None:
        sev = list(SEVERITIES if severities is None else severities)
        bad = [s for s in sev if s not in SEVERITIES]
        if bad or not sev:
            raise MtkitError(f"{self.corruption}: severities must be among 1-5, got {severities}")
        self.severities = sev

    def levels(self, epsilons: list[float]) -> list[float]:
        return [float(s) for s in self.severities]

    def sweep(self, ctx: AttackContext, x: torch.Tensor, y: Any, epsilons: list[float]) -> dict[float, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        return {float(s): corrupt_batch(x, self.corruption, s, seed + s) for s in self.severities}


def corruption_class(name: str) -> type[Corruption]:
    doc = f"Corruption {name!r} (imagecorruptions), severities 1-5, ε measured."
    return type(f"Corrupt_{name}", (Corruption,), {"corruption": name, "__doc__": doc, "__module__": __name__})


@hookimpl
def mtkit_register(registry) -> None:
    for name in corruption_names():
        registry.add("perturbation", f"corrupt_{name}", corruption_class(name))
