"""KITTI raw video for self-supervised depth: triplets [t-1, t, t+1] listed by a split file (the KITTI or
Eigen-Zhou split), intrinsics from the raw calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from ..core.errors import DatasetError
from ..core.registry import register
from ..core.schema import AugmentConfig, DatasetConfig, expand_root
from .base import DatasetOptions, VideoDataset, normalized_intrinsics
from .common import read_image, require_dir, to_image_tensor
from .kitti_calib import read_calib_file, require_numbers

KITTI_LAYOUT = """  <root>/<date>/calib_cam_to_cam.txt
  <root>/<date>/<date>_drive_<id>_sync/image_02/data/<frame:010d>.png   (or .jpg; image_03 for side r)
  split file: lines '<date>/<date>_drive_<id>_sync <frame> <l|r>' (options.split_file, default
  <root>/splits/<split>_files.txt)"""

SIDES = {"l": "image_02", "r": "image_03"}


class KittiRawOptions(DatasetOptions):
    split_file: str | None = Field(None, description="default <root>/splits/<split>_files.txt")
    max_dropped: float = Field(0.1, ge=0, le=1, description="fail when a larger fraction of the split's lines lack "
                                                               "frame t-1 or t+1 on disk")


def read_kitti_calib(path: Path, side: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(3x4 P_rect of the camera, (height, width) of the rectified image) from calib_cam_to_cam.txt."""
    cam = SIDES[side][-2:]
    values = read_calib_file(path)
    w, h = require_numbers(values, f"S_rect_{cam}", 2, path)
    return require_numbers(values, f"P_rect_{cam}", 12, path).reshape(3, 4), (int(round(h)), int(round(w)))


def parse_split_file(path: Path) -> list[tuple[str, int, str]]:
    """Lines '<folder> <frame> <l|r>' of a KITTI split file; a malformed line names the file and line."""
    if not path.is_file():
        raise DatasetError(f"KITTI: split file not found: {path}. Expected:\n{KITTI_LAYOUT}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in SIDES:
            raise DatasetError(f"KITTI: {path}:{n}: expected '<folder> <frame> <l|r>', got '{line}'")
        out.append((parts[0], int(parts[1]), parts[2]))
    return out


def frame_path(root: Path, folder: str, frame: int, side: str) -> Path | None:
    """The image of a frame (.png or .jpg), or None."""
    base = root / folder / SIDES[side] / "data"
    for ext in (".png", ".jpg"):
        p = base / f"{frame:010d}{ext}"
        if p.is_file():
            return p
    return None


def kitti_root(cfg: DatasetConfig, what: str, layout: str) -> Path:
    root = expand_root(cfg.root, "KITTI_ROOT")
    if not root:
        raise DatasetError(f"KITTI root not set: give the recipe's root or set KITTI_ROOT. Expected:\n{layout}")
    return require_dir(Path(root), what, layout)


@register("dataset", "kitti_raw", options=KittiRawOptions)
def kitti_raw(cfg: DatasetConfig, options: KittiRawOptions, train: bool = False,
              augment: AugmentConfig | None = None) -> VideoDataset:
    """KITTI raw video triplets listed by a split file (KITTI / Eigen-Zhou split), intrinsics from calib."""
    root = kitti_root(cfg, "KITTI raw", KITTI_LAYOUT)
    split_file = Path(expand_root(options.split_file, None) or root / "splits" / f"{cfg.split}_files.txt")
    entries = parse_split_file(split_file)
    items, dropped = [], 0
    calib_cache: dict[tuple[str, str], tuple[np.ndarray, tuple[int, int]]] = {}
    for folder, frame, side in entries:
        paths = [frame_path(root, folder, frame + o, side) for o in (-1, 0, 1)]
        if any(p is None for p in paths):
            dropped += 1
            continue
        date = folder.split("/")[0]
        key = (date, side)
        if key not in calib_cache:
            p_rect, (h, w) = read_kitti_calib(root / date / "calib_cam_to_cam.txt", side)
            calib_cache[key] = (normalized_intrinsics(p_rect, h, w), (h, w))
        items.append((paths, *calib_cache[key]))
    if not items:
        raise DatasetError(f"KITTI: none of the {len(entries)} samples in {split_file} has frames t-1, t, t+1 on "
                           f"disk under {root}. Expected:\n{KITTI_LAYOUT}")
    if dropped > options.max_dropped * len(entries):
        raise DatasetError(f"KITTI: {dropped} of the {len(entries)} lines of {split_file} lack frame t-1 or t+1 "
                           f"under {root} (more than options.max_dropped = {options.max_dropped:g}); is the raw "
                           "data complete?")
    if cfg.limit is not None:
        items = items[: cfg.limit]

    def read_frame(key: tuple[Path, tuple[int, int]]) -> torch.Tensor:
        path, size = key
        frame = read_image(path)
        if frame.shape[:2] != size:
            raise DatasetError(f"KITTI: {path} is {frame.shape[1]}x{frame.shape[0]}, but the calibration of its drive "
                               f"gives {size[1]}x{size[0]} (S_rect)")
        return to_image_tensor(frame)

    def files() -> list[Path]:  # each frame once, the calibrations and the split file
        frames = list(dict.fromkeys(p for paths, _, _ in items for p in paths))
        return [*frames, *sorted({p.parents[3] / "calib_cam_to_cam.txt" for p in frames}), split_file]

    return VideoDataset(items, lambda item: [(p, item[2]) for p in item[0]], read_frame, lambda item: (item[1], None),
                        (cfg.height, cfg.width), dropped, files=files, content=lambda: "")
