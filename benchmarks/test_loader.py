"""The data path at the paper's resolutions: samples/s per loader core from the raw files (decode, resize, crop,
collate) vs from the prepared cache (slice uint8 arrays, collate), the prepare rate on 1 and 2 cores, and the
ratio of the cached loader to the training step's consumption at 640x192.

Fixture trees are written in the real layouts at the real sizes: Cityscapes 2048x1024 PNGs with labelId PNGs
(the synthetic city scenes upscaled, with sensor-like noise so that the PNGs are about as large as real ones), and
KITTI raw 1242x375 PNG frames with their calibration. The suite (timing off) runs every benchmark once on two
images; ``mtkit bench -k loader`` measures on more.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch
from bench_support import make_trainer, rounds, sync
from torch.utils.data import default_collate

from mtkit.core.schema import AugmentConfig, DatasetConfig
from mtkit.data import cache, layouts, synthetic
from mtkit.data.augment import augment_segmentation, augment_video, draw_params
from mtkit.recipe.prepare import prepare_dataset

QUIET = {"progress": False, "log": lambda *_: None}
BATCH = 12


def _upscaled(spec: synthetic.SyntheticSpec, height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    data = synthetic.generate(spec)
    rng = np.random.default_rng(seed)
    big = torch.nn.functional.interpolate(torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float(),
                                          size=(height, width), mode="bilinear", align_corners=False)
    noisy = big.permute(0, 2, 3, 1).numpy() + rng.normal(0, 3, (len(big), height, width, 3))
    labels = torch.nn.functional.interpolate(torch.from_numpy(data["labels"]).float()[:, None], size=(height, width),
                                             mode="nearest")[:, 0].numpy().astype(np.uint8)
    k = data["K"].copy()
    k[0] *= width / spec.width
    k[1] *= height / spec.height
    return {**data, "images": noisy.clip(0, 255).astype(np.uint8), "labels": labels, "K": k}


@pytest.fixture(scope="module")
def trees(request, tmp_path_factory):
    """Cityscapes (2048x1024) and KITTI raw (1242x375) trees on disk, and how many images each holds."""
    enabled = request.config.getoption("benchmark_enable") or not request.config.getoption("benchmark_disable")
    n = 24 if enabled else 2
    root = tmp_path_factory.mktemp("real-layouts")
    city = _upscaled(synthetic.SyntheticSpec("city", sequences=1, frames=n, height=128, width=256, seed=1), 1024, 2048,
                     1)
    layouts.write_cityscapes(root / "cityscapes", city, "train")
    drive = _upscaled(synthetic.SyntheticSpec("drive", sequences=1, frames=n + 2, height=94, width=310, seed=2), 375,
                      1242, 2)
    layouts.write_kitti_raw(root / "kitti", drive)
    return root, n


def _seg_cfg(root) -> DatasetConfig:  # the paper's Cityscapes training set: downscale 2, crops of 640x192
    return DatasetConfig(name="cityscapes", root=str(root / "cityscapes"), split="train", height=192, width=640)


def _kitti_cfg(root) -> DatasetConfig:
    return DatasetConfig(name="kitti_raw", root=str(root / "kitti"), split="train", height=192, width=640)


def _rate(fn, samples: int, n: int) -> float:
    """Samples/s of fn (median of n calls after one warm-up) on this process: one loader core."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return samples / statistics.median(times)


def _step_rate(benchmark) -> float | None:
    """Samples/s the 640x192 multi-task training step consumes on this machine (6 + 6 samples per step)."""
    if benchmark.disabled:
        return None
    s = make_trainer("paper", True)
    s.trainer.train_step(s.seg, s.dep)
    sync()
    t0 = time.perf_counter()
    s.trainer.train_step(s.seg, s.dep)
    sync()
    return s.images / (time.perf_counter() - t0)


def test_loader_cityscapes_raw_vs_cached(benchmark, trees):
    """Segmentation samples/s per loader core: raw PNG decode + downscale + crop + collate vs a crop sliced from the
    prepared cache + collate; the cached rate against the training step's consumption."""
    root, n = trees
    from mtkit.recipe.build import build_dataset

    source = build_dataset(_seg_cfg(root), train=True)
    ds = cache.open_prepared(prepare_dataset(_seg_cfg(root), True, "data.segmentation", **QUIET).folder)
    keys = cache.training_keys(ds, [[i % n for i in range(BATCH)]], torch.Generator().manual_seed(0))[0]
    (height, width), (h, w) = ds.size, ds.crop

    def raw() -> int:
        samples = []
        for i, y0, x0 in keys[:min(n, BATCH)]:
            image, label = source.stored(source.items[i])
            samples.append({"image": image[:, y0:y0 + h, x0:x0 + w], "label": label[y0:y0 + h, x0:x0 + w]})
        return len(default_collate(samples)["image"])

    def cached() -> int:
        return len(default_collate([ds[k] for k in keys])["image"])

    r = rounds(benchmark, 3)
    raw_rate, cached_rate = _rate(raw, min(n, BATCH), r), _rate(cached, len(keys), r)
    batch = default_collate([ds[k] for k in keys])
    aug = augment_segmentation(batch["image"], batch["label"], draw_params(AugmentConfig(), len(keys),
                                                                           torch.Generator().manual_seed(0)))
    assert aug["image"].shape == (len(keys), 3, h, w) and (height, width) == (512, 1024)
    step = _step_rate(benchmark)
    benchmark.extra_info.update(images=len(keys), raw_samples_per_s_per_core=raw_rate,
                                cached_samples_per_s_per_core=cached_rate, cached_vs_raw=cached_rate / raw_rate,
                                train_step_samples_per_s=step,
                                cached_core_vs_train_step=None if step is None else cached_rate / step)
    benchmark.pedantic(cached, rounds=r, iterations=1)


def test_loader_kitti_raw_vs_cached(benchmark, trees):
    """KITTI triplets/s per loader core: three 1242x375 PNG decodes + resize vs slicing the prepared frames."""
    root, n = trees
    from mtkit.recipe.build import build_dataset

    source = build_dataset(_kitti_cfg(root), train=True)
    ds = cache.open_prepared(prepare_dataset(_kitti_cfg(root), True, "data.depth", **QUIET).folder)
    idx = list(range(len(ds))) * (BATCH // len(ds) + 1)

    def raw() -> int:
        return len(default_collate([source[i] for i in range(len(source))])["frames"])

    def cached() -> int:
        return len(default_collate([ds[i] for i in idx[:BATCH]])["frames"])

    r = rounds(benchmark, 3)
    raw_rate, cached_rate = _rate(raw, len(source), r), _rate(cached, BATCH, r)
    batch = default_collate([ds[i] for i in idx[:BATCH]])
    out = augment_video(batch["frames"], batch["K"], draw_params(AugmentConfig(), BATCH,
                                                                 torch.Generator().manual_seed(0)))
    assert out["frames"].shape == (BATCH, 3, 3, 192, 640)
    step = _step_rate(benchmark)
    benchmark.extra_info.update(images=BATCH, raw_triplets_per_s_per_core=raw_rate,
                                cached_triplets_per_s_per_core=cached_rate, cached_vs_raw=cached_rate / raw_rate,
                                train_step_samples_per_s=step,
                                cached_core_vs_train_step=None if step is None else cached_rate / step)
    benchmark.pedantic(cached, rounds=r, iterations=1)


def test_prepare_rate(benchmark, trees):
    """Prepare images/s (decode, downscale, uint8, checksum, write) of the Cityscapes training set on 1 and 2
    decoding processes."""
    root, n = trees
    rates = {}
    for workers in (1, 2):
        p = prepare_dataset(_seg_cfg(root), True, "data.segmentation", workers=workers, force=True, **QUIET)
        rates[workers] = p.manifest.images_per_s
    benchmark.extra_info.update(images=n, prepare_images_per_s_1_core=rates[1], prepare_images_per_s_2_cores=rates[2],
                                scaling_2_vs_1=rates[2] / rates[1])
    benchmark.pedantic(lambda: prepare_dataset(_seg_cfg(root), True, "data.segmentation", **QUIET), rounds=1,
                       iterations=1)
