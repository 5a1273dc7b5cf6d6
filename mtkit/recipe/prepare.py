"""``mtkit prepare``: decode every dataset a recipe trains and evaluates on, once, into the prepared cache
(``mtkit.data.cache``), and open prepared datasets for training and evaluation.

A prepared folder is reused while its sources (file list, sizes, mtimes, or generated content) and the dataset's
config (name, split, sizes, options) are unchanged: a changed size gives another folder, changed sources rebuild
the folder, a cache of another format version is rebuilt with a message. The cache lives under
``$MTKIT_CACHE/prepared`` (default ``~/.cache/mtkit/prepared``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DatasetError
from ..core.io import cache_dir
from ..core.runtime import after_rank0, current_dist, local_world, node_jobs
from ..core.schema import DatasetConfig, Recipe, config_hash
from ..data.base import SegmentationDataset, VideoDataset
from ..data.cache import (
    FORMAT,
    CachedSegmentation,
    CachedVideo,
    Manifest,
    check_prepared,
    open_prepared,
    read_manifest,
    source_key,
)
from ..data.cache_writer import prepare_folder
from .build import build_dataset


@dataclass
class Prepared:
    """One dataset of a recipe in the cache: where, what it holds, and whether this call reused it."""

    key: str
    folder: Path
    manifest: Manifest
    cached: bool
    reason: str


def default_workers(recipe_workers: int | None) -> int:
    """Loader and prepare processes per rank: the recipe's ``data.num_workers``, or the node's cores shared by
    its processes (torchrun's LOCAL_WORLD_SIZE, times the --jobs processes running at once), at least one."""
    if recipe_workers is not None:
        return recipe_workers
    return max(1, (os.cpu_count() or 1) // (local_world() * node_jobs()))


def dataset_folder(cfg: DatasetConfig, train: bool) -> Path:
    """The prepared folder of a dataset config in training or evaluation form."""
    mode = "train" if train else "eval"
    return cache_dir() / "prepared" / f"{cfg.name}-{cfg.split}-{mode}-{config_hash(cfg.model_dump(), train, FORMAT)}"


#: the recipe keys whose datasets are stored in training form (random crops at load); the others in evaluation form
TRAINING_KEYS = ("data.segmentation", "data.depth")


def recipe_datasets(recipe: Recipe) -> dict[str, tuple[DatasetConfig, bool]]:
    """The datasets training and evaluation read from the cache: recipe key → (config, training form); the depth
    evaluation sets (metric ground truth at its native size) are read from their sources."""
    return {key: (cfg, key in TRAINING_KEYS) for key, cfg in recipe.datasets().items()
            if not key.startswith("data.depth_eval.")}


def prepare_dataset(cfg: DatasetConfig, train: bool, where: str, workers: int = 0, skip_bad: bool = False,
                    force: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                    verify: bool = False) -> Prepared:
    """Decode one dataset into the cache, or reuse it when its sources and config are unchanged and it is intact
    (``check_prepared``: shapes, readability and checksums; every item's with ``verify``); a damaged one is
    prepared again."""
    source = build_dataset(cfg, train=train, where=where)
    if not isinstance(source, SegmentationDataset | VideoDataset):
        raise DatasetError(f"{where} ({cfg.name}): the loader returns a {type(source).__name__}; the prepared cache "
                           "stores SegmentationDataset and VideoDataset sources (mtkit.plugin_api)")
    folder = dataset_folder(cfg, train)
    dataset = cfg.model_dump(mode="json")
    sources = source_key(source, dataset)  # stats every source file once, for the check and the manifest
    reason = "new"
    try:
        manifest = read_manifest(folder)
    except DatasetError as exc:
        manifest, reason = None, "another cache format"
        log(f"{where}: {str(exc).split(': run')[0]}; preparing it again")
    except ValueError:
        manifest, reason = None, "damaged"
        log(f"{where}: {folder.name}/manifest.json is damaged; preparing it again")
    if manifest is not None and manifest.complete and not force:
        if sources[1] != manifest.source_key:
            reason = "sources changed"
            log(f"{where}: the source files changed since {folder.name} was prepared; preparing it again")
        elif (problem := check_prepared(folder, manifest, full=verify)) is None:
            return Prepared(where, folder, manifest, True, "verified" if verify else "unchanged")
        else:
            reason = "damaged"
            log(f"{where}: {folder.name} is damaged ({problem}); preparing it again")
    elif force and manifest is not None:
        reason = "forced"
    if folder.with_name(folder.name + ".partial").is_dir() and reason == "new":
        reason = "resumed"
    manifest = prepare_folder(source, folder, dataset, train, sources, workers, skip_bad, progress,
                              label=f"prepare {where}", log=log)
    return Prepared(where, folder, manifest, False, reason)


def prepare_recipe(recipe: Recipe, workers: int | None = None, skip_bad: bool = False, force: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print, verify: bool = False
                   ) -> list[Prepared]:
    """Prepare every dataset of ``recipe`` (the first stage of ``mtkit run``); ``verify`` checks every item of
    the cached ones against its checksum."""
    n = default_workers(recipe.data.num_workers if workers is None else workers)
    return [prepare_dataset(cfg, train, key, n, skip_bad, force, progress, log, verify)
            for key, (cfg, train) in recipe_datasets(recipe).items()]


class PreparedData:
    """The one prepared-data handle of a run: every dataset of the recipe prepared and verified once
    (``prepare_recipe``), opened once (``opened``) and handed to training, evaluation and detection."""

    def __init__(self, prepared: list[Prepared]) -> None:
        self.prepared = prepared
        self._opened: dict[str, CachedSegmentation | CachedVideo] | None = None

    def opened(self) -> dict[str, CachedSegmentation | CachedVideo]:
        """Recipe key → the opened prepared dataset."""
        if self._opened is None:
            self._opened = {p.key: open_prepared(p.folder) for p in self.prepared}
        return self._opened


def handed_or_prepared(recipe: Recipe, key: str, data: dict | None = None, progress: bool = True,
                       log: Callable[[str], None] = print) -> CachedSegmentation | CachedVideo:
    """A recipe's dataset ``key``: the run's opened one (``data``, from ``PreparedData.opened``) when it was handed
    on, else opened from the cache (``prepared_dataset``, preparing it first when needed)."""
    if data is not None and key in data:
        return data[key]
    return prepared_dataset(recipe, key, progress, log)


def prepared_dataset(recipe: Recipe, key: str, progress: bool = True,
                     log: Callable[[str], None] = print) -> CachedSegmentation | CachedVideo:
    """A recipe's dataset (``data.segmentation``, ``data.eval.CS``, ...) from the cache, preparing it first when
    needed; under torchrun rank 0 prepares while the others wait."""
    cfg, train = recipe_datasets(recipe)[key]
    after_rank0(current_dist(), f"prepare {key}", lambda: prepare_dataset(
        cfg, train, key, default_workers(recipe.data.num_workers), progress=progress, log=log), others=False)
    return open_prepared(dataset_folder(cfg, train))
