"""Shared helpers of the dataset loaders: image reading with clear errors, resizing, cache folder."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..core.errors import DatasetError
from ..core.io import atomic_write

MAX_PIXELS = 8192 * 8192  # 67 MP: 32 Cityscapes frames; a header that claims more is refused before decoding


@contextlib.contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` with mtkit's size limit checked on the header, before anything is decoded (PIL's own bomb
    check would warn from 89 MP and raise from 179 MP, as a bare warning or a traceback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise DatasetError(f"{path}: {exc}; not decoded (mtkit reads images up to {MAX_PIXELS / 1e6:.0f} MP)"
                               ) from None
    with im:
        if im.width * im.height > MAX_PIXELS:
            raise DatasetError(f"{path}: its header says {im.width}x{im.height} pixels "
                               f"({im.width * im.height / 1e6:.0f} MP), over the {MAX_PIXELS / 1e6:.0f} MP mtkit "
                               "decodes; not decoded (a damaged file, or not one of the dataset's images?)")
        yield im


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """An image file as a numpy array; an unreadable, truncated or oversized file → DatasetError naming it."""
    try:
        with opened_image(path) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def image_is_readable(path: Path) -> bool:
    """Whether an image file opens and decodes within the size limit (used to leave unreadable images out up
    front)."""
    try:
        with opened_image(path) as im:
            im.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, DatasetError):
        return False


def to_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 gray values 0..255."""
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float()


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.ndim == 3
    y = F.interpolate(x[None] if squeeze else x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y[0] if squeeze else y


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: folder not found: {path}. Expected layout:\n{layout}")
    return path


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz file atomically (never a half-written file)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
