from __future__ import annotations

import math

import pytest
import timm
import torch
from support import tiny_recipe

from mtkit.core.errors import CheckpointError, MtkitError
from mtkit.core.schema import ModelConfig, ModelSpec
from mtkit.models.decoders import disp_to_depth
from mtkit.models.pose import transformation_from_parameters
from mtkit.ops.losses import MonodepthLoss, weighted_cross_entropy
from mtkit.recipe.build import build_model, build_pose_net
from mtkit.recipe.load import validate


def _k(b, h, w):
    k = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = 0.58 * w, 1.92 * h, w / 2, h / 2
    return k


def _grads(model, seg, labels, frames, k, which):
    model.zero_grad(set_to_none=True)
    out = model(seg, frames)
    loss_fn = MonodepthLoss(num_scales=4)
    l_seg = weighted_cross_entropy(out["seg_logits"], labels)
    l_depth = loss_fn(out["disp"], [frames[:, 0], frames[:, 1], frames[:, 2]], k, out["poses"]).total
    {"seg": l_seg, "depth": l_depth, "both": l_seg + l_depth}[which].backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_gradient_scaling_eq5():
    torch.manual_seed(0)
    lam = 0.3
    model = build_model(ModelConfig(), ["segmentation", "depth"], lam).double().train()
    seg = torch.rand(2, 3, 32, 64, dtype=torch.float64) * 255
    labels = torch.randint(0, 19, (2, 32, 64))
    frames = torch.rand(2, 3, 3, 32, 64, dtype=torch.float64) * 255
    k = _k(2, 32, 64)
    model.lam = 1.0
    g_seg = _grads(model, seg, labels, frames, k, "seg")  # segmentation gradient, unscaled
    model.lam = 0.0
    g_depth = _grads(model, seg, labels, frames, k, "depth")  # depth gradient, unscaled
    model.lam = lam
    g_total = _grads(model, seg, labels, frames, k, "both")
    checked = {"encoder": 0, "seg_head": 0, "depth_head": 0, "pose_net": 0}
    for name, g in g_total.items():
        part = name.split(".")[0]
        if part == "encoder":
            expected = (1 - lam) * g_depth[name] + lam * g_seg[name]
        elif part == "seg_head":
            expected = g_seg[name]  # decoder trains on its unscaled gradient
        else:  # depth head and pose net: the depth loss, unscaled
            expected = g_depth[name]
        assert torch.allclose(g, expected, atol=1e-6, rtol=1e-6), name
        checked[part] += 1
    assert all(checked.values()), checked
    enc = [n for n in g_total if n.startswith("encoder")]
    assert any(g_seg[n].abs().sum() > 0 and g_depth[n].abs().sum() > 0 for n in enc)


def test_one_encoder_forward_over_both_batches():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ["segmentation", "depth"], 1.0).train()
    seg = torch.rand(2, 3, 32, 64) * 255
    a = model(seg, torch.rand(2, 3, 3, 32, 64) * 255)["seg_logits"]
    b = model(seg, torch.rand(2, 3, 3, 32, 64) * 60)["seg_logits"]
    # even at λ = 1 the depth images shape the encoder's batch-norm statistics (paper sec. 5.1)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("size", [(32, 64), (64, 192), (45, 77), (100, 130)])
def test_shapes_at_any_size(size):
    h, w = size
    model = build_model(ModelConfig(), ["segmentation", "depth"], 0.5).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, h, w) * 255, torch.rand(1, 3, 3, h, w) * 255)
    assert out["seg_logits"].shape == (1, 19, h, w)
    assert sorted(out["disp"]) == [0, 1, 2, 3]
    assert out["disp"][0].shape == (1, 1, h, w)
    for s, d in out["disp"].items():
        assert abs(d.shape[-2] - h / 2**s) <= 1 and abs(d.shape[-1] - w / 2**s) <= 1
    assert out["poses"][1].shape == (1, 4, 4) and out["poses"][-1].shape == (1, 4, 4)


def test_depth_range():
    disp, depth = disp_to_depth(torch.tensor([0.0, 0.5, 1.0]), 0.1, 100.0)
    assert depth[0].item() == pytest.approx(100.0) and depth[2].item() == pytest.approx(0.1)
    # inside the range: disp = 1/100 + (1/0.1 - 1/100) · σ, 0.01 + 9.99 · 0.5 = 5.005 at σ = 0.5
    assert disp[1].item() == pytest.approx(5.005) and depth[1].item() == pytest.approx(1 / 5.005)
    assert torch.allclose(disp * depth, torch.ones(3))
    model = build_model(ModelConfig(), ["segmentation", "depth"]).eval()
    with torch.no_grad():
        d = model.predict_depth(torch.rand(1, 3, 32, 64) * 255)
    assert d.min() >= 0.1 - 1e-6 and d.max() <= 100 + 1e-4


def test_pose_transforms():
    aa = torch.tensor([[0.1, -0.2, 0.05]])
    t = torch.tensor([[0.3, 0.0, 1.0]])
    m = transformation_from_parameters(aa, t)
    inv = transformation_from_parameters(aa, t, invert=True)
    assert torch.allclose(m @ inv, torch.eye(4)[None], atol=1e-6)
    r = m[0, :3, :3]
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
    assert torch.allclose(m[0, 3], torch.tensor([0.0, 0, 0, 1]))
    net = build_pose_net(ModelConfig()).eval()
    with torch.no_grad():
        pose = net(torch.rand(2, 3, 32, 64) * 255, torch.rand(2, 3, 32, 64) * 255, other_is_past=False)
    assert pose.shape == (2, 4, 4)


def _monodepth2_transform(vec: torch.Tensor, t: torch.Tensor, invert: bool) -> torch.Tensor:
    """monodepth2's rot_from_axisangle (the nine entries written out) and transformation_from_parameters."""
    angle = vec.norm(dim=-1, keepdim=True)
    x, y, z = (vec / (angle + 1e-7)).unbind(-1)
    ca, sa = torch.cos(angle[:, 0]), torch.sin(angle[:, 0])
    c = 1 - ca
    rot = torch.zeros(vec.shape[0], 4, 4, dtype=vec.dtype)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 0, 2] = x * x * c + ca, x * y * c - z * sa, z * x * c + y * sa
    rot[:, 1, 0], rot[:, 1, 1], rot[:, 1, 2] = x * y * c + z * sa, y * y * c + ca, y * z * c - x * sa
    rot[:, 2, 0], rot[:, 2, 1], rot[:, 2, 2] = z * x * c - y * sa, y * z * c + x * sa, z * z * c + ca
    rot[:, 3, 3] = 1
    if invert:
        rot, t = rot.transpose(1, 2), -t
    tm = torch.eye(4, dtype=vec.dtype).repeat(vec.shape[0], 1, 1)
    tm[:, :3, 3] = t
    return rot @ tm if invert else tm @ rot


def test_pose_transforms_equal_monodepth2_entry_by_entry():
    """The whole-tensor Rodrigues formula and the inverse [[Rᵀ, -Rᵀt], [0, 1]] equal monodepth2's nine written-out
    entries and its matrix products (fp64), for every row alike or chosen per row by a mask."""
    g = torch.Generator().manual_seed(3)
    aa, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for invert in (False, True):
        assert torch.allclose(transformation_from_parameters(aa, t, invert), _monodepth2_transform(aa, t, invert),
                              atol=1e-12)
    mask = torch.tensor([True, False, False, True, False])
    mixed = transformation_from_parameters(aa, t, mask)
    assert torch.allclose(mixed[mask], _monodepth2_transform(aa[mask], t[mask], True), atol=1e-12)
    assert torch.allclose(mixed[~mask], _monodepth2_transform(aa[~mask], t[~mask], False), atol=1e-12)


def test_both_poses_in_one_pass_equal_one_pass_per_pair():
    """``PoseNet.around`` (both frame pairs in one batch) equals the pose net run on each pair (eval mode, where
    BatchNorm uses its running statistics), and the model's forward uses it."""
    net = build_pose_net(ModelConfig()).eval()
    g = torch.Generator().manual_seed(0)
    prev, cur, nxt = (torch.rand(2, 3, 32, 64, generator=g) * 255 for _ in range(3))
    with torch.no_grad():
        both = net.around(prev, cur, nxt)
        assert torch.allclose(both[-1], net(cur, prev, other_is_past=True), atol=1e-6)
        assert torch.allclose(both[1], net(cur, nxt, other_is_past=False), atol=1e-6)


def test_local_weights(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False)
    from safetensors.torch import save_file

    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    for name in ("r18.pth", "r18.safetensors"):
        model = build_model(ModelConfig(pretrained=str(tmp_path / name)))
        assert torch.equal(model.encoder.body.conv1.weight, ref.conv1.weight)
        assert torch.equal(model.encoder.body.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    # 6-channel pose encoder from 3-channel weights: duplicated and halved
    pose = build_pose_net(ModelConfig(pose_pretrained=str(tmp_path / "r18.pth")))
    w = pose.encoder.body.conv1.weight
    assert torch.allclose(w[:, :3], ref.conv1.weight / 2) and torch.allclose(w[:, 3:], ref.conv1.weight / 2)
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"r34.pth do not match backbone .resnet18.: .*unexpected keys"):
        build_model(ModelConfig(pretrained=str(tmp_path / "r34.pth")))
    bad = ref.state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth do not fit backbone 'resnet18': size mismatch for "
                                              r"layer1.0.conv1.weight"):
        build_model(ModelConfig(pretrained=str(tmp_path / "bad.pth")))
    with pytest.raises(CheckpointError, match="weights file not found"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nope.pth")))


def test_any_timm_backbone_and_unknown_name():
    model = build_model(ModelConfig(backbone="resnet10t"), ["segmentation"]).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 64))["seg_logits"].shape == (1, 19, 32, 64)
    with pytest.raises(MtkitError, match="did you mean 'resnet18'"):
        build_model(ModelConfig(backbone="resnet18x"))


def test_smp_fpn_head():
    model = build_model(ModelConfig(head="fpn"), ["segmentation", "depth"], 0.1).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96) * 255, torch.rand(1, 3, 3, 64, 96) * 255)
    assert out["seg_logits"].shape == (1, 19, 64, 96)
    with pytest.raises(MtkitError, match="divisible by 32"):
        model.segmenter()(torch.rand(1, 3, 50, 96))


def test_segmenter_has_single_task_parameter_count():
    multi = build_model(ModelConfig(), ["segmentation", "depth"], 0.1)
    single = build_model(ModelConfig(), ["segmentation"])
    seg = multi.segmenter()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(seg) == count(single) < count(multi)
    assert all(any(p is q for q in multi.parameters()) for p in seg.parameters())  # shared, not copied


def test_onnx_export_takes_any_size_and_batch_and_declares_its_output(tmp_path):
    from mtkit.evaluation.export import declared_shape, export_segmenter, onnx_logits

    recipe = validate(tiny_recipe())
    spec = recipe.models[1]
    torch.manual_seed(0)
    model = build_model(recipe.model, spec.tasks, spec.lam)
    path = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "recipe": recipe.to_dict(), "spec": spec.model_dump(by_alias=True),
                "class_weights": None}, path)
    out = export_segmenter(path, tmp_path / "seg.onnx", 32, 64, atol=1e-3)
    assert declared_shape(out, "image") == ["batch", 3, "height", "width"]
    assert declared_shape(out) == ["batch", 19, "height", "width"]  # the height is not the batch's symbol
    seg = model.eval().segmenter()
    for b, h, w in ((2, 32, 64), (1, 64, 96), (3, 96, 160)):  # three sizes, none the traced one with its batch
        x = torch.rand(b, 3, h, w) * 255
        with torch.no_grad():
            ref = seg(x)
        got = torch.from_numpy(onnx_logits(out, x))
        assert got.shape == (b, 19, h, w) and (got - ref).abs().max() < 1e-3
        assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.999
    fixed = export_segmenter(path, tmp_path / "static.onnx", 32, 64, static=True)
    assert declared_shape(fixed) == ["batch", 19, 32, 64]
    import onnxruntime as ort

    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        onnx_logits(fixed, torch.rand(1, 3, 64, 96) * 255)  # --static: only its size
    assert ModelSpec.model_validate(spec.model_dump(by_alias=True)).lam == 0.1


def test_equation_1_by_hand_two_pixels_one_void_and_class_weights():
    """J^ce (eq. 1) = -1/|I| Σ_i w_{y_i} log softmax(z_i)_{y_i} over the labelled pixels I: pixel a of class 0
    (w 0.5) with logits (2, 0, 0), pixel b of class 2 (w 2) with logits (0, 1, 3), pixel c void. |I| = 2 (not
    PyTorch's Σ w = 2.5 of its weighted mean)."""
    from mtkit.ops.losses import weighted_cross_entropy, weighted_cross_entropy_per_image

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [5.0, 5.0, 5.0]]).T.reshape(1, 3, 1, 3)
    labels = torch.tensor([[[0, 2, 255]]])
    w = torch.tensor([0.5, 1.0, 2.0])
    by_hand = -(0.5 * math.log(math.e**2 / (math.e**2 + 2)) + 2.0 * math.log(math.e**3 / (1 + math.e + math.e**3))) / 2
    assert float(weighted_cross_entropy(logits, labels, w)) == pytest.approx(by_hand, rel=1e-6)
    assert float(weighted_cross_entropy_per_image(logits, labels, w)[0]) == pytest.approx(by_hand, rel=1e-6)
    pytorch_mean = float(torch.nn.functional.cross_entropy(logits, labels, weight=w, ignore_index=255))
    assert pytorch_mean == pytest.approx(by_hand * 2 / 2.5, rel=1e-6)
