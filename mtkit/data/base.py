"""The two dataset shapes every loader returns, and the shared segmentation-folder loader.

Samples are dicts of tensors in gray values 0..255:
- segmentation: ``image`` (3, H, W) float, ``label`` (H, W) int64 trainIds (255 void);
- video (depth): ``frames`` (3, 3, H, W) [x_{t-1}, x_t, x_{t+1}], ``K`` (4, 4) at (H, W); ``depth`` (H, W) when
  known.

Every loader is a builder ``build(cfg, options, train, augment)`` in the ``dataset`` registry, with its options
declared as a pydantic model (``DatasetOptions``) that the recipe validates when it loads. These datasets are the
sources of the prepared cache (``data.cache``): training augmentation happens on the device (``data.augment``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from ..core.errors import DatasetError
from .common import image_is_readable, read_image, require_dir, resize_image, resize_label, to_image_tensor


class DatasetOptions(BaseModel):
    """Base of a dataset's typed options (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")


class SegmentationDataset(Dataset):
    """Images and labels from a list of loaders, at their stored size: the evaluation size, or for training the
    image downscaled by ``downscale`` (at least the crop ``size``), from which training crops are cut.

    ``mtkit prepare`` decodes every item once into the cache (``data.cache``); training and evaluation read there.
    Indexing this source directly decodes the files (the raw path, for tools and benchmarks)."""

    task = "segmentation"

    def __init__(self, items: list, load: Callable, size: tuple[int, int], train: bool, downscale: float = 1.0,
                 content: Callable[[], str] | None = None, skipped: int = 0,
                 files: Callable[[], list[Path]] | None = None) -> None:
        self.items = items
        self._content = content
        self._files = files
        self.load = load
        self.size = size
        self.train = train
        self.downscale = downscale
        self.skipped = skipped  # unreadable images left out (skip_bad_images)
        self._stored_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def stored(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """An item decoded and sized as it is stored: float (3, H, W) gray values and int64 (H, W) labels."""
        image, label = self.load(item)
        h, w = self.size
        if self.train:
            if self.downscale != 1.0:
                size = (round(image.shape[-2] / self.downscale), round(image.shape[-1] / self.downscale))
                image, label = resize_image(image, size), resize_label(label, size)
            if image.shape[-2] < h or image.shape[-1] < w:
                image, label = resize_image(image, (h, w)), resize_label(label, (h, w))
        else:
            image, label = resize_image(image, (h, w)), resize_label(label, (h, w))
        if self._stored_size is not None and tuple(image.shape[-2:]) != self._stored_size:
            image, label = resize_image(image, self._stored_size), resize_label(label, self._stored_size)
        return image, label

    def stored_size(self) -> tuple[int, int]:
        """The size every item is stored at: the first item's (training images of another size are resized)."""
        if self._stored_size is None:
            self._stored_size = tuple(self.stored(self.items[0])[0].shape[-2:])  # type: ignore[assignment]
        return self._stored_size  # type: ignore[return-value]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = self.stored(self.items[i])
        return {"image": image.contiguous(), "label": label.contiguous()}

    def describe(self, item: Any) -> str:
        return str(item[0]) if isinstance(item, tuple) else f"item {item}"

    def files(self) -> list[Path]:
        """The source files (their sizes and mtimes key the prepared cache)."""
        return self._files() if self._files is not None else []

    def content_extra(self) -> str:
        """What else the items are made of (generated arrays, a label mapping)."""
        return self._content() if self._content is not None else repr(self.items)

    def content_key(self) -> str:
        """A hash of what the labels are made of (files with sizes and mtimes, or generated arrays, and the label
        mapping): statistics derived from the labels are cached under it, so changed data is never reused."""
        return self._content() if self._content is not None else file_list_key([], repr(self.items))

    def label_counts(self, num_classes: int) -> torch.Tensor:
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for item in self.items:
            _, label = self.load(item)
            lab = label[label != 255]
            counts += torch.bincount(lab.flatten(), minlength=num_classes)[:num_classes].double()
        return counts


class VideoDataset(Dataset):
    """Triplets [t-1, t, t+1] resized to (H, W) with intrinsics scaled accordingly.

    ``frame_keys(item)`` names the three frames (a frame shared by neighbouring triplets is decoded and stored
    once), ``read_frame(key)`` decodes one as float (3, H0, W0), ``meta(item)`` gives the normalized intrinsics and
    the depth (or None)."""

    task = "depth"

    def __init__(self, items: list, frame_keys: Callable[[Any], Sequence[Hashable]],
                 read_frame: Callable[[Any], torch.Tensor], meta: Callable[[Any], tuple[np.ndarray, Any]],
                 size: tuple[int, int], dropped: int = 0, files: Callable[[], list[Path]] | None = None,
                 content: Callable[[], str] | None = None) -> None:
        self.items = items
        self.frame_keys = frame_keys
        self.read_frame = read_frame
        self._meta = meta
        self.size = size
        self.dropped = dropped  # split lines without both neighbour frames
        self._files = files
        self._content = content

    def __len__(self) -> int:
        return len(self.items)

    def frame(self, key: Hashable) -> torch.Tensor:
        return resize_image(self.read_frame(key), self.size)

    def meta(self, item: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixel intrinsics (4, 4) at (H, W) and the depth at (H, W) (nearest), or None."""
        k_norm, depth = self._meta(item)
        h, w = self.size
        k = np.eye(4, dtype=np.float32)
        k[0, :3] = np.asarray(k_norm)[0, :3] * w
        k[1, :3] = np.asarray(k_norm)[1, :3] * h
        if depth is not None:
            d = torch.as_tensor(np.asarray(depth, dtype=np.float32))
            depth = torch.nn.functional.interpolate(d[None, None], size=(h, w), mode="nearest")[0, 0].numpy()
        return k, depth

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        k, depth = self.meta(item)
        out = {"frames": torch.stack([self.frame(key) for key in self.frame_keys(item)]), "K": torch.from_numpy(k)}
        if depth is not None:
            out["depth"] = torch.from_numpy(depth)
        return out

    def files(self) -> list[Path]:
        return self._files() if self._files is not None else []

    def content_extra(self) -> str:
        return self._content() if self._content is not None else repr(self.items)


def normalized_intrinsics(k: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel intrinsics of an image of (height, width) → normalized by the image size (monodepth2)."""
    kn = np.eye(4, dtype=np.float32)
    kn[0, :3] = k[0, :3] / width
    kn[1, :3] = k[1, :3] / height
    return kn


def file_list_key(paths: list[Path], *extra: object) -> str:
    """A hash of files' resolved paths, sizes and modification times, plus ``extra`` (e.g. a label mapping)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for e in extra:
        h.update(e if isinstance(e, bytes) else repr(e).encode())
    return h.hexdigest()[:16]


def labelled_folder(what: str, layout: str, image_dir: Path, label_dir: Path, pattern: str,
                    label_name: Callable[[Path], Path], lut: np.ndarray, known: np.ndarray,
                    size: tuple[int, int], train: bool, limit: int | None, downscale: float = 1.0,
                    skip_bad: bool = False) -> SegmentationDataset:
    """A segmentation set of image files and label files of labelIds (mapped to trainIds by ``lut``): the one
    loader behind Cityscapes and KITTI 2015. ``label_name`` maps an image path to its label path; a label id that
    ``known`` does not hold is an error naming the file (a trainId image given as labelIds, a foreign table)."""
    require_dir(image_dir, what, layout)
    require_dir(label_dir, what, layout)
    items = []
    for img in sorted(image_dir.glob(pattern)):
        label = label_name(img)
        if not label.is_file():
            raise DatasetError(f"{what}: label file missing for {img}: expected {label}")
        items.append((img, label))
    if not items:
        raise DatasetError(f"{what}: no images matching {pattern} under {image_dir}. Expected layout:\n{layout}")
    if limit is not None:
        items = items[:limit]
    skipped = 0
    if skip_bad:  # checked once, up front: no image counted twice, an exact count, no recursion
        good = [item for item in items if all(image_is_readable(p) for p in item)]
        skipped = len(items) - len(good)
        if not good:
            raise DatasetError(f"{what}: none of the {len(items)} images under {image_dir} can be read "
                               "(skip_bad_images left nothing to use)")
        items = good
    def load(item: tuple[Path, Path]) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = item
        ids = read_image(lab, "L")
        unknown = ~known[ids]
        if unknown.any():
            values = sorted(set(np.unique(ids[unknown]).tolist()))
            raise DatasetError(f"{what}: {lab} has {int(unknown.sum())} pixels with label ids {values[:8]} that the "
                               f"label table does not know (labelIds {int(np.flatnonzero(known).min())}-"
                               f"{int(np.flatnonzero(known[:255]).max())} or 255); is it a trainId image?")
        return to_image_tensor(read_image(img)), torch.from_numpy(lut[ids].astype(np.int64))

    return SegmentationDataset(items, load, size, train, downscale=downscale,
                               content=lambda: file_list_key([lab for _, lab in items], lut.tobytes()),
                               skipped=skipped, files=lambda: [p for item in items for p in item])
