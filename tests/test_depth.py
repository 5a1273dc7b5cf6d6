from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkit.data import synthetic
from mtkit.ops import geometry
from mtkit.ops.losses import (
    MonodepthLoss,
    dssim,
    image_pyramid,
    min_reprojection,
    photometric_error,
    smoothness,
    ssim,
)
from mtkit.ops.metrics import depth_errors, evaluate_depth, garg_crop_mask


@pytest.fixture(scope="module")
def static_pair():
    """Two consecutive frames of a static synthetic scene with exact depth and poses."""
    dom = synthetic.DOMAINS["city"]
    rng = np.random.default_rng(3)
    scene = synthetic.make_scene(dom, rng, 80)
    scene.velocity[:] = 0
    h, w = 96, 288
    k = synthetic.intrinsics(h, w)
    poses = [synthetic.camera_pose(dom, f, 0.7) for f in (10, 11)]
    frames = [synthetic.render(scene, p, k, h, w) for p in poses]
    t_cur = torch.from_numpy(frames[0][0]).permute(2, 0, 1)[None].double() / 255
    t_src = torch.from_numpy(frames[1][0]).permute(2, 0, 1)[None].double() / 255
    depth = torch.from_numpy(frames[0][1])[None, None].double()
    depth_src = torch.from_numpy(frames[1][1])[None, None].double()
    rel = torch.from_numpy(np.linalg.inv(poses[1]) @ poses[0])[None].double()  # T_{t→t+1}
    return t_cur, t_src, depth, torch.from_numpy(k)[None].double(), rel, depth_src


def _visible_in_both(depth, k, rel, depth_src):
    """Pixels of frame t that are solid, project inside frame t' and are not occluded there (z-buffer test)."""
    h, w = depth.shape[-2:]
    d = torch.where(depth > 0, depth, torch.full_like(depth, 1e4))
    points = geometry.backproject(d, torch.linalg.inv(k))
    grid = geometry.project(points, k, rel, h, w)
    z_in_src = (rel @ points)[:, 2].view(1, 1, h, w)
    z_seen = torch.nn.functional.grid_sample(depth_src, grid, mode="nearest", align_corners=True)
    inside = (grid.abs() < 0.98).all(-1)[:, None]
    unoccluded = (z_seen - z_in_src).abs() < 0.03 * z_in_src
    return inside & (depth > 0) & unoccluded, d


def test_warp_with_true_depth_and_pose_reproduces_target(static_pair, device):
    """On every device: the warp with the true depth and pose reproduces frame t (and on a GPU equals the CPU's)."""
    cur, src, depth, k, rel, depth_src = static_pair
    valid, d = _visible_in_both(depth, k, rel, depth_src)
    assert valid.float().mean() > 0.5

    def warp(src, d, k, rel):
        return geometry.warp(src.to(device), d.to(device), k.to(device), rel.to(device)).cpu()

    warped = warp(src, d, k, rel)
    if device.type != "cpu":
        assert torch.allclose(warped, geometry.warp(src, d, k, rel), atol=1e-6)
    per_pixel = photometric_error(cur, warped)[valid]
    err_true = per_pixel.mean()
    err_scale = photometric_error(cur, warp(src, d * 1.6, k, rel))[valid].mean()
    wrong = rel.clone()
    wrong[0, 2, 3] += 0.8  # wrong forward motion
    err_pose = photometric_error(cur, warp(src, d, k, wrong))[valid].mean()
    identity = photometric_error(cur, src)[valid].mean()
    # near 0: half the visible pixels below 0.01, mean colour difference below 4 gray values (bilinear
    # resampling of sharp texture edges and SSIM on flat 3x3 patches leave a small residual)
    assert per_pixel.median() < 0.01
    assert (cur - warped).abs().mean(1, keepdim=True)[valid].mean() * 255 < 4
    assert err_scale > 2 * err_true and err_pose > 2 * err_true and identity > 2 * err_true


def test_loss_is_differentiable_wrt_depth_and_pose(static_pair, device):
    """On every device: the depth loss has finite, non-zero gradients for depth and pose, equal to the CPU's."""
    from mtkit.models.pose import transformation_from_parameters

    def loss_and_grads(dev):
        cur, src, depth, k, rel, _ = (t.to(dev) for t in static_pair)
        disp = (1.0 / torch.where(depth > 0, depth, torch.full_like(depth, 100.0))).clamp(0.01, 10)
        disp.requires_grad_(True)
        trans = torch.zeros(1, 3, dtype=torch.float64, device=dev, requires_grad=True)
        t = rel @ transformation_from_parameters(torch.zeros_like(trans), trans)
        loss = MonodepthLoss(num_scales=1)({0: disp}, [src * 255, cur * 255, src * 255], k, {-1: t, 1: t}).total
        loss.backward()
        return loss.detach().cpu(), disp.grad.cpu(), trans.grad.cpu()

    loss, g_disp, g_trans = loss_and_grads(device)
    assert torch.isfinite(g_disp).all() and g_disp.abs().sum() > 0
    assert torch.isfinite(g_trans).all() and g_trans.abs().sum() > 0
    if device.type != "cpu":
        ref = loss_and_grads(torch.device("cpu"))
        assert torch.allclose(loss, ref[0], rtol=1e-6)
        assert float((g_disp - ref[1]).norm() / ref[1].norm()) < 1e-4
        assert torch.allclose(g_trans, ref[2], rtol=1e-4, atol=1e-9)


def test_ssim_identity_and_direct_formula():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones_like(x))
    y = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    s = ssim(x, y)
    px, py = x[0, 0, 2:5, 3:6], y[0, 0, 2:5, 3:6]  # 3x3 patch around (3, 4)
    mx, my = px.mean(), py.mean()
    vx, vy = (px**2).mean() - mx**2, (py**2).mean() - my**2
    cxy = (px * py).mean() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    direct = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert s[0, 0, 3, 4].item() == pytest.approx(direct.item(), abs=1e-10)  # SSIM itself is not clamped


class Monodepth2SSIM(torch.nn.Module):
    """monodepth2's ``layers.SSIM`` (also SGDepth's), verbatim: the loss term (1 - SSIM)/2 clamped to [0, 1]."""

    def __init__(self):
        super().__init__()
        self.mu_x_pool = torch.nn.AvgPool2d(3, 1)
        self.mu_y_pool = torch.nn.AvgPool2d(3, 1)
        self.sig_x_pool = torch.nn.AvgPool2d(3, 1)
        self.sig_y_pool = torch.nn.AvgPool2d(3, 1)
        self.sig_xy_pool = torch.nn.AvgPool2d(3, 1)
        self.refl = torch.nn.ReflectionPad2d(1)
        self.C1 = 0.01 ** 2
        self.C2 = 0.03 ** 2

    def forward(self, x, y):
        x = self.refl(x)
        y = self.refl(y)
        mu_x = self.mu_x_pool(x)
        mu_y = self.mu_y_pool(y)
        sigma_x = self.sig_x_pool(x ** 2) - mu_x ** 2
        sigma_y = self.sig_y_pool(y ** 2) - mu_y ** 2
        sigma_xy = self.sig_xy_pool(x * y) - mu_x * mu_y
        SSIM_n = (2 * mu_x * mu_y + self.C1) * (2 * sigma_xy + self.C2)
        SSIM_d = (mu_x ** 2 + mu_y ** 2 + self.C1) * (sigma_x + sigma_y + self.C2)
        return torch.clamp((1 - SSIM_n / SSIM_d) / 2, 0, 1)


def test_ssim_term_equals_monodepth2_where_ssim_is_negative():
    """Anti-correlated textures have SSIM < 0: the term (1 - SSIM)/2 goes above 1/2 and keeps its gradient."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 16, dtype=torch.float64)
    y = (1 - x + 0.05 * torch.rand_like(x)).clamp(0, 1).requires_grad_(True)
    assert (ssim(x, y) < -0.2).float().mean() > 0.5
    reference = Monodepth2SSIM()(x, y)
    assert torch.allclose(dssim(x, y), reference, atol=1e-12)
    assert reference.max() > 0.6  # where the old clamp of SSIM to [0, 1] capped the term at 1/2
    l1 = (x - y).abs().mean(1, keepdim=True)
    mono = 0.85 * reference.mean(1, True) + 0.15 * l1  # monodepth2's compute_reprojection_loss
    assert torch.allclose(photometric_error(x, y, 0.85), mono, atol=1e-12)
    (grad,) = torch.autograd.grad(photometric_error(x, y).sum(), y)
    assert (grad.abs() > 1e-6).float().mean() > 0.9  # no zero-gradient region where SSIM < 0


def test_smoothness_pyramid_is_antialiased_like_monodepth2():
    """Columns of period 4 (255, 0, 0, 0): an antialiased pyramid keeps their mean at every level, a plain
    bilinear resize by 4 or 8 samples only the dark columns (aliasing)."""
    stripes = torch.zeros(1, 3, 32, 64)
    stripes[..., ::4] = 1.0
    sizes = [(32, 64), (16, 32), (8, 16), (4, 8)]
    levels = image_pyramid(stripes, sizes)
    assert [tuple(lv.shape[-2:]) for lv in levels] == sizes
    for lv in levels:
        assert lv.mean().item() == pytest.approx(0.25, abs=0.01)
    for lv in levels[2:]:  # by 4 and 8 the period is averaged away
        assert lv[..., 1:-1, 1:-1].std().item() < 0.05
    plain = torch.nn.functional.interpolate(stripes, size=(8, 16), mode="bilinear", align_corners=False)
    assert plain.mean().item() < 0.05
    # each level comes from the previous one (monodepth2's data pyramid)
    step = torch.nn.functional.interpolate(levels[1], size=(8, 16), mode="bilinear", antialias=True)
    assert torch.allclose(levels[2], step, atol=1e-6)


def test_photometric_error_weights():
    x = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    y = torch.full_like(x, 0.5)
    err = photometric_error(x, y, alpha=0.85)
    # constant images: SSIM = (c1)/(0.25 + c1) (structure term 1), L1 = 0.5
    c1 = 0.01**2
    expected = 0.85 / 2 * (1 - c1 / (0.25 + c1)) + 0.15 * 0.5
    assert torch.allclose(err, torch.full_like(err[:, :1], expected))


def test_per_pixel_minimum():
    a = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]])
    b = torch.tensor([[[[0.3, 0.4], [0.6, 0.1]]]])
    assert torch.equal(min_reprojection([a, b]), torch.tensor([[[[0.1, 0.4], [0.5, 0.1]]]]))


def test_smoothness_is_edge_aware_and_scale_invariant():
    disp = torch.rand(1, 1, 8, 8, dtype=torch.float64) + 0.5
    flat = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    edges = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 5
    assert smoothness(disp, edges) < smoothness(disp, flat)
    assert smoothness(disp * 7, flat).item() == pytest.approx(smoothness(disp, flat).item())  # mean-normalized
    assert smoothness(torch.ones_like(disp), flat).item() == 0


def test_automask_option_runs_and_can_only_lower_the_loss(static_pair):
    cur, src, depth, k, rel, _ = static_pair
    disp = torch.full_like(depth, 0.1)
    frames = [src * 255, cur * 255, src * 255]
    plain = MonodepthLoss(num_scales=1)({0: disp}, frames, k, {-1: rel, 1: rel}).photometric
    masked = MonodepthLoss(num_scales=1, automask=True)({0: disp}, frames, k, {-1: rel, 1: rel}).photometric
    assert masked <= plain + 1e-6


def test_depth_metrics_hand_computed():
    gt = torch.tensor([1.0, 2.0, 4.0])
    pred = torch.tensor([1.0, 1.0, 8.0])
    m = depth_errors(gt, pred)
    assert m["abs_rel"] == pytest.approx(0.5)
    assert m["sq_rel"] == pytest.approx(1.5)
    assert m["rmse"] == pytest.approx(math.sqrt(17 / 3))
    assert m["rmse_log"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))
    assert (m["a1"], m["a2"], m["a3"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_depth_evaluation_protocol():
    gt = torch.full((10, 20), 10.0)
    gt[0, :] = 0  # invalid (no ground truth)
    gt[-1, :] = 100  # beyond the 80 m cap
    pred = gt / 2 + 0.0
    m = evaluate_depth(gt, pred, garg_crop=False)
    assert m["scale"] == pytest.approx(2.0) and m["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    mask = garg_crop_mask(375, 1242)
    assert mask[153:371, 44:1197].all() and not mask[:152].any() and not mask[:, :44].any()
    with pytest.raises(ValueError, match="no valid ground-truth"):
        evaluate_depth(torch.zeros(4, 4), torch.ones(4, 4))


@pytest.mark.slow
def test_depth_only_training_lowers_abs_rel_on_synthetic_video():
    """A hundred steps of self-supervised depth training (λ = 0: the encoder sees only the depth gradient; Adam
    2·10⁻⁴) on the synthetic drive video lower abs_rel by more than 10 % against the exact depth of held-out frames
    (median scaling); measured: 0.700 → 0.516 (weight seeds 1 and 2: 0.702 → 0.605, 0.704 → 0.609). Fifty steps
    at 5·10⁻⁴, this test's former setting, passed for seed 0 only (0.84; seeds 1 and 2: 1.05, 0.99)."""
    from mtkit.core.schema import AugmentConfig, DatasetConfig, ModelConfig
    from mtkit.data.augment import augment_video, draw_params
    from mtkit.data.cache import open_prepared
    from mtkit.recipe.build import build_dataset, build_model
    from mtkit.recipe.prepare import prepare_dataset

    opts = {"domain": "drive", "sequences": 6, "frames": 12}
    size = {"height": 32, "width": 96}
    # the training path: the prepared cache, augmented per batch as the trainer does
    train = open_prepared(prepare_dataset(DatasetConfig(name="synthetic_video", split="train", options=opts, **size),
                                          True, "data.depth", progress=False, log=lambda *_: None).folder)
    test = build_dataset(DatasetConfig(name="synthetic_video", split="val", options={**opts, "sequences": 2},
                                       **size))
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ["segmentation", "depth"], 0.0)
    loss = MonodepthLoss()
    opt = torch.optim.Adam(model.parameters(), 2e-4)

    def abs_rel() -> float:
        model.eval()
        with torch.no_grad():
            vals = [evaluate_depth(s["depth"], model.predict_depth(s["frames"][1][None])[0, 0],
                                   garg_crop=False)["abs_rel"] for s in (test[i] for i in range(len(test)))]
        model.train()
        return sum(vals) / len(vals)

    before = abs_rel()
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = torch.utils.data.default_collate([train[i] for i in torch.randint(0, len(train), (6,),
                                                                                    generator=g).tolist()])
        batch = augment_video(batch["frames"], batch["K"], draw_params(AugmentConfig(), 6, g))
        out = model(batch["frames"][:1, 1], batch["frames"])
        raw = batch["frames_raw"]
        total = loss(out["disp"], [raw[:, 0], raw[:, 1], raw[:, 2]], batch["K"], out["poses"]).total
        opt.zero_grad()
        total.backward()
        opt.step()
    after = abs_rel()
    assert after < 0.9 * before, (before, after)

