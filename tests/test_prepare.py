"""The prepared cache: real layouts decoded once, reused while the sources are unchanged, rebuilt when they or the
sizes change, resumable after a kill, never marked complete before every item is written and verified."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mtkit.core.errors import DatasetError
from mtkit.core.schema import DatasetConfig
from mtkit.data import cache, cache_writer, layouts, synthetic
from mtkit.recipe.prepare import dataset_folder, prepare_dataset

QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def city():
    return synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=4, height=64, width=128, seed=5))


def _cityscapes(root, split="train", **kw) -> DatasetConfig:
    return DatasetConfig(name="cityscapes", root=str(root), split=split, **kw)


def test_cityscapes_is_prepared_once_cropped_from_the_cache_and_rebuilt_when_sources_or_sizes_change(tmp_path, city):
    paths = layouts.write_cityscapes(tmp_path, city, "train")
    cfg = _cityscapes(tmp_path, height=24, width=48)  # training: stored downscaled by 2 (32x64), crops of 24x48
    first = prepare_dataset(cfg, True, "data.segmentation", workers=2, **QUIET)
    m = first.manifest
    assert not first.cached and m.complete and m.count == 8 and m.size == (32, 64) and m.crop == (24, 48)
    assert len(m.sources) == 16 and m.format == cache.FORMAT  # every image and label file, with size and mtime
    ds = cache.open_prepared(first.folder)
    half = torch.nn.functional.interpolate(torch.from_numpy(city["labels"][3].astype(np.float32))[None, None],
                                           size=(32, 64), mode="nearest")[0, 0]
    assert torch.equal(torch.from_numpy(np.array(ds.labels[3])).float(), half)
    keys = cache.training_keys(ds, [[3, 3, 3, 3]], torch.Generator().manual_seed(0))[0]
    assert len({k[1:] for k in keys}) > 1 and all(0 <= y <= 8 and 0 <= x <= 16 for _, y, x in keys)
    for i, y, x in keys:
        crop = ds[(i, y, x)]
        assert crop["image"].dtype == torch.uint8 and crop["image"].shape == (3, 24, 48)
        assert torch.equal(crop["label"].float(), half[y:y + 24, x:x + 48])
    serial = prepare_dataset(cfg.model_copy(update={"limit": 8}), True, "x", workers=0, **QUIET)
    assert np.array_equal(np.load(serial.folder / "images.npy"), np.load(first.folder / "images.npy"))  # 2 workers

    assert prepare_dataset(cfg, True, "data.segmentation", **QUIET).cached  # unchanged: reused
    os.utime(paths[5], ns=(1, 1))  # a source file changed (its mtime)
    again = prepare_dataset(cfg, True, "data.segmentation", **QUIET)
    assert not again.cached and again.reason == "sources changed" and again.folder == first.folder
    other = prepare_dataset(_cityscapes(tmp_path, height=16, width=32, options={"downscale": 4}), True, "x", **QUIET)
    assert other.folder != first.folder and other.manifest.size == (16, 32)  # another size: its own folder
    evaluation = prepare_dataset(_cityscapes(tmp_path, height=64, width=128), False, "data.eval.CS", **QUIET)
    item = cache.open_prepared(evaluation.folder)[2]
    assert torch.equal(item["image"], torch.from_numpy(city["images"][2]).permute(2, 0, 1).float())
    assert item["label"].dtype == torch.int64


def test_a_killed_prepare_is_never_complete_and_resumes_where_it_stopped(tmp_path, city, monkeypatch):
    layouts.write_cityscapes(tmp_path, city, "val")
    cfg = _cityscapes(tmp_path, "val", height=64, width=128)
    folder = dataset_folder(cfg, False)
    monkeypatch.setattr(cache_writer, "SAVE_EVERY_S", 0.0)
    real = cache_writer.ArrayFile.write
    calls = []

    def dies_after_five(self, i, array):
        calls.append(i)
        if len(calls) > 10:  # images and labels: five items written
            raise KeyboardInterrupt
        real(self, i, array)

    monkeypatch.setattr(cache_writer.ArrayFile, "write", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    assert not folder.exists() and json.loads((folder.parent / (folder.name + ".partial") / "manifest.json")
                                             .read_text())["complete"] is False
    with pytest.raises(DatasetError, match="not a complete prepared dataset"):
        cache.open_prepared(folder)
    calls.clear()
    monkeypatch.setattr(cache_writer.ArrayFile, "write", lambda self, i, a: calls.append(i) or real(self, i, a))
    done = prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    assert done.reason == "resumed" and sorted(set(calls)) == [5, 6, 7]  # only the items not yet written
    ds = cache.open_prepared(folder)
    assert all(torch.equal(ds[i]["image"], torch.from_numpy(city["images"][i]).permute(2, 0, 1).float())
               for i in range(8))

    def disk_full(self, i, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_writer.ArrayFile, "write", disk_full)
    small = _cityscapes(tmp_path, "val", height=32, width=64)
    with pytest.raises(DatasetError, match="No space left on device.*run prepare again: it resumes"):
        prepare_dataset(small, False, "data.eval.CS", **QUIET)
    assert not dataset_folder(small, False).exists()  # nothing claims to be complete
    with pytest.raises(DatasetError, match="No space left"):  # a forced rebuild keeps the complete cache meanwhile
        prepare_dataset(cfg, False, "data.eval.CS", force=True, **QUIET)
    assert len(cache.open_prepared(folder)) == 8


def test_a_corrupt_source_names_the_file_or_is_skipped_and_counted(tmp_path, city):
    paths = layouts.write_cityscapes(tmp_path, city, "val")
    paths[4].write_bytes(paths[4].read_bytes()[:80])  # truncated PNG
    cfg = _cityscapes(tmp_path, "val", height=32, width=64)
    with pytest.raises(DatasetError, match=f"cannot read image {paths[4]}.*--skip-bad"):
        prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    p = prepare_dataset(cfg, False, "data.eval.CS", skip_bad=True, **QUIET)
    assert p.manifest.count == 7 and len(p.manifest.skipped) == 1 and str(paths[4]) in p.manifest.skipped[0]
    ds = cache.open_prepared(p.folder)
    assert len(ds) == 7 and ds.skipped == 1


def test_another_cache_format_is_a_clear_message_and_prepare_rebuilds_it(tmp_path, city):
    layouts.write_cityscapes(tmp_path, city, "val")
    cfg = _cityscapes(tmp_path, "val", height=32, width=64)
    p = prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    manifest = p.folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"format":{cache.FORMAT}', '"format":0'))
    with pytest.raises(DatasetError, match="cache format 0, this mtkit reads format 1: run `mtkit prepare"):
        cache.open_prepared(p.folder)
    again = prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    assert again.reason == "another cache format" and cache.open_prepared(again.folder).manifest.format == 1
    # an interrupted prepare of another format is started again, not an error
    small = _cityscapes(tmp_path, "val", height=16, width=32)
    partial = dataset_folder(small, False).with_name(dataset_folder(small, False).name + ".partial")
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text('{"format": 0}')
    assert cache.open_prepared(prepare_dataset(small, False, "data.eval.CS", **QUIET).folder).manifest.count == 8


def test_a_damaged_cache_is_found_on_open_and_prepared_again(tmp_path, city):
    """A truncated array, an image changed in place, a corrupt manifest: opening the folder says what is wrong and
    how to fix it (one line); prepare rebuilds it instead of calling it cached; ``verify`` (mtkit prepare --verify)
    checks every item (on open, sets above ``FULL_CHECK_BYTES`` are checked by a sample)."""
    layouts.write_cityscapes(tmp_path, city, "val")
    cfg = _cityscapes(tmp_path, "val", height=32, width=64)
    p = prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    images = p.folder / "images.npy"
    intact = images.read_bytes()
    images.write_bytes(intact[:-1000])  # truncated
    with pytest.raises(DatasetError, match=r"is damaged: images.npy is unreadable or truncated.*mtkit prepare"):
        cache.open_prepared(p.folder)
    again = prepare_dataset(cfg, False, "data.eval.CS", **QUIET)
    assert not again.cached and again.reason == "damaged" and len(cache.open_prepared(p.folder)) == 8
    arr = np.load(images, mmap_mode="r+")  # one pixel of image 1 changed in place
    arr[1, 0, 0, 0] ^= 1
    arr.flush()
    del arr
    with pytest.raises(DatasetError, match="item 1 does not match its checksum"):
        cache.open_prepared(p.folder)
    fixed = prepare_dataset(cfg, False, "data.eval.CS", verify=True, **QUIET)
    assert fixed.reason == "damaged" and cache.open_prepared(p.folder)
    assert prepare_dataset(cfg, False, "data.eval.CS", verify=True, **QUIET).reason == "verified"
    (p.folder / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is damaged"):
        cache.open_prepared(p.folder)
    assert prepare_dataset(cfg, False, "data.eval.CS", **QUIET).reason == "damaged"


def test_kitti_video_stores_each_frame_once_with_its_intrinsics(tmp_path):
    drive = synthetic.generate(synthetic.SyntheticSpec("drive", sequences=2, frames=5, height=48, width=160, seed=6))
    layouts.write_kitti_raw(tmp_path, drive)
    p = prepare_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=24, width=80),
                        True, "data.depth", **QUIET)
    m = p.manifest
    assert m.kind == "video" and m.count == 6 and m.frames == 10  # 6 triplets share 10 frames
    assert len(m.sources) == 12  # 10 frames, the calibration and the split file
    ds = cache.open_prepared(p.folder)
    sample = ds[0]
    assert sample["frames"].shape == (3, 3, 24, 80) and sample["frames"].dtype == torch.uint8
    small = torch.nn.functional.interpolate(torch.from_numpy(drive["images"][:3]).permute(0, 3, 1, 2).float(),
                                            size=(24, 80), mode="bilinear", antialias=True, align_corners=False)
    assert (sample["frames"].float() - small).abs().max() <= 0.5 + 1e-4  # rounded to uint8
    assert float(sample["K"][0, 0]) == pytest.approx(drive["K"][0, 0] / 2, rel=1e-5)
    frame = sorted(tmp_path.rglob("0000000003.png"))[0]
    Image.fromarray(drive["images"][3]).save(frame)  # rewritten: the cache is stale
    assert not prepare_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=24,
                                             width=80), True, "data.depth", **QUIET).cached


def test_a_second_prepare_of_the_same_dataset_waits_for_the_first(tmp_path, city):
    """Another process is preparing the same dataset (here: a thread holding the lock of its .partial folder for
    half a second): prepare says so once and waits for it instead of stopping, then goes on."""
    import threading
    import time

    from mtkit.core.io import run_lock

    layouts.write_cityscapes(tmp_path, city, "val")
    cfg = _cityscapes(tmp_path, "val", height=32, width=64)
    folder = dataset_folder(cfg, False)
    held = threading.Event()

    def other():
        with run_lock(folder.with_name(folder.name + ".partial")):
            held.set()
            time.sleep(0.5)

    worker = threading.Thread(target=other)
    worker.start()
    held.wait(10)
    lines: list[str] = []
    t0 = time.perf_counter()
    p = prepare_dataset(cfg, False, "data.eval.CS", progress=False, log=lines.append)
    worker.join(10)
    assert time.perf_counter() - t0 >= 0.4 and sum("waiting for it to finish" in ln for ln in lines) == 1
    assert p.manifest.complete and len(cache.open_prepared(folder)) == 8


def test_a_prepare_that_waited_finds_the_dataset_the_other_process_completed(tmp_path, city, monkeypatch):
    import shutil
    import threading
    import time

    from mtkit.core.io import run_lock
    from mtkit.data import cache_writer as writer

    layouts.write_cityscapes(tmp_path, city, "val")
    cfg = _cityscapes(tmp_path, "val", height=32, width=64)
    folder = prepare_dataset(cfg, False, "data.eval.CS", **QUIET).folder
    aside = tmp_path / "aside"
    shutil.move(folder, aside)  # the other process's result, put in place while it holds the lock
    held = threading.Event()

    def other():
        with run_lock(folder.with_name(folder.name + ".partial")):
            held.set()
            time.sleep(0.3)
            shutil.move(aside, folder)

    worker = threading.Thread(target=other)
    worker.start()
    held.wait(10)
    monkeypatch.setattr(writer, "_prepare_segmentation", lambda *a, **k: pytest.fail("decoded again"))
    p = prepare_dataset(cfg, False, "data.eval.CS", progress=False, log=lambda m: None)
    worker.join(10)
    assert p.manifest.complete and len(cache.open_prepared(folder)) == 8
