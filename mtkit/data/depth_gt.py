"""Depth ground truth for evaluation: the KITTI Eigen test split from Velodyne scans (or the improved maps of the
KITTI depth benchmark), and the embedded synthetic data's exact depth.

The Velodyne projection follows the standard protocol (Eigen et al. 2014, as in monodepth2's ``kitti_utils.py``
and the authors' SGDepth): points of ``velodyne_points/data/<frame>.bin`` in front of the scanner are mapped into
the rectified image of camera 2 (or 3) by P_rect · R_rect_00 · [R|T]_velo→cam, each point's depth is its camera z,
the pixel is ``round(u) - 1, round(v) - 1`` (the protocol's MATLAB heritage, kept so that numbers compare with the
published ones), and where several points hit one pixel the nearest wins.

Samples are ``{"image": (3, H, W) float gray values at the recipe's size, "depth": (H0, W0) float32 metres at the
ground truth's native size, 0 = no measurement}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..core.errors import DatasetError
from ..core.registry import register
from ..core.schema import AugmentConfig, DatasetConfig, expand_root
from .base import DatasetOptions
from .common import opened_image, read_image, resize_image, to_image_tensor
from .kitti import SIDES, frame_path, kitti_root, parse_split_file
from .kitti_calib import velo_to_image

EIGEN_LAYOUT = """  <root>/<date>/calib_cam_to_cam.txt and <root>/<date>/calib_velo_to_cam.txt
  <root>/<date>/<date>_drive_<id>_sync/image_02/data/<frame:010d>.png   (or .jpg; image_03 for side r)
  <root>/<date>/<date>_drive_<id>_sync/velodyne_points/data/<frame:010d>.bin
  split file: lines '<date>/<date>_drive_<id>_sync <frame> <l|r>' (options.split_file, default
  <root>/splits/eigen_<split>_files.txt: the 697 lines of the Eigen test split)
  improved ground truth (options.improved_gt): <dir>/{train,val}/<date>_drive_<id>_sync/proj_depth/groundtruth/
  image_02/<frame:010d>.png (uint16, metres x 256)"""

CAMERAS = {"l": 2, "r": 3}


def load_velodyne(path: Path) -> np.ndarray:
    """A Velodyne scan (N, 4): x, y, z in metres (x forward), reflectance; a missing or truncated file names it."""
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except FileNotFoundError:
        raise DatasetError(f"KITTI: Velodyne scan not found: {path}. Expected:\n{EIGEN_LAYOUT}") from None
    except OSError as exc:
        raise DatasetError(f"KITTI: cannot read Velodyne scan {path}: {exc}") from None
    if raw.size % 4:
        raise DatasetError(f"KITTI: {path} is not a Velodyne scan: {raw.size} floats, not a multiple of 4")
    return raw.reshape(-1, 4)


def project_velodyne(points: np.ndarray, p_velo2im: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sparse depth map (H, W) float32 from Velodyne points (monodepth2's ``generate_depth_map``): the points with
    x ≥ 0, their camera z at pixel (round(u)-1, round(v)-1) of the projection, the nearest where several hit one
    pixel, negative depths and empty pixels 0."""
    h, w = shape
    pts = points[points[:, 0] >= 0].astype(np.float64)
    pts = np.concatenate([pts[:, :3], np.ones((len(pts), 1))], 1)
    cam = pts @ p_velo2im.T
    z = cam[:, 2]
    keep = z != 0
    cam, z = cam[keep], z[keep]
    u = np.round(cam[:, 0] / z) - 1
    v = np.round(cam[:, 1] / z) - 1
    inside = (u >= 0) & (v >= 0) & (u < w) & (v < h)
    u, v, z = u[inside].astype(np.int64), v[inside].astype(np.int64), z[inside]
    depth = np.full(h * w, np.inf)
    np.minimum.at(depth, v * w + u, z)
    depth[np.isinf(depth) | (depth < 0)] = 0.0
    return depth.reshape(h, w).astype(np.float32)


def read_improved_gt(path: Path) -> np.ndarray:
    """A KITTI depth benchmark ground-truth PNG (uint16, metres x 256, 0 = none) as float32 metres."""
    try:
        with opened_image(path) as im:
            raw = np.asarray(im, dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"KITTI: improved ground truth not found: {path}. Expected:\n{EIGEN_LAYOUT}") from None
    except OSError as exc:
        raise DatasetError(f"KITTI: cannot read {path}: {exc}") from None
    return (raw / 256.0).astype(np.float32)


class DepthEvalDataset(Dataset):
    """Images at the evaluation size and their ground-truth depth at native size (see the module doc)."""

    task = "depth_eval"

    def __init__(self, items: list, load, size: tuple[int, int], skipped: int = 0) -> None:
        self.items = items
        self.load = load
        self.size = size
        self.skipped = skipped  # split lines left out because a file was missing (options.skip_missing)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, depth = self.load(self.items[i])
        return {"image": resize_image(image, self.size).contiguous(), "depth": torch.from_numpy(depth)}


def _improved_path(gt_root: Path, folder: str, frame: int, cam: int) -> Path:
    drive = folder.split("/")[-1]
    tail = Path(drive) / "proj_depth" / "groundtruth" / f"image_0{cam}" / f"{frame:010d}.png"
    for sub in ("val", "train", ""):
        p = gt_root / sub / tail
        if p.is_file():
            return p
    return gt_root / "val" / tail


class EigenOptions(DatasetOptions):
    split_file: str | None = Field(None, description="default <root>/splits/eigen_<split>_files.txt")
    improved_gt: str | None = Field(None, description="folder of the KITTI depth benchmark's improved maps")
    skip_missing: bool = Field(False, description="leave out (and count) lines whose file is missing")


@register("dataset", "kitti_eigen", options=EigenOptions)
def kitti_eigen(cfg: DatasetConfig, options: EigenOptions, train: bool = False,
                augment: AugmentConfig | None = None) -> DepthEvalDataset:
    """KITTI Eigen test split with Velodyne (or improved) ground truth, for depth evaluation."""
    root = kitti_root(cfg, "KITTI Eigen split", EIGEN_LAYOUT)
    split_file = Path(expand_root(options.split_file, None) or root / "splits" / f"eigen_{cfg.split}_files.txt")
    improved = expand_root(options.improved_gt, None)
    skip_missing = options.skip_missing
    items, skipped = [], 0
    projections: dict[tuple[str, int], tuple[np.ndarray, tuple[int, int]]] = {}
    for folder, frame, side in parse_split_file(split_file):
        cam = CAMERAS[side]
        date = folder.split("/")[0]
        image = frame_path(root, folder, frame, side)
        try:
            if image is None:
                raise DatasetError(f"KITTI: image of split line '{folder} {frame} {side}' not found: "
                                   f"{root / folder / SIDES[side] / 'data' / f'{frame:010d}.png'}")
            if improved:
                gt = _improved_path(Path(improved), folder, frame, cam)
                if not gt.is_file():
                    raise DatasetError(f"KITTI: improved ground truth not found: {gt}")
                items.append((image, ("improved", gt)))
                continue
            scan = root / folder / "velodyne_points" / "data" / f"{frame:010d}.bin"
            if not scan.is_file():
                raise DatasetError(f"KITTI: Velodyne scan of split line '{folder} {frame} {side}' not found: {scan}")
            if (date, cam) not in projections:
                projections[(date, cam)] = velo_to_image(root / date / "calib_cam_to_cam.txt",
                                                         root / date / "calib_velo_to_cam.txt", cam)
            items.append((image, ("velodyne", scan, *projections[(date, cam)])))
        except DatasetError as exc:
            if not skip_missing:
                raise DatasetError(f"{exc} (options.skip_missing: true leaves such lines out and counts them)") \
                    from None
            skipped += 1
    if not items:
        raise DatasetError(f"KITTI: no sample of {split_file} has its image and ground truth under {root}. "
                           f"Expected:\n{EIGEN_LAYOUT}")
    if cfg.limit is not None:
        items = items[: cfg.limit]

    def load(item):
        image, gt = item
        depth = read_improved_gt(gt[1]) if gt[0] == "improved" else project_velodyne(load_velodyne(gt[1]), gt[2], gt[3])
        return to_image_tensor(read_image(image)), depth

    return DepthEvalDataset(items, load, (cfg.height, cfg.width), skipped)
