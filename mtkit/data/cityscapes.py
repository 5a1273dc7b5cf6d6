"""Cityscapes (fine annotations) and KITTI 2015 semantics: image and labelId folders, mapped to the 19 trainIds,
through the one shared folder loader (``base.labelled_folder``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..core.errors import DatasetError
from ..core.registry import register
from ..core.schema import AugmentConfig, DatasetConfig, expand_root
from .base import DatasetOptions, SegmentationDataset, labelled_folder
from .labels import cityscapes_known_ids, cityscapes_lut

CITYSCAPES_LAYOUT = """  <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""

KITTI2015_LAYOUT = """  <root>/data_semantics/training/image_2/<id>_10.png
  <root>/data_semantics/training/semantic/<id>_10.png   (Cityscapes labelIds)"""


class CityscapesOptions(DatasetOptions):
    downscale: float = Field(2.0, gt=0, description="training images are downscaled by this factor before cropping")
    skip_bad_images: bool = Field(False, description="skip unreadable images instead of stopping")


class Kitti2015Options(DatasetOptions):
    skip_bad_images: bool = False


def _root(cfg: DatasetConfig, env: str, what: str, layout: str) -> Path:
    root = expand_root(cfg.root, env)
    if not root:
        raise DatasetError(f"{what} root not set: give the dataset's root key in the recipe or set {env}. "
                           f"Expected layout:\n{layout}")
    return Path(root)


@register("dataset", "cityscapes", options=CityscapesOptions)
def cityscapes(cfg: DatasetConfig, options: CityscapesOptions, train: bool = False,
               augment: AugmentConfig | None = None) -> SegmentationDataset:
    """Cityscapes fine annotations, labelIds → 19 trainIds; train: downscale 2 + random crop."""
    root = _root(cfg, "CITYSCAPES_ROOT", "Cityscapes", CITYSCAPES_LAYOUT)
    gt_dir = root / "gtFine" / cfg.split
    return labelled_folder(
        "Cityscapes", CITYSCAPES_LAYOUT, root / "leftImg8bit" / cfg.split, gt_dir, "*/*_leftImg8bit.png",
        lambda img: gt_dir / img.parent.name / img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"),
        cityscapes_lut(), cityscapes_known_ids(), (cfg.height, cfg.width), train, cfg.limit,
        options.downscale, options.skip_bad_images)


@register("dataset", "kitti2015", options=Kitti2015Options)
def kitti2015(cfg: DatasetConfig, options: Kitti2015Options, train: bool = False,
              augment: AugmentConfig | None = None) -> SegmentationDataset:
    """KITTI 2015 semantics: the 200 labelled training images (the KITTI split's test set), labelIds → trainIds."""
    root = _root(cfg, "KITTI2015_ROOT", "KITTI 2015", KITTI2015_LAYOUT)
    base = root / "data_semantics" / "training" if (root / "data_semantics").is_dir() else root / "training"
    return labelled_folder(
        "KITTI 2015", KITTI2015_LAYOUT, base / "image_2", base / "semantic", "*.png",
        lambda img: base / "semantic" / img.name, cityscapes_lut(), cityscapes_known_ids(), (cfg.height, cfg.width),
        train, cfg.limit, skip_bad=options.skip_bad_images)
