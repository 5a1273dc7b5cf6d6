"""KITTI calibration files: ``key: numbers`` lines (calib_cam_to_cam.txt, calib_velo_to_cam.txt), with errors that
name the file, the key and how many numbers were expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DatasetError


def read_calib_file(path: Path) -> dict[str, np.ndarray]:
    """A KITTI calibration file (``key: numbers`` lines) as arrays; non-numeric values (dates) are skipped."""
    values: dict[str, np.ndarray] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DatasetError(f"KITTI: calibration file not found: {path}. Expected the KITTI raw layout: "
                           "<root>/<date>/calib_cam_to_cam.txt and calib_velo_to_cam.txt") from None
    except OSError as exc:
        raise DatasetError(f"KITTI: cannot read calibration {path}: {exc}") from None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, val = line.split(":", 1)
        try:
            values[key.strip()] = np.array([float(x) for x in val.split()], dtype=np.float64)
        except ValueError:
            continue
    return values


def require_numbers(values: dict[str, np.ndarray], key: str, size: int, path: Path) -> np.ndarray:
    if key not in values:
        raise DatasetError(f"KITTI: {path} has no '{key}' line")
    if values[key].size != size:
        raise DatasetError(f"KITTI: {path}: '{key}' needs {size} numbers, found {values[key].size}")
    return values[key]


def velo_to_image(cam_to_cam: Path, velo_to_cam: Path, cam: int = 2) -> tuple[np.ndarray, tuple[int, int]]:
    """The 3x4 projection P_rect · R_rect_00 · [R|T]_velo→cam from Velodyne to pixel coordinates of the rectified
    camera ``cam``, and that image's (height, width) from S_rect."""
    c2c = read_calib_file(cam_to_cam)
    v2c = read_calib_file(velo_to_cam)
    velo2cam = np.eye(4)
    velo2cam[:3, :3] = require_numbers(v2c, "R", 9, velo_to_cam).reshape(3, 3)
    velo2cam[:3, 3] = require_numbers(v2c, "T", 3, velo_to_cam)
    rect = np.eye(4)
    rect[:3, :3] = require_numbers(c2c, "R_rect_00", 9, cam_to_cam).reshape(3, 3)
    p_rect = require_numbers(c2c, f"P_rect_0{cam}", 12, cam_to_cam).reshape(3, 4)
    width, height = require_numbers(c2c, f"S_rect_0{cam}", 2, cam_to_cam)
    return p_rect @ rect @ velo2cam, (int(round(height)), int(round(width)))
