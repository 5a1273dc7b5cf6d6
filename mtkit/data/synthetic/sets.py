"""The embedded synthetic driving data as datasets (the out-of-box default): labelled frames (``synthetic``),
video triplets with exact depth (``synthetic_video``) and frames with exact depth for depth evaluation
(``synthetic_depth``). Generated once by ``generate`` and cached on disk."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ...core.errors import DatasetError
from ...core.io import cache_dir
from ...core.progress import progress_bar
from ...core.registry import register
from ...core.runtime import local_world
from ...core.schema import AugmentConfig, DatasetConfig, expand_root
from ..base import DatasetOptions, SegmentationDataset, VideoDataset, normalized_intrinsics
from ..common import atomic_save_npz, to_image_tensor
from ..depth_gt import DepthEvalDataset
from .clips import SyntheticSpec, generate

SPLIT_SEEDS = {"train": 0, "val": 1000, "test": 2000}
DEFAULT_SEQUENCES = {"train": 20, "val": 4, "test": 4}


class SyntheticOptions(DatasetOptions):
    domain: Literal["city", "drive"] | None = Field(None, description="null: city for frames, drive for video")
    sequences: int | None = Field(None, ge=1, description="clips to render (null: 20 train, 4 val/test)")
    frames: int = Field(12, ge=3, description="frames per clip")
    seed: int = 0


def synthetic_arrays(cfg: DatasetConfig, options: SyntheticOptions | None = None, default_domain: str = "city",
                     native: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Generated (and cached on disk) synthetic data for a dataset config."""
    opts = options if options is not None else SyntheticOptions.model_validate(cfg.options)
    split = cfg.split
    if split not in SPLIT_SEEDS:
        raise DatasetError(f"synthetic data has splits {sorted(SPLIT_SEEDS)}, not '{split}'")
    h, w = native or (cfg.height, cfg.width)
    domain = opts.domain or default_domain
    spec = SyntheticSpec(domain=domain, sequences=opts.sequences or DEFAULT_SEQUENCES[split],
                                   frames=opts.frames, height=h, width=w, seed=opts.seed + SPLIT_SEEDS[split])
    root = Path(expand_root(cfg.root, None) or cache_dir() / "synthetic")
    path = root / f"{domain}-{split}-{spec.key()}.npz"
    if path.is_file():
        with np.load(path) as data:
            return dict(data)
    # one clip per process on the node's cores (shared by its ranks): the same arrays whatever the count
    workers = max(1, (os.cpu_count() or 1) // local_world())
    with progress_bar(sys.stderr.isatty(), spec.sequences, f"generate {domain} {split} {w}x{h}") as advance:
        arrays = generate(spec, workers, progress=lambda done, total: advance())
    atomic_save_npz(path, **arrays)
    return arrays


def array_key(*arrays: np.ndarray) -> str:
    """A hash of generated arrays (the content key of a dataset without files)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@register("dataset", "synthetic", options=SyntheticOptions)
def synthetic_segmentation(cfg: DatasetConfig, options: SyntheticOptions, train: bool = False,
                           augment: AugmentConfig | None = None) -> SegmentationDataset:
    """Embedded synthetic driving frames with labels."""
    data = synthetic_arrays(cfg, options, "city")
    images, labels = data["images"], data["labels"]
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))

    def load(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_image_tensor(images[i]), torch.from_numpy(labels[i].astype(np.int64))

    return SegmentationDataset(list(range(n)), load, (cfg.height, cfg.width), train,
                               content=lambda: array_key(images[:n], labels[:n]))


@register("dataset", "synthetic_video", options=SyntheticOptions)
def synthetic_video(cfg: DatasetConfig, options: SyntheticOptions, train: bool = False,
                    augment: AugmentConfig | None = None) -> VideoDataset:
    """Embedded synthetic driving video triplets with exact depth."""
    data = synthetic_arrays(cfg, options, "drive")
    images, depth, seq = data["images"], data["depth"], data["sequence"]
    kn = normalized_intrinsics(data["K"], *images.shape[1:3])
    items = [i for i in range(1, len(images) - 1) if seq[i - 1] == seq[i] == seq[i + 1]]
    dropped = len(images) - len(items)
    if cfg.limit is not None:
        items = items[: cfg.limit]

    return VideoDataset(items, lambda i: (i - 1, i, i + 1), lambda j: to_image_tensor(images[j]),
                        lambda i: (kn, depth[i]), (cfg.height, cfg.width), dropped,
                        content=lambda: array_key(images, depth, np.array(items)))


@register("dataset", "synthetic_depth", options=SyntheticOptions)
def synthetic_depth(cfg: DatasetConfig, options: SyntheticOptions, train: bool = False,
                    augment: AugmentConfig | None = None) -> DepthEvalDataset:
    """Embedded synthetic frames with their exact depth, for depth evaluation."""
    data = synthetic_arrays(cfg, options, "drive")
    images, depth = data["images"], data["depth"]
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))

    def load(i: int):
        return to_image_tensor(images[i]), depth[i].astype(np.float32)

    return DepthEvalDataset(list(range(n)), load, (cfg.height, cfg.width))
