"""Datasets: embedded synthetic scenes (the out-of-box default), Cityscapes, KITTI raw (split files, triplets),
KITTI 2015 semantics. Registered in the dataset registry as builders ``build(cfg, train, augment)``.

Samples are dicts of tensors in gray values 0..255:
- segmentation: ``image`` (3, H, W) float, ``label`` (H, W) int64 trainIds (255 void);
- video (depth): ``frames`` (3, 3, H, W) colour-augmented [x_{t-1}, x_t, x_{t+1}], ``frames_raw`` the same
  without colour augmentation (for the photometric loss), ``K`` (4, 4) at (H, W); ``depth`` (H, W) when known.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import AugmentConfig, DatasetConfig, expand_root
from ..errors import DatasetError
from ..registry import register
from . import synthetic
from .common import atomic_save_npz, cache_dir, read_image, require_dir, resize_image, resize_label, to_image_tensor
from .transforms import Augment, augment_segmentation, augment_triplet


def _cityscapes_lut() -> np.ndarray:
    """labelId → trainId lookup table from the official Cityscapes label table (cityscapesscripts)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, 255, np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else 255
    return lut


def labelids_to_trainids(label_ids: np.ndarray) -> np.ndarray:
    return _cityscapes_lut()[label_ids]


def trainids_to_labelids(train_ids: np.ndarray) -> np.ndarray:
    """Inverse mapping (for writing synthetic data in the official layouts); void → 0 (unlabeled)."""
    from cityscapesscripts.helpers.labels import trainId2label

    lut = np.zeros(256, np.uint8)
    for tid, lab in trainId2label.items():
        if 0 <= tid < 255:
            lut[tid] = lab.id
    return lut[train_ids]


# --------------------------------------------------------------------------------------------- segmentation

class SegmentationDataset(Dataset):
    """Images and labels from a list of loaders; resize (eval) or downscale + random crop (train)."""

    task = "segmentation"

    def __init__(self, items: list, load: Callable, size: tuple[int, int], train: bool,
                 augment: AugmentConfig | None, downscale: float = 1.0, skip_bad: bool = False) -> None:
        self.items = items
        self.load = load
        self.size = size
        self.train = train
        self.downscale = downscale
        self.aug = Augment(augment) if (train and augment is not None) else None
        self.skip_bad = skip_bad
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        try:
            image, label = self.load(self.items[i])
        except DatasetError:
            if not self.skip_bad:
                raise
            self.skipped += 1
            return self[(i + 1) % len(self)]
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
                 augment: AugmentConfig | None) -> None:
        self.items = items
        self.load = load
        self.size = size
        self.aug = Augment(augment) if (train and augment is not None) else None

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


# ----------------------------------------------------------------------------------------------- synthetic

SPLIT_SEEDS = {"train": 0, "val": 1000, "test": 2000}
DEFAULT_SEQUENCES = {"train": 20, "val": 4, "test": 4}


def synthetic_arrays(cfg: DatasetConfig, domain: str, native: tuple[int, int] | None = None
                     ) -> dict[str, np.ndarray]:
    """Generated (and cached on disk) synthetic data for a dataset config."""
    opts = cfg.options
    split = cfg.split
    if split not in SPLIT_SEEDS:
        raise DatasetError(f"synthetic data has splits {sorted(SPLIT_SEEDS)}, not '{split}'")
    h, w = native or (cfg.height, cfg.width)
    spec = synthetic.SyntheticSpec(
        domain=domain, sequences=int(opts.get("sequences", DEFAULT_SEQUENCES[split])),
        frames=int(opts.get("frames", 12)), height=h, width=w,
        seed=int(opts.get("seed", 0)) + SPLIT_SEEDS[split])
    root = Path(expand_root(cfg.root, None) or cache_dir() / "synthetic")
    path = root / f"{domain}-{split}-{spec.key()}.npz"
    if path.is_file():
        with np.load(path) as data:
            return dict(data)
    arrays = synthetic.generate(spec)
    atomic_save_npz(path, **arrays)
    return arrays


def _allowed(opts: dict, allowed: set[str], name: str) -> None:
    unknown = set(opts) - allowed
    if unknown:
        raise DatasetError(f"dataset '{name}': unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")


@register("dataset", "synthetic")
def synthetic_segmentation(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None
                           ) -> SegmentationDataset:
    """Embedded synthetic driving frames with labels (options: domain city|drive, sequences, frames, seed)."""
    _allowed(cfg.options, {"domain", "sequences", "frames", "seed"}, cfg.name)
    data = synthetic_arrays(cfg, cfg.options.get("domain", "city"))
    images, labels = data["images"], data["labels"]
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))

    def load(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_image_tensor(images[i]), torch.from_numpy(labels[i].astype(np.int64))

    return SegmentationDataset(list(range(n)), load, (cfg.height, cfg.width), train, augment)


@register("dataset", "synthetic_video")
def synthetic_video(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None
                    ) -> VideoDataset:
    """Embedded synthetic driving video triplets with exact depth (options: domain, sequences, frames, seed)."""
    _allowed(cfg.options, {"domain", "sequences", "frames", "seed"}, cfg.name)
    data = synthetic_arrays(cfg, cfg.options.get("domain", "drive"))
    images, depth, seq = data["images"], data["depth"], data["sequence"]
    kn = normalized_intrinsics(data["K"], *images.shape[1:3])
    items = [i for i in range(1, len(images) - 1) if seq[i - 1] == seq[i] == seq[i + 1]]
    if cfg.limit is not None:
        items = items[: cfg.limit]

    def load(i: int):
        frames = torch.stack([to_image_tensor(images[j]) for j in (i - 1, i, i + 1)])
        return frames, kn, depth[i]

    return VideoDataset(items, load, (cfg.height, cfg.width), train, augment)


# ---------------------------------------------------------------------------------------------- cityscapes

CITYSCAPES_LAYOUT = """  <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""


@register("dataset", "cityscapes")
def cityscapes(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None
               ) -> SegmentationDataset:
    """Cityscapes fine annotations, labelIds → 19 trainIds; train: downscale 2 + random crop (options:
    downscale, skip_bad_images)."""
    _allowed(cfg.options, {"downscale", "skip_bad_images"}, cfg.name)
    root_s = expand_root(cfg.root, "CITYSCAPES_ROOT")
    if not root_s:
        raise DatasetError("Cityscapes root not set: give the dataset's root key in the recipe or set CITYSCAPES_ROOT. "
                           f"Expected layout:\n{CITYSCAPES_LAYOUT}")
    root = Path(root_s)
    img_dir = require_dir(root / "leftImg8bit" / cfg.split, "Cityscapes", CITYSCAPES_LAYOUT)
    gt_dir = require_dir(root / "gtFine" / cfg.split, "Cityscapes", CITYSCAPES_LAYOUT)
    items = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        gt = gt_dir / img.parent.name / img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        if not gt.is_file():
            raise DatasetError(f"Cityscapes: label file missing for {img}: expected {gt}")
        items.append((img, gt))
    if not items:
        raise DatasetError(f"Cityscapes: no *_leftImg8bit.png images under {img_dir}. Expected layout:\n"
                           f"{CITYSCAPES_LAYOUT}")
    if cfg.limit is not None:
        items = items[: cfg.limit]
    lut = _cityscapes_lut()

    def load(item):
        img, gt = item
        return to_image_tensor(read_image(img)), torch.from_numpy(lut[read_image(gt, "L")].astype(np.int64))

    return SegmentationDataset(items, load, (cfg.height, cfg.width), train, augment,
                               downscale=float(cfg.options.get("downscale", 2.0)),
                               skip_bad=bool(cfg.options.get("skip_bad_images", False)))


# ------------------------------------------------------------------------------------------------ KITTI raw

KITTI_LAYOUT = """  <root>/<date>/calib_cam_to_cam.txt
  <root>/<date>/<date>_drive_<id>_sync/image_02/data/<frame:010d>.png   (or .jpg; image_03 for side r)
  split file: lines '<date>/<date>_drive_<id>_sync <frame> <l|r>' (options.split_file, default
  <root>/splits/<split>_files.txt)"""

SIDES = {"l": "image_02", "r": "image_03"}


def read_kitti_calib(path: Path, side: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(3x4 P_rect of the camera, (height, width) of the rectified image) from calib_cam_to_cam.txt."""
    cam = SIDES[side][-2:]
    values: dict[str, np.ndarray] = {}
    try:
        for line in path.read_text().splitlines():
            if ":" in line:
                key, val = line.split(":", 1)
                try:
                    values[key.strip()] = np.array([float(x) for x in val.split()])
                except ValueError:
                    continue
    except OSError as exc:
        raise DatasetError(f"KITTI: cannot read calibration {path}: {exc}") from None
    if f"P_rect_{cam}" not in values or f"S_rect_{cam}" not in values:
        raise DatasetError(f"KITTI: {path} lacks P_rect_{cam} / S_rect_{cam}")
    w, h = values[f"S_rect_{cam}"]
    return values[f"P_rect_{cam}"].reshape(3, 4), (int(h), int(w))


def parse_split_file(path: Path) -> list[tuple[str, int, str]]:
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


def _kitti_frame(root: Path, folder: str, frame: int, side: str) -> Path | None:
    base = root / folder / SIDES[side] / "data"
    for ext in (".png", ".jpg"):
        p = base / f"{frame:010d}{ext}"
        if p.is_file():
            return p
    return None


@register("dataset", "kitti_raw")
def kitti_raw(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None) -> VideoDataset:
    """KITTI raw video triplets listed by a split file (KITTI / Eigen-Zhou split), intrinsics from calib."""
    _allowed(cfg.options, {"split_file"}, cfg.name)
    root_s = expand_root(cfg.root, "KITTI_ROOT")
    if not root_s:
        raise DatasetError(f"KITTI root not set: give the recipe's root or set KITTI_ROOT. Expected:\n{KITTI_LAYOUT}")
    root = require_dir(Path(root_s), "KITTI raw", KITTI_LAYOUT)
    split_file = Path(expand_root(cfg.options.get("split_file"), None) or root / "splits" / f"{cfg.split}_files.txt")
    entries = parse_split_file(split_file)
    items, dropped = [], 0
    calib_cache: dict[tuple[str, str], np.ndarray] = {}
    for folder, frame, side in entries:
        paths = [_kitti_frame(root, folder, frame + o, side) for o in (-1, 0, 1)]
        if any(p is None for p in paths):
            dropped += 1
            continue
        date = folder.split("/")[0]
        key = (date, side)
        if key not in calib_cache:
            p_rect, (h, w) = read_kitti_calib(root / date / "calib_cam_to_cam.txt", side)
            calib_cache[key] = normalized_intrinsics(p_rect, h, w)
        items.append((paths, calib_cache[key]))
    if not items:
        raise DatasetError(f"KITTI: none of the {len(entries)} samples in {split_file} has frames t-1, t, t+1 on "
                           f"disk under {root}. Expected:\n{KITTI_LAYOUT}")
    if cfg.limit is not None:
        items = items[: cfg.limit]

    def load(item):
        paths, kn = item
        return torch.stack([to_image_tensor(read_image(p)) for p in paths]), kn, None

    ds = VideoDataset(items, load, (cfg.height, cfg.width), train, augment)
    ds.dropped = dropped  # type: ignore[attr-defined]
    return ds


# ------------------------------------------------------------------------------------------ KITTI 2015 sem.

KITTI2015_LAYOUT = """  <root>/data_semantics/training/image_2/<id>_10.png
  <root>/data_semantics/training/semantic/<id>_10.png   (Cityscapes labelIds)"""


@register("dataset", "kitti2015")
def kitti2015(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None
              ) -> SegmentationDataset:
    """KITTI 2015 semantics: the 200 labelled training images (the KITTI split's test set), labelIds → trainIds."""
    _allowed(cfg.options, {"skip_bad_images"}, cfg.name)
    root_s = expand_root(cfg.root, "KITTI2015_ROOT")
    if not root_s:
        raise DatasetError(f"KITTI 2015 root not set: give the recipe's root or set KITTI2015_ROOT. Expected:\n"
                           f"{KITTI2015_LAYOUT}")
    root = Path(root_s)
    base = root / "data_semantics" / "training" if (root / "data_semantics").is_dir() else root / "training"
    img_dir = require_dir(base / "image_2", "KITTI 2015", KITTI2015_LAYOUT)
    sem_dir = require_dir(base / "semantic", "KITTI 2015", KITTI2015_LAYOUT)
    items = []
    for img in sorted(img_dir.glob("*.png")):
        sem = sem_dir / img.name
        if not sem.is_file():
            raise DatasetError(f"KITTI 2015: label missing for {img}: expected {sem}")
        items.append((img, sem))
    if not items:
        raise DatasetError(f"KITTI 2015: no images in {img_dir}. Expected:\n{KITTI2015_LAYOUT}")
    if cfg.limit is not None:
        items = items[: cfg.limit]
    lut = _cityscapes_lut()

    def load(item):
        img, sem = item
        return to_image_tensor(read_image(img)), torch.from_numpy(lut[read_image(sem, "L")].astype(np.int64))

    return SegmentationDataset(items, load, (cfg.height, cfg.width), train, augment,
                               skip_bad=bool(cfg.options.get("skip_bad_images", False)))


# --------------------------------------------------------------------------------------------- the builder

def build_dataset(cfg: DatasetConfig, train: bool = False, augment: AugmentConfig | None = None) -> Dataset:
    from ..plugins import get_registry

    return get_registry().get("dataset", cfg.name)(cfg, train=train, augment=augment)


def class_weights(ds: SegmentationDataset, num_classes: int, key: str) -> torch.Tensor:
    """ENet class weights over the training labels, computed once and cached under ``key``."""
    from ..losses import enet_class_weights

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    path = cache_dir() / "class_weights" / f"{safe}.npz"
    if path.is_file():
        with np.load(path) as data:
            counts = torch.from_numpy(data["counts"])
    else:
        counts = ds.label_counts(num_classes)
        atomic_save_npz(path, counts=counts.numpy())
    return enet_class_weights(counts)
