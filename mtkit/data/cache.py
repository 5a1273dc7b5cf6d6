"""The prepared cache: every dataset decoded once, at the size training and evaluation use, into memory-mappable
numpy ``.npy`` arrays, so that loader workers only slice uint8 arrays.

Layout (format ``FORMAT``; a folder per dataset, size and mode)::

    <cache>/prepared/<name>-<split>-<train|eval>-<key>/
        manifest.json      format, mtkit version, dataset config, sizes, source files (path, bytes, mtime),
                           skipped items, rate; written last, ``complete: true`` only after verification
        images.npy         segmentation: (N, H, W, 3) uint8     labels.npy  (N, H, W) uint8 trainIds, 255 void
        frames.npy         video: (F, H, W, 3) uint8, each frame once   triplets.npy (N, 3) int64 frame indices
        K.npy              video: (N, 4, 4) float32 pixel intrinsics at (H, W)   depth.npy (N, H, W) when known
        crc.npy            a CRC-32 per stored item (images with labels, or frames), checked before completion

Training sets are stored at their training size (Cityscapes: downscaled by ``options.downscale``, cropped at
load), evaluation sets at the evaluation size, video frames at the recipe's size with their intrinsics.

``.npy`` is numpy's documented, versioned format: any tool reads it, ``np.load(mmap_mode="r")`` maps it without
copying, and a worker's random crop is a slice (see the README for why not WebDataset/LitData shards).

Preparing is resumable and atomic: items are written with plain file writes into ``<folder>.partial/`` (a full
disk raises an error instead of a crash in a memory map), progress is saved every second, and the folder is renamed
into place only when every item is written and its checksum verified.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch.utils.data import Dataset

from ..core.errors import DatasetError
from .base import SegmentationDataset, VideoDataset

FORMAT = 1


class Manifest(BaseModel):
    """What a prepared folder holds and what it was made from."""

    format: int
    mtkit_version: str
    kind: Literal["segmentation", "video"]
    dataset: dict[str, Any]
    train: bool
    size: tuple[int, int]
    crop: tuple[int, int]
    count: int
    frames: int = 0
    source_key: str
    sources: list[tuple[str, int, int]]
    skipped: list[str] = []
    complete: bool = False
    seconds: float = 0.0
    images_per_s: float = 0.0


def mtkit_version() -> str:
    try:
        return metadata.version("mtkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_stats(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, bytes, mtime in ns) of each source file; a missing one is an error naming it."""
    out = []
    for p in files:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DatasetError(f"source file missing: {p}") from None
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


def stats_key(stats: list[tuple[str, int, int]], extra: str) -> str:
    h = zlib.crc32(extra.encode())
    for s in stats:
        h = zlib.crc32(f"{s[0]}|{s[1]}|{s[2]}\n".encode(), h)
    return f"{h:08x}-{len(stats)}"


def source_key(source: SegmentationDataset | VideoDataset, dataset: dict[str, Any]
               ) -> tuple[list[tuple[str, int, int]], str]:
    """The source files' stats and the key of what a prepared folder is made of (files, config, content)."""
    stats = source_stats(source.files())
    return stats, stats_key(stats, json.dumps(dataset, sort_keys=True) + source.content_extra())


# ------------------------------------------------------------------------------------------------- reading
def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of a prepared folder, or None when there is none; a cache of another format is an error that
    says to prepare again."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise DatasetError(f"{folder} was prepared by mtkit {data.get('mtkit_version', '?')} in cache format "
                           f"{data.get('format')}, this mtkit reads format {FORMAT}: run `mtkit prepare RECIPE` "
                           "again (or delete the folder)")
    return Manifest.model_validate(data)


class CachedSegmentation(Dataset):
    """A prepared segmentation set. Key ``(i, y0, x0)``: the training crop at (y0, x0) as uint8 ``image`` (3, h, w)
    and uint8 ``label`` (augmented on the device, ``data.augment``); key ``i``: the stored image as float gray
    values and int64 labels (evaluation)."""

    task = "segmentation"

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.size, self.crop, self.skipped = manifest.size, manifest.crop, len(manifest.skipped)

    def __len__(self) -> int:
        return self.manifest.count

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            i, y0, x0 = key
            h, w = self.crop
            image = np.array(self.images[i, y0:y0 + h, x0:x0 + w])  # a copy: the map is read-only
            label = np.array(self.labels[i, y0:y0 + h, x0:x0 + w])
            return {"image": torch.from_numpy(image).permute(2, 0, 1), "label": torch.from_numpy(label)}
        image = torch.from_numpy(np.array(self.images[key])).permute(2, 0, 1).float()
        return {"image": image.contiguous(), "label": torch.from_numpy(self.labels[key].astype(np.int64))}

    def content_key(self) -> str:
        """The labels' content (source files, sizes and mtimes, and the stored size) for derived statistics."""
        return f"{self.manifest.source_key}-{self.size[0]}x{self.size[1]}"

    def label_counts(self, num_classes: int) -> torch.Tensor:
        counts = np.zeros(256, dtype=np.int64)
        for i in range(0, len(self), 64):
            counts += np.bincount(np.asarray(self.labels[i:i + 64]).ravel(), minlength=256)
        return torch.from_numpy(counts[:num_classes].astype(np.float64))


class CachedVideo(Dataset):
    """A prepared video set: ``frames`` uint8 (3, 3, H, W) [t-1, t, t+1], ``K`` (4, 4) at (H, W), ``depth`` when
    known. Flip and colour jitter happen on the device (``data.augment``)."""

    task = "depth"

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest
        self.frames = np.load(folder / "frames.npy", mmap_mode="r")
        self.triplets = np.load(folder / "triplets.npy")
        self.k = torch.from_numpy(np.load(folder / "K.npy"))
        self.depth = np.load(folder / "depth.npy", mmap_mode="r") if (folder / "depth.npy").is_file() else None
        self.size, self.skipped = manifest.size, len(manifest.skipped)

    def __len__(self) -> int:
        return self.manifest.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frames = torch.from_numpy(np.stack([self.frames[j] for j in self.triplets[i]])).permute(0, 3, 1, 2)
        out = {"frames": frames, "K": self.k[i]}
        if self.depth is not None:
            out["depth"] = torch.from_numpy(np.array(self.depth[i]))
        return out


def training_keys(dataset: CachedSegmentation | CachedVideo, batches: list[list[int]], generator: torch.Generator
                  ) -> list[list]:
    """Loader keys for batches of indices: for segmentation ``(i, y0, x0)``, a random crop of the stored image
    (offsets uniform over every position, as ``random.randint`` drew them per sample), for video the index."""
    if not isinstance(dataset, CachedSegmentation):
        return batches
    (height, width), (h, w) = dataset.size, dataset.crop
    n = sum(map(len, batches))
    offsets = iter(zip(torch.randint(0, height - h + 1, (n,), generator=generator).tolist(),
                       torch.randint(0, width - w + 1, (n,), generator=generator).tolist()))
    return [[(i, *next(offsets)) for i in batch] for batch in batches]


def item_crc(*arrays: np.ndarray) -> int:
    """The CRC-32 of one stored item (an image with its label, or a frame), as ``crc.npy`` holds it."""
    h = 0
    for a in arrays:
        h = zlib.crc32(np.ascontiguousarray(a).tobytes(), h)
    return h


#: arrays up to this many bytes are checked whole whenever a prepared folder is opened; larger ones by a sample
FULL_CHECK_BYTES = 256 << 20


def check_prepared(folder: Path, manifest: Manifest, full: bool = False) -> str | None:
    """What is wrong with a complete prepared folder, or None: every array is there, readable (not truncated) and
    of the manifest's shape, and its items match their CRC-32 (``crc.npy``). The checksums are checked for every
    item when ``full`` or when the arrays are small (``FULL_CHECK_BYTES``), else for the first, middle and last
    item and 16 more drawn with a fixed seed."""
    h, w = manifest.size
    n = manifest.count
    if manifest.kind == "segmentation":
        shapes = {"images.npy": (n, h, w, 3), "labels.npy": (n, h, w)}
    else:
        shapes = {"frames.npy": (manifest.frames, h, w, 3), "triplets.npy": (n, 3), "K.npy": (n, 4, 4)}
    arrays = {}
    for name, shape in {**shapes, "crc.npy": (n if manifest.kind == "segmentation" else manifest.frames,)}.items():
        try:
            arrays[name] = np.load(folder / name, mmap_mode="r")
        except FileNotFoundError:
            return f"{name} is missing"
        except (ValueError, OSError) as exc:
            return f"{name} is unreadable or truncated ({exc})"
        if arrays[name].shape != shape:
            return f"{name} holds {arrays[name].shape}, the manifest says {shape}"
    stored = [arrays["images.npy"], arrays["labels.npy"]] if manifest.kind == "segmentation" else [arrays["frames.npy"]]
    items = len(arrays["crc.npy"])
    if full or sum(a.nbytes for a in stored) <= FULL_CHECK_BYTES:
        sample = range(items)
    else:
        rng = np.random.default_rng(0)
        sample = sorted({0, items // 2, items - 1, *rng.integers(0, items, 16).tolist()})
    for i in sample:
        if item_crc(*(a[i] for a in stored)) != int(arrays["crc.npy"][i]):
            return f"item {i} does not match its checksum (changed or damaged after it was prepared)"
    return None


def open_prepared(folder: Path) -> CachedSegmentation | CachedVideo:
    """A complete prepared folder as a dataset, checked (``check_prepared``); an incomplete, missing or damaged
    one is a one-line error that names the fix."""
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:  # a manifest that is not JSON, or not a manifest
        raise DatasetError(f"{folder}/manifest.json is damaged ({str(exc).splitlines()[0]}): run `mtkit prepare "
                           "RECIPE` to prepare the dataset again") from None
    if manifest is None or not manifest.complete:
        raise DatasetError(f"{folder} is not a complete prepared dataset: run `mtkit prepare RECIPE`")
    problem = check_prepared(folder, manifest)
    if problem:
        raise DatasetError(f"{folder} is damaged: {problem}: run `mtkit prepare RECIPE` to prepare it again")
    return (CachedSegmentation if manifest.kind == "segmentation" else CachedVideo)(folder, manifest)


# ------------------------------------------------------------------------------------------------- writing
