"""Depth evaluation on the KITTI Eigen protocol: Velodyne projection, calibration errors, the loader on the real
layout, the metrics of a whole evaluation, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from support import tiny_recipe

from mtkit.core.errors import DatasetError
from mtkit.core.results import RunResults
from mtkit.core.schema import DatasetConfig, DepthEvaluationConfig
from mtkit.data import layouts, synthetic
from mtkit.data.depth_gt import load_velodyne, project_velodyne
from mtkit.data.kitti_calib import velo_to_image
from mtkit.evaluation.depth import evaluate_depth_model
from mtkit.recipe.build import build_dataset

FX, FY, CX, CY = 721.5, 721.5, 609.6, 172.9


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _calib(tmp_path, p_rect_numbers: int = 12):
    r_rect = _rot_y(0.01)
    p_rect = np.array([[FX, 0, CX, 44.9], [0, FY, CY, 0.2], [0, 0, 1, 0.003]])
    velo_r = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]) @ _rot_y(0.02)
    velo_t = np.array([-0.004, -0.076, -0.27])
    c2c, v2c = tmp_path / "calib_cam_to_cam.txt", tmp_path / "calib_velo_to_cam.txt"
    fmt = " ".join
    c2c.write_text(f"calib_time: 09-Jan-2012 13:57:47\nS_rect_02: 1.242000e+03 3.750000e+02\n"
                   f"R_rect_00: {fmt(f'{v:.12e}' for v in r_rect.flatten())}\n"
                   f"P_rect_02: {fmt(f'{v:.12e}' for v in p_rect.flatten()[:p_rect_numbers])}\n")
    v2c.write_text(f"calib_time: 15-Mar-2012 11:37:16\nR: {fmt(f'{v:.12e}' for v in velo_r.flatten())}\n"
                   f"T: {fmt(f'{v:.12e}' for v in velo_t)}\n")
    return c2c, v2c, r_rect, p_rect, velo_r, velo_t


def _to_velo(rect_point, r_rect, velo_r, velo_t):
    """A point in rectified camera coordinates → Velodyne coordinates (the inverse of the calibration chain)."""
    cam = r_rect.T @ np.asarray(rect_point, dtype=np.float64)
    return velo_r.T @ (cam - velo_t)


def test_a_velodyne_point_lands_on_its_pixel_at_its_depth(tmp_path):
    c2c, v2c, r_rect, p_rect, velo_r, velo_t = _calib(tmp_path)
    proj, shape = velo_to_image(c2c, v2c, 2)
    assert shape == (375, 1242)
    x, y, z = 2.0, 0.5, 10.0
    hom = p_rect @ np.array([x, y, z, 1.0])
    u, v = hom[0] / hom[2], hom[1] / hom[2]
    near = _to_velo([x, y, z], r_rect, velo_r, velo_t)
    far_rect = np.linalg.solve(p_rect[:, :3], 2 * hom - p_rect[:, 3])  # projects onto the same pixel, twice as far
    far = _to_velo(far_rect, r_rect, velo_r, velo_t)  # hidden behind the near point
    other = _to_velo([-3.0, 1.0, 25.0], r_rect, velo_r, velo_t)
    behind = _to_velo([0.0, 0.0, -5.0], r_rect, velo_r, velo_t)  # behind the scanner: x < 0
    outside = _to_velo([50.0, 0.0, 5.0], r_rect, velo_r, velo_t)  # beyond the right border
    scan = np.array([[*p, 0.5] for p in (near, far, other, behind, outside)], dtype=np.float32)
    path = tmp_path / "0000000069.bin"
    scan.tofile(path)
    depth = project_velodyne(load_velodyne(path), proj, shape)
    # the projected depth is the rectified camera's z (P_rect's last row adds its small offset 0.003)
    col, row = round(u) - 1, round(v) - 1  # the protocol's pixel: round(u) - 1 (KITTI devkit heritage)
    assert depth[row, col] == pytest.approx(z + 0.003, rel=1e-5)
    hom2 = p_rect @ np.array([-3.0, 1.0, 25.0, 1.0])
    assert depth[round(hom2[1] / hom2[2]) - 1, round(hom2[0] / hom2[2]) - 1] == pytest.approx(25.003, rel=1e-5)
    assert (depth > 0).sum() == 2  # the hidden, the behind and the outside point left no trace


def test_calibration_mistakes_name_the_file_and_key(tmp_path):
    c2c, v2c, *_ = _calib(tmp_path, p_rect_numbers=11)
    with pytest.raises(DatasetError, match=r"calib_cam_to_cam.txt: 'P_rect_02' needs 12 numbers, found 11"):
        velo_to_image(c2c, v2c, 2)
    with pytest.raises(DatasetError, match="calibration file not found.*calib_velo_to_cam"):
        velo_to_image(c2c, tmp_path / "nope" / "calib_velo_to_cam.txt", 2)
    (tmp_path / "bad.bin").write_bytes(b"\0" * 6)
    with pytest.raises(DatasetError, match="bad.bin is not a Velodyne scan"):
        load_velodyne(tmp_path / "bad.bin")


@pytest.fixture(scope="module")
def eigen_tree(tmp_path_factory):
    drive = synthetic.generate(synthetic.SyntheticSpec("drive", sequences=2, frames=4, height=48, width=160, seed=3))
    root = tmp_path_factory.mktemp("kitti")
    layouts.write_kitti_eigen(root, drive)
    return root, drive


def test_eigen_loader_reads_the_real_layout_and_its_ground_truth_is_the_projected_scan(eigen_tree):
    root, drive = eigen_tree
    ds = build_dataset(DatasetConfig(name="kitti_eigen", root=str(root), split="test", height=24, width=80))
    assert len(ds) == 8 and ds.skipped == 0
    for i in (0, 5):
        s = ds[i]
        assert s["image"].shape == (3, 24, 80) and s["depth"].shape == (48, 160)
        np.testing.assert_allclose(s["depth"].numpy(), drive["depth"][i], rtol=1e-4, atol=1e-4)


def test_missing_scan_is_an_error_naming_it_unless_skipped(eigen_tree, tmp_path):
    root, drive = eigen_tree
    split = root / "splits" / "eigen_test_files.txt"
    lines = split.read_text().splitlines()
    custom = tmp_path / "split.txt"
    custom.write_text("\n".join([*lines[:3], "2011_09_26/2011_09_26_drive_0009_sync 5 l"]) + "\n")
    cfg = DatasetConfig(name="kitti_eigen", root=str(root), split="test", options={"split_file": str(custom)})
    with pytest.raises(DatasetError, match=r"drive_0009_sync 5 l.*not found.*skip_missing"):
        build_dataset(cfg)
    ds = build_dataset(cfg.model_copy(update={"options": {**cfg.options, "skip_missing": True}}))
    assert len(ds) == 3 and ds.skipped == 1


def test_improved_ground_truth_maps_are_read_as_metres(eigen_tree, tmp_path):
    root, drive = eigen_tree
    folder, frame, _ = (root / "splits" / "eigen_test_files.txt").read_text().splitlines()[0].split()
    gt_dir = tmp_path / "improved" / "val" / folder.split("/")[1] / "proj_depth" / "groundtruth" / "image_02"
    gt_dir.mkdir(parents=True)
    raw = np.zeros((48, 160), np.uint16)
    raw[30, 40] = 2560  # 10 m
    Image.fromarray(raw).save(gt_dir / f"{int(frame):010d}.png")
    custom = tmp_path / "split.txt"
    custom.write_text(f"{folder} {frame} l\n")
    ds = build_dataset(DatasetConfig(name="kitti_eigen", root=str(root), split="test", options={
        "split_file": str(custom), "improved_gt": str(tmp_path / "improved")}))
    depth = ds[0]["depth"]
    assert depth[30, 40] == pytest.approx(10.0) and (depth > 0).sum() == 1


class _ConstantDepth(torch.nn.Module):
    """A 'model' whose depth is a known multiple of the ground truth: metrics computable by hand."""

    def __init__(self, ds, factor):
        super().__init__()
        self.ds, self.factor = ds, factor

    def predict_depth(self, images):
        return torch.full((images.shape[0], 1, *images.shape[-2:]), float(self.factor))


def test_evaluation_of_a_constant_prediction_matches_a_hand_computation():
    """Prediction 5 m everywhere, ground truth 4 m on the left half and 8 m on the right half: the median of an
    even count is the mean of the two middle values (numpy, as monodepth2), 6 m, so the scale is 6/5, the scaled
    prediction 6 m, and abs_rel = (2/4 + 2/8) / 2 = 0.375."""

    class Set(torch.utils.data.Dataset):
        skipped = 0

        def __len__(self):
            return 2

        def __getitem__(self, i):
            gt = torch.zeros(10, 20)
            gt[:, :10], gt[:, 10:] = 4.0, 8.0
            return {"image": torch.zeros(3, 10, 20), "depth": gt}

    settings = DepthEvaluationConfig(garg_crop=False)
    res = evaluate_depth_model(_ConstantDepth(None, 5.0), Set(), settings, batch_size=2)
    assert res.scale_median == pytest.approx(1.2) and res.scale_std == pytest.approx(0.0)
    assert res.metrics["abs_rel"] == pytest.approx((2 / 4 + 2 / 8) / 2)
    assert res.metrics["sq_rel"] == pytest.approx((4 / 4 + 4 / 8) / 2)
    assert res.metrics["rmse"] == pytest.approx(2.0)
    assert res.metrics["rmse_log"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(8 / 6) ** 2) / 2))
    # max(6/4, 4/6) = 1.5 and max(8/6, 6/8) = 1.33: neither below 1.25, both below 1.25²
    assert (res.metrics["a1"], res.metrics["a2"], res.metrics["a3"]) == pytest.approx((0.0, 1.0, 1.0))
    assert res.images == 2
    unscaled = evaluate_depth_model(_ConstantDepth(None, 5.0), Set(), DepthEvaluationConfig(
        garg_crop=False, median_scaling=False, max_depth=6.0), batch_size=1)
    # only the 4 m half lies in (1e-3, 6): |5 - 4| / 4
    assert unscaled.metrics["abs_rel"] == pytest.approx(0.25) and unscaled.scale_median is None


def test_eval_depth_cli_on_a_trained_multitask_checkpoint(tmp_path, eigen_tree, trained, capsys):
    import yaml

    from mtkit import cli
    from mtkit.core.checkpoint import atomic_torch_save
    from mtkit.recipe.load import validate
    from mtkit.training.trainer import train

    root, _ = eigen_tree
    data = tiny_recipe()
    data["data"]["depth_eval"] = {
        "Eigen": {"name": "kitti_eigen", "root": str(root), "split": "test", "height": 32, "width": 64},
        "synthetic": {"name": "synthetic_depth", "split": "test", "height": 32, "width": 64, "limit": 4,
                      "options": {"sequences": 2, "frames": 8}}}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    train(validate(data), "multi", tmp_path / "multi", progress=False)
    atomic_torch_save(trained[0].checkpoint, tmp_path / "single.pt")
    (root / "extra_split.txt").write_text("2011_09_26/2011_09_26_drive_0000_sync 1 l\n"
                                          "2011_09_26/2011_09_26_drive_0007_sync 1 l\n")
    cmd = ["eval-depth", str(recipe_file), "--checkpoint", str(tmp_path / "multi" / "last.pt"), "--out",
           str(tmp_path / "out"), "--no-progress"]

    def main(args):
        with pytest.raises(SystemExit) as done:
            cli.main(args)
            raise SystemExit(0)
        out = capsys.readouterr()
        return done.value.code, out.out, out.err

    code, stdout, stderr = main(cmd)
    assert code == 0, stderr
    assert "Depth on Eigen" in stdout
    results = RunResults.read(tmp_path / "out" / "results.json")
    assert {r.dataset for r in results.depth} == {"Eigen", "synthetic"}
    for r in results.depth:
        assert set(r.metrics) == {"abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3"}
        m = r.metrics
        assert 0 < m["abs_rel"] and 0 <= m["a1"] <= m["a2"] <= m["a3"] <= 1 and r.scale_median > 0
    assert "Depth on Eigen" in (tmp_path / "out" / "report.md").read_text()
    # a split line without its scan: one line naming it, exit 2; --skip-missing counts it
    override = ["-o", f"data.depth_eval.Eigen.options.split_file={root / 'extra_split.txt'}"]
    code, _, stderr = main([*cmd, *override, "--dataset", "Eigen"])
    assert code == 2 and "drive_0007_sync" in stderr and "Traceback" not in stderr
    code, _, stderr = main([*cmd, *override, "--dataset", "Eigen", "--skip-missing"])
    assert code == 0, stderr
    rows = RunResults.read(tmp_path / "out" / "results.json").depth
    assert rows[0].skipped == 1 and rows[0].images == 1
    code, _, stderr = main([*cmd[:3], str(tmp_path / "single.pt"), *cmd[4:]])
    assert code == 2 and "no depth task" in stderr


def test_depth_evaluation_runs_under_the_evaluation_math_policy(monkeypatch):
    """The depth stage enters the evaluation's CUDA math policy (``robustness.tf32``: IEEE fp32 by default), not
    whatever the process had (cuDNN's TF32 is on by default in PyTorch)."""
    import mtkit.evaluation.depth as depth_module

    seen, real = [], depth_module.math_mode
    monkeypatch.setattr(depth_module, "math_mode", lambda tf32, deterministic=False: seen.append(tf32) or real(tf32))

    class Set(torch.utils.data.Dataset):
        skipped = 0

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 10, 20), "depth": torch.full((10, 20), 4.0)}

    evaluate_depth_model(_ConstantDepth(None, 5.0), Set(), DepthEvaluationConfig(garg_crop=False))
    evaluate_depth_model(_ConstantDepth(None, 5.0), Set(), DepthEvaluationConfig(garg_crop=False), tf32=True)
    assert seen == [False, True]
