"""Write synthetic data in the real Cityscapes, KITTI raw and KITTI 2015 folder layouts, so the real loaders run
end to end on it (tests, demos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .labels import trainids_to_labelids


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_cityscapes(root: Path, data: dict[str, np.ndarray], split: str = "train",
                     city: str = "synthcity") -> list[Path]:
    """leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png + gtFine/..._gtFine_labelIds.png."""
    out = []
    for i, (img, lab) in enumerate(zip(data["images"], data["labels"])):
        stem = f"{city}_{int(data['sequence'][i]):06d}_{int(data['frame'][i]):06d}"
        p = Path(root) / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        _png(p, img)
        _png(Path(root) / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", trainids_to_labelids(lab))
        out.append(p)
    return out


def write_kitti_raw(root: Path, data: dict[str, np.ndarray], date: str = "2011_09_26", side: str = "l",
                    split: str = "train", interior_only: bool = True) -> Path:
    """<date>/<date>_drive_<seq>_sync/image_02/data/<frame>.png, <date>/calib_cam_to_cam.txt, and the split
    file splits/<split>_files.txt listing the frames with both neighbours (as the KITTI split files do), or every
    frame (``interior_only=False``)."""
    root = Path(root)
    cam = "02" if side == "l" else "03"
    h, w = data["images"].shape[1:3]
    k = data["K"]
    p_rect = np.zeros((3, 4))
    p_rect[:3, :3] = k[:3, :3]
    calib = root / date / "calib_cam_to_cam.txt"
    calib.parent.mkdir(parents=True, exist_ok=True)
    calib.write_text(f"calib_time: synthetic\nR_rect_00: {' '.join(f'{v:.6e}' for v in np.eye(3).flatten())}\n"
                     f"S_rect_{cam}: {w:.6e} {h:.6e}\n"
                     f"P_rect_{cam}: {' '.join(f'{v:.6e}' for v in p_rect.flatten())}\n")
    lines = []
    for i, img in enumerate(data["images"]):
        folder = f"{date}/{date}_drive_{int(data['sequence'][i]):04d}_sync"
        frame = int(data["frame"][i])
        _png(root / folder / f"image_{cam}" / "data" / f"{frame:010d}.png", img)
        seq = data["sequence"]
        interior = 0 < i < len(seq) - 1 and seq[i - 1] == seq[i] == seq[i + 1]
        if interior or not interior_only:
            lines.append(f"{folder} {frame} {side}")
    split_file = root / "splits" / f"{split}_files.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("\n".join(lines) + "\n")
    return split_file


def write_kitti2015(root: Path, data: dict[str, np.ndarray]) -> list[Path]:
    """data_semantics/training/image_2/<id>_10.png and semantic/<id>_10.png (labelIds)."""
    base = Path(root) / "data_semantics" / "training"
    out = []
    for i, (img, lab) in enumerate(zip(data["images"], data["labels"])):
        p = base / "image_2" / f"{i:06d}_10.png"
        _png(p, img)
        _png(base / "semantic" / f"{i:06d}_10.png", trainids_to_labelids(lab))
        out.append(p)
    return out


# Velodyne frame (x forward, y left, z up) → camera frame (x right, y down, z forward), and the scanner's offset
VELO_TO_CAM_R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
VELO_TO_CAM_T = np.array([0.05, -0.08, -0.27])


def write_kitti_eigen(root: Path, data: dict[str, np.ndarray], date: str = "2011_09_26", split: str = "test"
                      ) -> Path:
    """The KITTI raw layout of ``write_kitti_raw`` plus what depth evaluation reads: ``calib_velo_to_cam.txt``
    and one Velodyne scan per frame, ``<drive>/velodyne_points/data/<frame>.bin``, holding the synthetic depth of
    every pixel as a point, and the split file ``splits/eigen_<split>_files.txt``.

    Each point is placed so that the standard projection (pixel round(u) - 1, see ``depth_gt``) puts it back on
    the pixel it came from: the ground truth the loader computes equals the synthetic depth map."""
    root = Path(root)
    split_file = write_kitti_raw(root, data, date, "l", f"eigen_{split}", interior_only=False)
    (root / date / "calib_velo_to_cam.txt").write_text(
        "calib_time: synthetic\n"
        f"R: {' '.join(f'{v:.9e}' for v in VELO_TO_CAM_R.flatten())}\n"
        f"T: {' '.join(f'{v:.9e}' for v in VELO_TO_CAM_T)}\n")
    k = data["K"].astype(np.float64)
    h, w = data["images"].shape[1:3]
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    rays = np.stack([(u + 1 - k[0, 2]) / k[0, 0], (v + 1 - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    for i, depth in enumerate(data["depth"]):
        valid = depth > 0
        cam = rays[valid] * depth[valid][:, None].astype(np.float64)
        velo = (cam - VELO_TO_CAM_T) @ VELO_TO_CAM_R  # R^T (X_cam - T)
        points = np.concatenate([velo, np.ones((len(velo), 1))], 1).astype(np.float32)
        folder = f"{date}/{date}_drive_{int(data['sequence'][i]):04d}_sync"
        path = root / folder / "velodyne_points" / "data" / f"{int(data['frame'][i]):010d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        points.tofile(path)
    return split_file
