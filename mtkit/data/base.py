"""The two dataset shapes every loader returns, and the shared segmentation-folder loader.

Samples are dicts of tensors in gray values 0..255:
- segmentation: ``image`` (3, H, W) float, ``label`` (H, W) int64 trainIds (255 void);
- video (depth): ``frames`` (3, 3, H, W) colour-augmented [x_{t-1}, x_t, x_{t+1}], ``frames_raw`` the same
  without colour augmentation (for the photometric loss), ``K`` (4, 4) at (H, W); ``depth`` (H, W) when known.

Every loader is a builder ``build(cfg, options, train, augment)`` in the ``dataset`` registry, with its options
declared as a pydantic model (``DatasetOptions``) that the recipe validates when it loads.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from ..config import AugmentConfig
from ..errors import DatasetError
from .common import image_is_readable, read_image, require_dir, resize_image, resize_label, to_image_tensor
from .transforms import Augment, augment_segmentation, augment_triplet


class DatasetOptions(BaseModel):
    """Base of a dataset's typed options (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")


class SegmentationDataset(Dataset):
    """Images and labels from a list of loaders; resize (eval) or downscale + random crop (train)."""

    task = "segmentation"

    def __init__(self, items: list, load: Callable, size: tuple[int, int], train: bool,
                 augment: AugmentConfig | None, downscale: float = 1.0,
                 content: Callable[[], str] | None = None, skipped: int = 0) -> None:
        self.items = items
        self._content = content
        self.load = load
        self.size = size
        self.train = train
        self.downscale = downscale
        self.aug = Augment(augment) if (train and augment is not None) else None
        self.skipped = skipped  # unreadable images left out (skip_bad_images)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = self.load(self.items[i])
        h, w = self.size
        if self.train:
            if self.downscale != 1.0:
                sh, sw = round(image.shape[-2] / self.downscale), round(image.shape[-1] / self.downscale)
                image, label = resize_image(image, (sh, sw)), resize_label(label, (sh, sw))
            if image.shape[-2] < h or image.shape[-1] < w:
                image, label = resize_image(image, (h, w)), resize_label(label, (h, w))
            y0 = random.randint(0, image.shape[-2] - h)
            x0 = random.randint(0, image.shape[-1] - w)
            image, label = image[:, y0:y0 + h, x0:x0 + w], label[y0:y0 + h, x0:x0 + w]
            if self.aug is not None:
                image, label = augment_segmentation(image, label, self.aug)
        else:
            image, label = resize_image(image, (h, w)), resize_label(label, (h, w))
        return {"image": image.contiguous(), "label": label.contiguous()}

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
    """Triplets [t-1, t, t+1] resized to (H, W) with intrinsics scaled accordingly."""

    task = "depth"

    def __init__(self, items: list, load: Callable, size: tuple[int, int], train: bool,
                 augment: AugmentConfig | None, dropped: int = 0) -> None:
        self.items = items
        self.load = load
        self.size = size
        self.aug = Augment(augment) if (train and augment is not None) else None
        self.dropped = dropped  # split lines without both neighbour frames

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frames, k_norm, depth = self.load(self.items[i])
        h, w = self.size
        frames = resize_image(frames, (h, w))
        k = torch.eye(4)
        k[0, :3] = torch.as_tensor(k_norm[0, :3]) * w
        k[1, :3] = torch.as_tensor(k_norm[1, :3]) * h
        if self.aug is not None:
            aug_frames, raw, k = augment_triplet(frames, k, self.aug)
            flipped = raw is not frames
        else:
            aug_frames, raw, flipped = frames, frames, False
        out = {"frames": aug_frames.contiguous(), "frames_raw": raw.contiguous(), "K": k}
        if depth is not None:
            d = torch.as_tensor(depth)
            d = torch.nn.functional.interpolate(d[None, None], size=(h, w), mode="nearest")[0, 0]
            out["depth"] = d.flip(-1) if flipped else d
        return out


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
                    size: tuple[int, int], train: bool,
                    augment: AugmentConfig | None, limit: int | None, downscale: float = 1.0,
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

    return SegmentationDataset(items, load, size, train, augment, downscale=downscale,
                               content=lambda: file_list_key([lab for _, lab in items], lut.tobytes()),
                               skipped=skipped)
