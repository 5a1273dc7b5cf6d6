from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mtkit.core.errors import DatasetError, RecipeError
from mtkit.core.schema import DatasetConfig
from mtkit.data import layouts, synthetic
from mtkit.data.kitti import parse_split_file
from mtkit.data.labels import labelids_to_trainids
from mtkit.data.stats import class_weights
from mtkit.data.synthetic.sets import synthetic_arrays
from mtkit.recipe.build import build_dataset


@pytest.fixture(scope="module")
def city():
    return synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=4, height=64, width=128, seed=5))


@pytest.fixture(scope="module")
def drive():
    return synthetic.generate(synthetic.SyntheticSpec("drive", sequences=2, frames=5, height=48, width=160, seed=6))


def test_synthetic_is_deterministic_and_complete(city):
    again = synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=4, height=64, width=128, seed=5))
    for key in city:
        assert np.array_equal(city[key], again[key]), key
    other = synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=4, height=64, width=128, seed=6))
    assert not np.array_equal(city["images"], other["images"])
    assert city["images"].dtype == np.uint8 and city["images"].shape == (8, 64, 128, 3)
    classes = set(np.unique(city["labels"]).tolist())
    assert {synthetic.ROAD, synthetic.SIDEWALK, synthetic.BUILDING, synthetic.SKY} <= classes
    assert classes <= set(range(19))
    sky = city["labels"] == synthetic.SKY
    assert (city["depth"][sky] == 0).all() and (city["depth"][~sky] > 0).all()
    assert city["poses"].shape == (8, 4, 4)
    # the camera drives forward: z of consecutive frames of a clip increases
    assert (np.diff(city["poses"][:4, 2, 3]) > 0).all()


def test_domains_differ(city):
    drive = synthetic.generate(synthetic.SyntheticSpec("drive", sequences=2, frames=4, height=64, width=128, seed=5))
    road_c = city["images"][city["labels"] == synthetic.ROAD].mean(0)
    road_d = drive["images"][drive["labels"] == synthetic.ROAD].mean(0)
    assert np.abs(road_c - road_d).max() > 10


def test_synthetic_generation_is_cached(monkeypatch):
    cfg = DatasetConfig(name="synthetic", split="val", height=32, width=64, options={"sequences": 1, "frames": 3})
    first = synthetic_arrays(cfg)
    monkeypatch.setattr("mtkit.data.synthetic.sets.generate",
                        lambda spec: (_ for _ in ()).throw(AssertionError("regenerated")))
    second = synthetic_arrays(cfg)
    assert np.array_equal(first["images"], second["images"])


def test_official_label_table():
    ids = np.array([0, 7, 8, 11, 21, 23, 24, 26, 33, 255], np.uint8)
    assert labelids_to_trainids(ids).tolist() == [255, 0, 1, 2, 8, 10, 11, 13, 18, 255]


def test_cityscapes_layout_roundtrip(tmp_path, city):
    layouts.write_cityscapes(tmp_path, city, "train")
    layouts.write_cityscapes(tmp_path, city, "val")
    val = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val", height=64, width=128))
    assert len(val) == 8
    item = val[3]
    assert item["image"].shape == (3, 64, 128) and item["label"].dtype == torch.int64
    assert torch.equal(item["label"], torch.from_numpy(city["labels"][3].astype(np.int64)))
    assert torch.allclose(item["image"], torch.from_numpy(city["images"][3]).permute(2, 0, 1).float())
    # training form: downscaled by 2 (the crops are cut from the prepared cache)
    train = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="train", height=24, width=48),
                          train=True)
    image, label = train.stored(train.items[0])
    half = torch.nn.functional.interpolate(torch.from_numpy(city["labels"][0].astype(np.float32))[None, None],
                                           size=(32, 64), mode="nearest")[0, 0].long()
    assert image.shape == (3, 32, 64) and train.stored_size() == (32, 64) and torch.equal(label, half)


def test_cityscapes_errors(tmp_path, city):
    with pytest.raises(DatasetError, match="folder not found: .*leftImg8bit/val.*Expected layout"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "nope"), split="val"))
    with pytest.raises(DatasetError, match="CITYSCAPES_ROOT"):
        build_dataset(DatasetConfig(name="cityscapes", split="val"))
    paths = layouts.write_cityscapes(tmp_path, city, "val")
    paths[2].write_bytes(paths[2].read_bytes()[:60])  # truncated PNG
    ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val", height=64, width=128))
    with pytest.raises(DatasetError, match=f"cannot read image {paths[2]}"):
        ds[2]
    ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val", height=64, width=128,
                                     options={"skip_bad_images": True}))
    # the bad image is left out up front and counted once; no image is seen twice
    assert len(ds) == len(paths) - 1 and ds.skipped == 1
    assert all(not torch.equal(ds[i]["image"], ds[i + 1]["image"]) for i in range(len(ds) - 1))
    for p in paths:
        p.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="none of the .* images .* can be read"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val",
                                    options={"skip_bad_images": True}))
    with pytest.raises(RecipeError, match="unknown option 'data.options.dowscale' of dataset 'cityscapes'; did you "
                                         "mean 'downscale'"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val", options={"dowscale": 2}))


def test_label_ids_outside_the_table_are_an_error_naming_the_file(tmp_path, city):
    layouts.write_cityscapes(tmp_path, city, "val")
    label = sorted((tmp_path / "gtFine").rglob("*_labelIds.png"))[0]
    ids = np.array(Image.open(label))
    ids[:4, :4] = 40  # not a Cityscapes labelId
    Image.fromarray(ids).save(label)
    ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val", height=64, width=128))
    with pytest.raises(DatasetError, match=rf"{label.name} has 16 pixels with label ids \[40\]"):
        ds[0]


def test_kitti_raw_layout(tmp_path, drive):
    split = layouts.write_kitti_raw(tmp_path, drive, interior_only=False)
    assert len(parse_split_file(split)) == 10
    with pytest.raises(DatasetError, match=r"4 of the 10 lines .* lack frame t-1 or t\+1 .*max_dropped"):
        build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=24, width=80))
    ds = build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=24, width=80,
                                     options={"max_dropped": 0.5}))
    assert len(ds) == 6 and ds.dropped == 4  # first and last frame of each of the 2 drives lack a neighbour
    split = layouts.write_kitti_raw(tmp_path, drive)  # what KITTI's split files list: frames with neighbours
    ds = build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=24, width=80))
    assert len(ds) == 6 and ds.dropped == 0
    item = ds[0]
    assert item["frames"].shape == (3, 3, 24, 80) and item["K"].shape == (4, 4)
    k = drive["K"]
    assert item["K"][0, 0].item() == pytest.approx(k[0, 0] / 160 * 80, rel=1e-5)
    assert item["K"][1, 1].item() == pytest.approx(k[1, 1] / 48 * 24, rel=1e-5)
    assert item["K"][0, 2].item() == pytest.approx(k[0, 2] / 160 * 80, rel=1e-5)
    full = build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train", height=48, width=160))
    assert torch.allclose(full[0]["frames"][1], torch.from_numpy(drive["images"][1]).permute(2, 0, 1).float())
    frame = sorted((tmp_path / "2011_09_26").rglob("0000000002.png"))[0]
    Image.fromarray(drive["images"][0][:40]).save(frame)  # a frame of another size
    with pytest.raises(DatasetError, match=rf"{frame.name} is 160x40, but the calibration .* gives 160x48"):
        full[0]
    calib = tmp_path / "2011_09_26" / "calib_cam_to_cam.txt"
    calib.write_text(calib.read_text().replace("P_rect_02: ", "P_rect_02: 1.0 ", 1).rsplit(" ", 2)[0] + "\n")
    with pytest.raises(DatasetError, match=r"calib_cam_to_cam.txt: 'P_rect_02' needs 12 numbers, found 11"):
        build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train"))
    split.write_text("2011_09_26/2011_09_26_drive_0000_sync 1 l\nbroken line\n")
    with pytest.raises(DatasetError, match=r"train_files.txt:2: expected"):
        build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="train"))
    with pytest.raises(DatasetError, match="split file not found"):
        build_dataset(DatasetConfig(name="kitti_raw", root=str(tmp_path), split="val"))


def test_kitti2015_layout(tmp_path, drive):
    layouts.write_kitti2015(tmp_path, drive)
    ds = build_dataset(DatasetConfig(name="kitti2015", root=str(tmp_path), split="test", height=48, width=160))
    assert len(ds) == 10
    assert torch.equal(ds[4]["label"], torch.from_numpy(drive["labels"][4].astype(np.int64)))
    with pytest.raises(DatasetError, match="image_2.*Expected layout"):
        build_dataset(DatasetConfig(name="kitti2015", root=str(tmp_path / "x"), split="test"))


def test_class_weights_are_cached_by_the_labels_content(tmp_path, city, monkeypatch):
    """ENet weights are cached under a key of the label files (sizes, mtimes) and the label table: the same data
    is not counted twice, relabelled data and another root are counted anew, and force recounts."""
    layouts.write_cityscapes(tmp_path / "a", city, "train")
    cfg = DatasetConfig(name="cityscapes", root=str(tmp_path / "a"), split="train", height=32, width=64)
    ds = build_dataset(cfg)
    w = class_weights(ds, 19)
    counts = torch.zeros(19, dtype=torch.float64)
    for lab in city["labels"]:
        counts += torch.bincount(torch.from_numpy(lab.astype(np.int64)).flatten(), minlength=19).double()
    p = counts / counts.sum()
    assert torch.allclose(w.weights, (1 / torch.log(1.02 + p)).float())
    calls = []
    original = type(ds).label_counts
    monkeypatch.setattr(type(ds), "label_counts", lambda self, n: calls.append(1) or original(self, n))
    assert torch.equal(class_weights(build_dataset(cfg), 19).weights, w.weights) and calls == []  # cached
    # relabel one file (all road): a new key, new counts, new weights
    label_file = sorted((tmp_path / "a" / "gtFine").rglob("*_labelIds.png"))[0]
    Image.fromarray(np.full(city["labels"][0].shape, 7, np.uint8)).save(label_file)
    relabelled = class_weights(build_dataset(cfg), 19)
    assert calls == [1] and relabelled.key != w.key and not torch.equal(relabelled.weights, w.weights)
    # the same files under another root (as CITYSCAPES_ROOT would point) are another source
    layouts.write_cityscapes(tmp_path / "b", city, "train")
    monkeypatch.setenv("CITYSCAPES_ROOT", str(tmp_path / "b"))
    other = class_weights(build_dataset(cfg.model_copy(update={"root": None})), 19)
    assert other.key not in (w.key, relabelled.key) and torch.allclose(other.weights, w.weights)
    calls.clear()
    class_weights(build_dataset(cfg), 19, force=True)
    assert calls == [1]




def test_rendering_is_the_same_in_tiles_and_on_any_number_of_processes(monkeypatch):
    """The renderer culls boxes per 32x32 tile by their screen rectangle: every frame equals the one rendered
    without tiles (each pixel against every box ahead), bit for bit; and clips rendered on 2 processes equal those
    of one (each clip is seeded on its own)."""
    spec = synthetic.SyntheticSpec("city", sequences=3, frames=3, height=48, width=160, seed=9)
    tiled = synthetic.generate(spec)
    monkeypatch.setattr("mtkit.data.synthetic.raycast.TILE", 10**6)  # one tile: the whole image against every box
    whole = synthetic.generate(spec)
    for key in tiled:
        assert np.array_equal(tiled[key], whole[key]), key
    monkeypatch.undo()
    parallel = synthetic.generate(spec, workers=2)
    for key in tiled:
        assert np.array_equal(tiled[key], parallel[key]), key
