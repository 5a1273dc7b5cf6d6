"""mtkit-corruptions: the common image corruptions (Hendrycks & Dietterich 2019) as mtkit perturbations.

Each corruption is registered as ``corrupt_<name>``. Its sweep runs over severities 1-5 (``level_kind =
"severity"``); the evaluation records the measured RMS ε of every severity (eq. 7), which puts the corruptions on
the paper's SNR axis.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
import torch

from mtkit.plugin_api import (
    AttackContext,
    Field,
    Perturbation,
    PerturbationOptions,
    RegistryView,
    clip_image,
    hookimpl,
)

__version__ = "0.1.0"

SEVERITIES = (1, 2, 3, 4, 5)


@functools.cache
def _imagecorruptions():
    """The imagecorruptions package (imported on first use, its pkg_resources warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation warning
        import imagecorruptions
    return imagecorruptions


@contextlib.contextmanager
def _compat() -> Iterator[None]:
    """Three narrow compatibility shims for NumPy 2 / scikit-image >= 0.19, in force only while a corruption runs
    and undone afterwards (no global state changes at import or registration): ``np.float_`` for fog,
    ``multichannel`` → ``channel_axis`` for skimage's gaussian in glass_blur and gaussian_blur, and
    ``random_noise`` (impulse_noise) seeded from NumPy's global generator, as imagecorruptions expects."""
    import skimage.util
    from imagecorruptions import corruptions

    original = corruptions.gaussian
    original_noise = skimage.util.random_noise

    def random_noise(image, mode="gaussian", rng=None, **kwargs):
        # imagecorruptions seeds NumPy's global generator, which scikit-image >= 0.19 no longer reads: without a
        # seed from it, impulse_noise drew fresh entropy on every call (not reproducible, not per image)
        if rng is None:
            rng = int(np.random.randint(0, 2**31 - 1))
        return original_noise(image, mode=mode, rng=rng, **kwargs)

    def gaussian(image, sigma=1, *args, multichannel=None, **kwargs):
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return original(image, sigma, *args, **kwargs)

    had_float = hasattr(np, "float_")
    corruptions.gaussian = gaussian
    skimage.util.random_noise = random_noise
    if not had_float:
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        yield
    finally:
        corruptions.gaussian = original
        skimage.util.random_noise = original_noise
        if not had_float:
            del np.float_


#: imagecorruptions' names ("all": the 15 benchmark corruptions and the 4 extra ones), as in its 1.1.x releases: the
#: registry lists them without importing the package (0.2 s of scikit-image and SciPy on every `mtkit list`);
#: tests/test_plugins.py checks the list against the installed package's
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")


def corruption_names() -> list[str]:
    return list(CORRUPTIONS)


def corrupt_batch(x: torch.Tensor, name: str, severity: int, seeds: list[int]) -> torch.Tensor:
    """Corrupt a batch (B, 3, H, W) of gray values 0..255 with ``imagecorruptions.corrupt`` at ``severity``.

    The package draws from NumPy's global generator: it is seeded from each image's seed in ``seeds`` before that
    image (so an image's corruption does not depend on its batch) and restored afterwards.
    """
    ic = _imagecorruptions()
    images = x.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    state = np.random.get_state()
    try:
        with _compat():
            out = []
            for img, seed in zip(images, seeds, strict=True):
                np.random.seed(seed % 2**32)
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


class CorruptionOptions(PerturbationOptions):
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(list(SEVERITIES), min_length=1,
                                                                 description="among 1-5")


class Corruption(Perturbation):
    """One common corruption at severities 1-5; ε is measured (eq. 7), not requested."""

    Options = CorruptionOptions
    level_kind = "severity"
    epsilon_meaning = "a severity level, not an ε: its RMS is measured and plotted on the same ε axis"
    corruption = ""

    def __init__(self, options: CorruptionOptions | None = None) -> None:
        super().__init__(options)
        self.severities = list(self.options.severities)

    def levels(self, epsilons: list[float]) -> list[float]:
        return [float(s) for s in self.severities]

    def sweep(self, ctx: AttackContext, x: torch.Tensor, y: Any, epsilons: list[float]) -> dict[float, torch.Tensor]:
        out = {}
        for s in self.severities:  # each image's seed from its own generator: batch- and rank-independent
            seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g))
                     for g in ctx.image_generators(x.shape[0], self.corruption, s)]
            out[float(s)] = corrupt_batch(x, self.corruption, s, seeds)
        return out


def corruption_class(name: str) -> type[Corruption]:
    doc = f"Corruption {name!r} (imagecorruptions), severities 1-5, ε measured."
    return type(f"Corrupt_{name}", (Corruption,), {"corruption": name, "__doc__": doc, "__module__": __name__})


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    for name in corruption_names():
        registry.add("perturbation", f"corrupt_{name}", corruption_class(name))
