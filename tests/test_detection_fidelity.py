"""Detection, O-PGD and Metzen's dynamic attack against references written from the authors' code and papers, in
float64 on a tiny multi-task network (issue 37): the detector's depth map, O-PGD's detector loss (the reported
detector's, and the authors' composition as an option), O-PGD's unweighted cross-entropy, Metzen's τ rule and the
conformal threshold. Each reference is transcribed in this file, not imported from mtkit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtkit.core.errors import MtkitError
from mtkit.core.schema import ModelConfig
from mtkit.ops.edge_consistency import (
    EdgeConsistency,
    consistency_measures,
    fit_threshold,
    min_fit_images,
    soft_consistency_measures,
)
from mtkit.perturbations import AttackContext
from mtkit.perturbations.adaptive import OPGD, OPGDOptions
from mtkit.recipe.build import build_model

CLASSES = 4


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet10t", num_classes=CLASSES), ("segmentation", "depth"), 0.5)
    return model.double().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 24, 40, generator=g, dtype=torch.float64) * 255).round()
    y = torch.randint(0, CLASSES, (2, 24, 40), generator=g)
    y[:, :2] = 255  # void pixels
    return x, y


# ---------------------------------------------------------------- the authors' detection.py and utils/ssim.py
def _authors_gradients(img: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "abs":
        gx = torch.abs(img[:, :, :, :-1] - img[:, :, :, 1:]).mean(dim=1, keepdim=True)
        gy = torch.abs(img[:, :, :-1, :] - img[:, :, 1:, :]).mean(dim=1, keepdim=True)
    else:  # unequal
        gx = torch.logical_not(torch.eq(img[:, :, :, :-1], img[:, :, :, 1:])).double().mean(dim=1, keepdim=True)
        gy = torch.logical_not(torch.eq(img[:, :, :-1, :], img[:, :, 1:, :])).double().mean(dim=1, keepdim=True)
    gx = (gx - gx.min()) / (gx.max() - gx.min())  # batch-wide min/max: the reference runs one image at a time
    gy = (gy - gy.min()) / (gy.max() - gy.min())
    return gx, gy


def _authors_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    win = (g / g.sum()).view(1, 1, 1, 11)

    def blur(t):
        return F.conv2d(F.conv2d(t, win), win.transpose(2, 3))

    c1, c2 = 0.01**2, 0.03**2
    mu1, mu2 = blur(a), blur(b)
    s1, s2, s12 = blur(a * a) - mu1**2, blur(b * b) - mu2**2, blur(a * b) - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    return (((2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)) * cs).mean(-1).mean(-1).mean(-1)


def _authors_measures(color01: torch.Tensor, logits: torch.Tensor, scaled_disp: torch.Tensor) -> torch.Tensor:
    """EdgeConsistencyDetector.calculate_scores for one image: enter_color, enter_segmentation (argmax of the
    softmax), enter_depth (their harness passes disps_scaled_pred, divided by its mean)."""
    seg = torch.argmax(torch.softmax(logits, 1), dim=1, keepdim=True)
    depth = scaled_disp / scaled_disp.mean((2, 3))
    grads = {"rgb": _authors_gradients(color01, "abs"), "seg": _authors_gradients(seg, "unequal"),
             "depth": _authors_gradients(depth, "abs")}
    out = []
    for a, b in (("rgb", "seg"), ("rgb", "depth"), ("seg", "depth")):
        out.append((_authors_ssim(grads[a][0], grads[b][0]) + _authors_ssim(grads[a][1], grads[b][1])) / 2.0)
    return torch.stack(out, 1)


def test_the_detector_compares_the_disparity_as_the_authors_harness_enters_it(net, batch):
    """Their harness enters ``disps_scaled_pred`` (aσ+b = 1/depth) through ``enter_depth``; mtkit's measures equal
    theirs image by image (the depth itself gave differences up to 0.066)."""
    x, _ = batch
    with torch.no_grad():
        logits, depth = net.predict(x)
        ours = consistency_measures(x, logits.argmax(1), depth)
        theirs = torch.cat([_authors_measures(x[i:i + 1] / 255.0, logits[i:i + 1], 1.0 / depth[i:i + 1])
                            for i in range(x.shape[0])])
        on_depth = torch.cat([_authors_measures(x[i:i + 1] / 255.0, logits[i:i + 1], depth[i:i + 1])
                              for i in range(x.shape[0])])
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (ours - theirs).abs().max()
    assert (ours - on_depth).abs().max() > 1e-4  # the depth map is a different detector: the test can tell


def test_the_soft_score_is_the_reported_score_where_the_softmax_is_one_hot(net, batch):
    """O-PGD's default J^det is the evaluated detector's score made differentiable: on one-hot probabilities it is
    the reported measure, exactly."""
    x, _ = batch
    with torch.no_grad():
        logits, depth = net.predict(x)
    labels = logits.argmax(1)
    one_hot = F.one_hot(labels, CLASSES).permute(0, 3, 1, 2).double()
    assert torch.allclose(soft_consistency_measures(x, one_hot, depth), consistency_measures(x, labels, depth),
                          rtol=0, atol=1e-12)
    # without depth (single-task O-PGD) the image–segmentation measure alone, the same column
    alone = soft_consistency_measures(x, one_hot, None)
    assert alone.shape == (len(x), 1) and torch.equal(alone[:, 0], soft_consistency_measures(x, one_hot, depth)[:, 0])
    sharp = 1e3 * (one_hot - 0.5)  # logits whose softmax is one-hot in float64
    det = EdgeConsistency(EdgeConsistency.Options(measures=["image-depth", "segmentation-depth"]))
    _, soft = det.differentiable_score(_Sharp(net, sharp), x)
    assert torch.allclose(soft, det.score(consistency_measures(x, labels, depth)), rtol=0, atol=1e-12)


class _Sharp(nn.Module):
    """The network with its logits replaced (to check the soft score at one-hot probabilities)."""

    def __init__(self, net, logits):
        super().__init__()
        self.net, self.logits, self.depth_head = net, logits, net.depth_head

    def predict(self, images):
        return self.logits, self.net.predict(images)[1]


# ------------------------------------------------------------- the authors' attack.py (_untargeted_opgd)
class _AuthorsSSIMGradLoss(nn.Module):
    """losses/baselosses.py SSIMGradLoss, transcribed (reflection pad 1, 3x3 average pools, clamped)."""

    def __init__(self):
        super().__init__()
        self.pool, self.pad = nn.AvgPool2d(3, 1), nn.ReflectionPad2d(1)

    def _dssim(self, x, y):
        x, y = self.pad(x), self.pad(y)
        mu_x, mu_y = self.pool(x), self.pool(y)
        sx, sy, sxy = self.pool(x**2) - mu_x**2, self.pool(y**2) - mu_y**2, self.pool(x * y) - mu_x * mu_y
        n = (2 * mu_x * mu_y + 0.01**2) * (2 * sxy + 0.03**2)
        d = (mu_x**2 + mu_y**2 + 0.01**2) * (sx + sy + 0.03**2)
        return torch.clamp((1 - n / d) / 2, 0, 1)

    def forward(self, disp, img):
        gdx = torch.mean(torch.abs(disp[:, :, :, :-1] - disp[:, :, :, 1:]), 1, keepdim=True)
        gdy = torch.mean(torch.abs(disp[:, :, :-1, :] - disp[:, :, 1:, :]), 1, keepdim=True)
        gix = torch.mean(torch.abs(img[:, :, :, :-1] - img[:, :, :, 1:]), 1, keepdim=True)
        giy = torch.mean(torch.abs(img[:, :, :-1, :] - img[:, :, 1:, :]), 1, keepdim=True)
        return self._dssim(gdx, gix).mean() + self._dssim(gdy, giy).mean()


def _authors_losses(net, image, clean, labels):
    """loss_perf and loss_det of _untargeted_opgd for one image (scale_factors (1, 0): the segmentation's
    unweighted cross-entropy; the smoothness terms: SegLosses' softmax vs the normalised perturbed image, and
    DepthLosses' disp_smth_loss and disp_smth_loss_seg at every scale, divided by 2^scale)."""
    sg = _AuthorsSSIMGradLoss()
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    normalised = (image / 255.0 - mean) / std
    logits, sigmas = net.predict_scales(image)
    perf = F.cross_entropy(logits, labels, torch.ones(CLASSES, dtype=torch.float64), ignore_index=255)
    softmax = torch.softmax(logits, 1)
    det = sg(softmax, normalised)
    for res, disp in sigmas.items():
        norm_disp = disp / (disp.mean((2, 3), True) + 1e-7)
        ref_color = F.interpolate(clean / 255.0, disp.shape[2:], mode="bilinear", align_corners=False)
        ref_seg = F.interpolate(softmax, disp.shape[2:], mode="bilinear", align_corners=False)
        det = det + sg(norm_disp, ref_color) / (2**res) + sg(norm_disp, ref_seg) / (2**res)
    return logits, perf, det


def _image_miou(pred, labels):
    valid = labels != 255
    ious = []
    for c in range(CLASSES):
        p, g = (pred == c) & valid, (labels == c) & valid
        union = (p | g).sum()
        if union:
            ious.append(float((p & g).sum()) / float(union))
    return sum(ious) / max(len(ious), 1)


def _reference_opgd(net, x, y, eps, iterations, success_miou, losses):
    """_untargeted_opgd image by image with mtkit's two stated choices: J^det descended, and ∇J^det's projection
    with ⟨∇J^det, ∇J^ce⟩ in the numerator; steps of 1 gray value, the ε-ball and [0, 255]."""
    out = []
    for i in range(x.shape[0]):
        clean, labels, image = x[i:i + 1], y[i:i + 1], x[i:i + 1].clone()
        for _ in range(iterations):
            image.requires_grad_(True)
            logits, perf, det = losses(net, image, clean, labels)
            (g_perf,) = torch.autograd.grad(perf, image, retain_graph=True)
            (g_det,) = torch.autograd.grad(det, image)
            broken = _image_miou(logits.argmax(1), labels) < success_miou
            gp, gd = g_perf.flatten(), g_det.flatten()
            if broken:
                grad = -(gd - (gd @ gp) / (1e-20 + gp @ gp) * gp)
            else:
                grad = gp - (gp @ gd) / (1e-20 + gd @ gd) * gd
            adv = image.detach() + torch.sign(grad.view_as(image))
            image = torch.clamp(clean + torch.clamp(adv - clean, -eps, eps), 0, 255).detach()
        out.append(image)
    return torch.cat(out)


def _opgd(net, x, y, eps, detector=None, **options):
    ctx = AttackContext(net.segmenter(), torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64),
                        torch.Generator(), multitask=net, detector=detector)
    return OPGD(OPGDOptions(**options)).sweep(ctx, x, y, [eps])[eps]


@pytest.mark.parametrize("success_miou", [0.0, 1.0])  # never broken: the J^ce branch; always: the J^det branch
def test_o_pgd_with_the_authors_loss_equals_their_steps(net, batch, success_miou):
    x, y = batch
    ours = _opgd(net, x, y, 4.0, iterations=4, success_miou=success_miou, detector_loss="authors")
    theirs = _reference_opgd(net, x, y, 4.0, 4, success_miou, _authors_losses)
    assert torch.equal(ours, theirs), f"{(ours != theirs).double().mean():.2%} of the pixels differ"


def test_o_pgd_attacks_the_reported_detector_by_default(net, batch):
    """J^det is the evaluated detector's differentiable score, with the detector's own measures when the stage
    hands it over (AttackContext.detector), and the cross-entropy is unweighted (the authors' use_weights=False),
    even with class weights in the context."""
    x, y = batch
    det = EdgeConsistency(EdgeConsistency.Options(measures=["image-depth", "segmentation-depth"]))

    def reported(net, image, clean, labels):
        logits, depth = net.predict(image)
        soft = soft_consistency_measures(image, torch.softmax(logits, 1), depth)
        perf = F.cross_entropy(logits, labels, ignore_index=255)
        return logits, perf, -soft[:, 1:].mean(1).sum()

    for success in (0.0, 1.0):
        ours = _opgd(net, x, y, 4.0, detector=det, iterations=4, success_miou=success)
        theirs = _reference_opgd(net, x, y, 4.0, 4, success, reported)
        assert torch.equal(ours, theirs), f"{(ours != theirs).double().mean():.2%} of the pixels differ"
    all_three = _opgd(net, x, y, 4.0, iterations=4, success_miou=1.0)
    assert not torch.equal(all_three, ours)  # the detector's measures matter: the stage's detector is used
    weighted = _opgd(net, x, y, 4.0, detector=det, iterations=4, success_miou=0.0, weighted=True)
    assert not torch.equal(weighted, _opgd(net, x, y, 4.0, detector=det, iterations=4, success_miou=0.0))


# ------------------------------------------------------------------------------ Metzen's dynamic τ rule
def _reference_metzen_dynamic(net, x, hidden, omega, tau, eps, iterations):
    """Metzen et al.'s dynamic attack per image and pixel: J^ω with the pixels whose softmax probability of their
    target exceeds τ left out (their loss over |I| pixels), a step of 1 gray value down the sign, the ε-ball."""
    from scipy import ndimage

    seg = net.segmenter()
    out = []
    for i in range(x.shape[0]):
        clean = x[i:i + 1]
        with torch.no_grad():
            pred = seg(clean).argmax(1)[0]
        mask = (pred == hidden).numpy()
        target = pred.clone()
        if mask.any() and not mask.all():
            idx = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
            target = torch.as_tensor(pred.numpy()[idx[0], idx[1]])
        image = clean.clone()
        for _ in range(iterations):
            image.requires_grad_(True)
            logp = torch.log_softmax(seg(image), 1)[0]
            prob = logp.detach().exp()
            total = 0.0
            for r in range(target.shape[0]):
                for c in range(target.shape[1]):
                    t = int(target[r, c])
                    if prob[t, r, c] > tau:
                        continue
                    w = omega if bool(mask[r, c]) else 1 - omega
                    total = total - w * logp[t, r, c]
            loss = total / target.numel()
            (g,) = torch.autograd.grad(loss, image)
            adv = image.detach() - torch.sign(g)
            image = torch.clamp(clean + torch.clamp(adv - clean, -eps, eps), 0, 255).detach()
        out.append(image)
    return torch.cat(out)


def test_metzen_dynamic_leaves_out_the_pixels_already_on_target_with_confidence_tau():
    from mtkit_attacks.metzen import DynamicOptions, MetzenDynamic

    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet10t", num_classes=CLASSES), ("segmentation",)).double().eval()
    with torch.no_grad():  # confident logits (a fresh network's softmax is near uniform, nothing exceeds τ)
        for p in net.seg_head.out.parameters():
            p.mul_(40)
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 3, 16, 24, generator=g, dtype=torch.float64) * 255).round()
    with torch.no_grad():
        logits = net.segmenter()(x)
    counts = torch.bincount(logits.argmax(1).flatten(), minlength=CLASSES)
    hidden = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())  # the rarest predicted class
    tau = 0.75
    on_target = torch.softmax(logits, 1).amax(1) > tau
    assert 0.1 < float(on_target.double().mean()) < 0.9  # the rule has pixels to leave out, and pixels to keep
    ctx = AttackContext(net.segmenter(), None, torch.Generator())
    opts = DynamicOptions(hidden_class=hidden, omega=0.9, tau=tau, iterations=6)
    ours = MetzenDynamic(opts).sweep(ctx, x, None, [8.0])[8.0]
    theirs = _reference_metzen_dynamic(net, x, hidden, 0.9, tau, 8.0, 6)
    assert torch.equal(ours, theirs), f"{(ours != theirs).double().mean():.2%} of the pixels differ"
    without = MetzenDynamic(opts.model_copy(update={"tau": None})).sweep(ctx, x, None, [8.0])[8.0]
    assert not torch.equal(without, ours)  # the rule changes the steps
    assert DynamicOptions().tau == 0.75  # the paper's τ by default


# --------------------------------------------------------------------------------- the conformal threshold
def test_the_threshold_is_the_conformal_rank_and_meets_its_rate():
    """With 24 fitting scores at 5 %: rank ⌈25 · 0.95⌉ = 24 (the largest), so a fresh clean score exceeds it with
    probability 1/25 = 4 %; the plain quantile took rank 23 (8 %). Checked by simulation over 20,000 draws."""
    scores = np.arange(24, dtype=float)
    assert fit_threshold(scores, 0.05) == 23.0
    assert fit_threshold(np.arange(100, dtype=float), 0.05) == 95.0  # rank ⌈101 · 0.95⌉ = 96
    rng = np.random.default_rng(0)
    exceed = []
    for _ in range(20000):
        fit, fresh = rng.normal(size=24), rng.normal()
        exceed.append(fresh > fit_threshold(fit, 0.05))
    rate = float(np.mean(exceed))
    assert abs(rate - 1 / 25) < 4 * math.sqrt(0.04 * 0.96 / 20000) and rate <= 0.05
    assert min_fit_images(0.05) == 19 and min_fit_images(0.2) == 4 and min_fit_images(0.01) == 99
    fit_threshold(np.zeros(19), 0.05)
    with pytest.raises(MtkitError, match="at least 19"):
        fit_threshold(np.zeros(18), 0.05)
