"""Writing the prepared cache (the layout and the reading are in ``cache``): decode every item once, in loader
workers, write it with plain file writes into ``<folder>.partial/``, save progress every second, verify every
item's CRC-32 and rename the folder into place (resumable and atomic)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.errors import DatasetError, MtkitError
from ..core.io import atomic_path, atomic_write, atomic_write_text, run_lock
from ..core.progress import progress_bar
from .base import SegmentationDataset, VideoDataset
from .cache import FORMAT, Manifest, item_crc, mtkit_version, read_manifest
from .sampling import unwrap_worker_errors

SAVE_EVERY_S = 1.0


class ArrayFile:
    """A ``.npy`` file of a known shape, written item by item with plain writes at their offsets (a full disk is
    an OSError here, where writing through a memory map would kill the process)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        if not path.is_file():
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)._mmap.close()  # header, sparse body
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            stored_shape, _, stored_dtype = read_header(fh)
            self.offset = fh.tell()
        if tuple(stored_shape) != tuple(shape) or np.dtype(stored_dtype) != np.dtype(dtype):
            raise MtkitError(f"{path} holds {stored_shape} {stored_dtype}, expected {shape} {np.dtype(dtype)}")
        self.dtype = np.dtype(dtype)
        self.item_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.fh = open(path, "r+b")  # noqa: SIM115 (closed by close())

    def write(self, i: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        if len(data) != self.item_bytes:
            raise MtkitError(f"item {i} has {len(data)} bytes, the array's items have {self.item_bytes}")
        self.fh.seek(self.offset + i * self.item_bytes)
        self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


class _Decode(Dataset):
    """The work of one prepare item, run in loader workers: decode, resize, convert to uint8, checksum."""

    def __init__(self, fn: Callable[[Any], tuple[np.ndarray, ...]], keys: Sequence[Any], skip_bad: bool) -> None:
        self.fn, self.keys, self.skip_bad = fn, keys, skip_bad

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int) -> tuple[int, tuple[np.ndarray, ...] | None, int | str]:
        try:
            arrays = self.fn(self.keys[j])
        except (DatasetError, OSError, ValueError) as exc:
            if not self.skip_bad:
                raise DatasetError(f"{exc} (prepare stops; --skip-bad leaves such items out and counts them)"
                                   ) from None
            return j, None, str(exc).splitlines()[0]
        return j, arrays, item_crc(*arrays)


def _unbatched(x: Any) -> Any:
    return x


def _uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float gray values → (H, W, 3) uint8, rounded."""
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def segmentation_item(source: SegmentationDataset, item: Any) -> tuple[np.ndarray, np.ndarray]:
    image, label = source.stored(item)
    if int(label.max()) > 255 or int(label.min()) < 0:
        raise DatasetError(f"{source.describe(item)}: labels must be trainIds 0..254 or 255 (void) to be stored as "
                           "uint8")
    return _uint8(image), label.to(torch.uint8).numpy()


def prepare_folder(source: SegmentationDataset | VideoDataset, folder: Path, dataset: dict[str, Any], train: bool,
                   sources: tuple[list[tuple[str, int, int]], str], workers: int = 0, skip_bad: bool = False,
                   progress: bool = True, label: str = "prepare", log: Callable[[str], None] = print) -> Manifest:
    """Decode ``source`` into ``folder`` (resuming a ``.partial`` folder of the same sources); the manifest.
    ``sources``: the source files' stats and key, as ``source_key`` gives them."""
    stats, skey = sources
    if folder.is_symlink():  # a prepared folder is replaced whole by a rename, which a link would turn into a mess
        raise DatasetError(f"{label}: the prepared folder {folder} is a symlink (to {folder.resolve()}) and must be "
                           "prepared again: remove the link, or set MTKIT_CACHE to the disk it points to")
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    with run_lock(partial, wait=log) as waited:  # a second prepare of the same dataset waits for the first
        done = _prepared_meanwhile(folder, skey) if waited else None
        if done is not None:
            return done
        partial.mkdir(parents=True, exist_ok=True)  # (the other process may have renamed it into place)
        try:
            stale = (old := read_manifest(partial)) is not None and old.source_key != skey
        except DatasetError:  # an interrupted prepare of another cache format
            stale = True
        if stale:
            log(f"{label}: the sources or the cache format changed since the interrupted prepare; starting again")
            for p in partial.iterdir():
                if p.name != ".lock":
                    p.unlink()
        args = (folder, partial, dataset, train, stats, skey, workers, skip_bad, progress, label)
        if isinstance(source, VideoDataset):
            return _prepare_video(source, *args)
        return _prepare_segmentation(source, *args)


def _prepared_meanwhile(folder: Path, skey: str) -> Manifest | None:
    """The manifest of ``folder`` when another process completed it from the same sources while this one waited."""
    try:
        manifest = read_manifest(folder)
    except (DatasetError, ValueError):
        return None
    return manifest if manifest is not None and manifest.complete and manifest.source_key == skey else None


def _run(work: _Decode, todo: list[int], workers: int, write: Callable[[int, tuple[np.ndarray, ...]], None],
         done: np.ndarray, crc: np.ndarray, bad: dict[int, str], save: Callable[[], None], progress: bool,
         label: str) -> tuple[float, float]:
    """Decode the ``todo`` items (in loader workers), write each, save progress every second; (seconds, items/s)."""
    start = last = time.perf_counter()
    if not todo:
        return 0.0, 0.0
    loader = DataLoader(work, batch_size=None, sampler=todo, num_workers=min(workers, len(todo)),
                        collate_fn=_unbatched)
    try:
        with progress_bar(progress, len(todo), label) as advance:
            for n, (j, arrays, check) in enumerate(unwrap_worker_errors(iter(loader)), 1):
                if arrays is None:
                    bad[j] = str(check)
                else:
                    write(j, arrays)
                    crc[j] = check
                done[j] = True
                if time.perf_counter() - last > SAVE_EVERY_S:
                    save()
                    last = time.perf_counter()
                advance(info=f"{n / max(time.perf_counter() - start, 1e-9):.0f} img/s")
        save()
    except OSError as exc:  # a full disk, a lost mount: the cache stays incomplete and resumable
        raise DatasetError(f"{label}: cannot write the prepared cache ({exc.strerror or exc}): free space or fix "
                           "the folder, then run prepare again: it resumes where it stopped") from None
    seconds = time.perf_counter() - start
    return seconds, len(todo) / max(seconds, 1e-9)


def _progress_io(partial: Path, n: int, files: list[ArrayFile]) -> tuple[np.ndarray, np.ndarray, dict[int, str],
                                                                           Callable[[], None]]:
    """The done mask, checksums and skipped items of an interrupted prepare (or fresh ones), and their saver."""
    path = partial / "progress.npz"
    done, crc, bad = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.uint32), {}
    if path.is_file():
        with np.load(path) as data:
            if len(data["done"]) == n:
                done, crc = data["done"].copy(), data["crc"].copy()
                bad = dict(zip(data["bad_index"].tolist(), data["bad_reason"].tolist()))

    def save() -> None:
        for f in files:  # the data first: progress never claims an item that is not on disk
            f.flush()
        atomic_write(path, lambda fh: np.savez(fh, done=done, crc=crc, bad_index=np.array(list(bad), dtype=np.int64),
                                               bad_reason=np.array(list(bad.values()), dtype=str)))
    return done, crc, bad, save


def _finish(partial: Path, folder: Path, manifest: Manifest, arrays: list[np.ndarray], crc: np.ndarray,
            items: np.ndarray) -> Manifest:
    """Verify each of ``items`` (its rows of ``arrays``) against its checksum, write the complete manifest and
    rename the folder into place."""
    for i in items:
        if item_crc(*(a[i] for a in arrays)) != int(crc[i]):
            raise DatasetError(f"{partial}: item {i} does not match its checksum after writing (disk error?); "
                               "delete the folder and run prepare again")
    manifest.complete = True
    _write_manifest(partial, manifest)
    (partial / "progress.npz").unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    (partial / ".lock").unlink(missing_ok=True)
    os.replace(partial, folder)
    return manifest


def _write_manifest(partial: Path, manifest: Manifest) -> None:
    atomic_write_text(partial / "manifest.json", manifest.model_dump_json())


def _prepare_segmentation(source: SegmentationDataset, folder: Path, partial: Path, dataset: dict[str, Any],
                          train: bool, stats: list, skey: str, workers: int, skip_bad: bool, progress: bool,
                          label: str) -> Manifest:
    n = len(source)
    h, w = source.stored_size()
    manifest = Manifest(format=FORMAT, mtkit_version=mtkit_version(), kind="segmentation", dataset=dataset,
                        train=train, size=(h, w), crop=source.size if train else (h, w), count=n, source_key=skey,
                        sources=stats)
    _write_manifest(partial, manifest)
    images = ArrayFile(partial / "images.npy", (n, h, w, 3), np.uint8)
    labels = ArrayFile(partial / "labels.npy", (n, h, w), np.uint8)
    done, crc, bad, save = _progress_io(partial, n, [images, labels])

    def write(j: int, arrays: tuple[np.ndarray, ...]) -> None:
        images.write(j, arrays[0])
        labels.write(j, arrays[1])

    work = _Decode(lambda item: segmentation_item(source, item), source.items, skip_bad)
    try:
        seconds, rate = _run(work, np.flatnonzero(~done).tolist(), workers, write, done, crc, bad, save, progress,
                             label)
    finally:
        images.close()
        labels.close()
    keep = np.ones(n, dtype=bool)
    keep[list(bad)] = False
    if not keep.any():
        raise DatasetError(f"{label}: none of the {n} items could be read (first: {next(iter(bad.values()))})")
    img, lab = np.load(partial / "images.npy", mmap_mode="r"), np.load(partial / "labels.npy", mmap_mode="r")
    if bad:  # compact: the kept items first, in order
        order = np.flatnonzero(keep)
        _compact(partial, "images.npy", img, order)
        _compact(partial, "labels.npy", lab, order)
        crc = crc[order]
        img, lab = np.load(partial / "images.npy", mmap_mode="r"), np.load(partial / "labels.npy", mmap_mode="r")
    np.save(partial / "crc.npy", crc)
    manifest.count, manifest.skipped = int(keep.sum()), [bad[j] for j in sorted(bad)]
    manifest.seconds, manifest.images_per_s = seconds, rate
    return _finish(partial, folder, manifest, [img, lab], crc, np.arange(manifest.count))


def _compact(partial: Path, name: str, array: np.ndarray, order: np.ndarray) -> None:
    """Rewrite ``name`` with only the rows ``order`` (plain writes, like every other write of the cache)."""
    with atomic_path(partial / name) as tmp:
        out = ArrayFile(tmp, (len(order), *array.shape[1:]), array.dtype)
        try:
            for k, i in enumerate(order):
                out.write(k, array[i])
            out.flush()
        finally:
            out.close()


def _prepare_video(source: VideoDataset, folder: Path, partial: Path, dataset: dict[str, Any], train: bool,
                   stats: list, skey: str, workers: int, skip_bad: bool, progress: bool, label: str) -> Manifest:
    frame_index: dict[Hashable, int] = {}
    triplets = np.array([[frame_index.setdefault(k, len(frame_index)) for k in source.frame_keys(item)]
                         for item in source.items], dtype=np.int64)
    keys = list(frame_index)
    h, w = source.size
    n, f = len(source.items), len(keys)
    manifest = Manifest(format=FORMAT, mtkit_version=mtkit_version(), kind="video", dataset=dataset, train=train,
                        size=(h, w), crop=(h, w), count=n, frames=f, source_key=skey, sources=stats)
    _write_manifest(partial, manifest)
    frames = ArrayFile(partial / "frames.npy", (f, h, w, 3), np.uint8)
    done, crc, bad, save = _progress_io(partial, f, [frames])
    work = _Decode(lambda key: (_uint8(source.frame(key)),), keys, skip_bad)
    try:
        seconds, rate = _run(work, np.flatnonzero(~done).tolist(), workers, lambda j, a: frames.write(j, a[0]),
                             done, crc, bad, save, progress, label)
    finally:
        frames.close()
    keep = ~np.isin(triplets, list(bad)).any(axis=1)
    if not keep.any():
        raise DatasetError(f"{label}: no sample has all three frames readable (first: {next(iter(bad.values()))})")
    kept = np.flatnonzero(keep)
    ks, depths = zip(*(source.meta(source.items[i]) for i in kept))
    np.save(partial / "triplets.npy", triplets[kept])
    np.save(partial / "K.npy", np.stack(ks).astype(np.float32))
    if depths[0] is not None:
        np.save(partial / "depth.npy", np.stack(depths).astype(np.float32))
    np.save(partial / "crc.npy", crc)
    manifest.count, manifest.skipped = len(kept), [bad[j] for j in sorted(bad)]
    manifest.seconds, manifest.images_per_s = seconds, rate
    frames_array = np.load(partial / "frames.npy", mmap_mode="r")
    return _finish(partial, folder, manifest, [frames_array], crc, np.unique(triplets[kept]))
