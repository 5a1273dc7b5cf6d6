from __future__ import annotations

import math

import pytest
import torch
from support import OnePixelSegmenter, tiny_recipe

from mtkit.core.errors import MtkitError, RecipeError
from mtkit.core.results import WORST_CASE
from mtkit.evaluation.sweep import CountingContext, robustness_sweep
from mtkit.ops.metrics import confusion_matrix, iou_per_class, miou, q_ratio
from mtkit.perturbations import (
    APGD,
    FGSM,
    PGD,
    AttackContext,
    Perturbation,
    apgd_checkpoints,
    apgd_sweep,
    fgsm,
    fgsm_direction,
    gaussian_noise,
    measured_epsilon,
    pgd,
    pgd_iterations,
    pgd_sweep,
    salt_and_pepper,
    salt_and_pepper_per_image,
)
from mtkit.recipe.build import build_perturbation, build_perturbations
from mtkit.recipe.load import validate


def _ctx(loaded, seed=0):
    return AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator().manual_seed(seed))


def test_gaussian_epsilon_is_the_standard_deviation():
    x = torch.full((4, 3, 64, 64), 128.0)
    g = torch.Generator().manual_seed(0)
    for eps in (0.25, 1.0, 16.0):
        assert measured_epsilon(gaussian_noise(x, eps, g), x) == pytest.approx(eps, rel=0.02)


def test_salt_and_pepper_hits_requested_epsilon():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 96) * 255
    g = torch.Generator().manual_seed(1)
    for eps in (0.25, 0.5, 1, 2, 4, 8, 16):
        adv = salt_and_pepper(x, eps, g)
        assert measured_epsilon(adv, x) == pytest.approx(eps, rel=0.02), eps
        changed = (adv != x).any(1)
        vals = adv.permute(0, 2, 3, 1)[changed]
        assert ((vals == 0).all(1) | (vals == 255).all(1)).all()  # whole pixels set to 0 or 255
    frac = ((salt_and_pepper(x, 16, g) != x).any(1)).float().mean()
    assert 0 < frac < 0.05


def test_salt_and_pepper_per_image_is_independent_of_the_batch():
    """Each image hits ε on its own, and its result and measured ε are the same alone or in a batch of 16."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 48, 64) * 255
    x[3] = 0.0  # a black image among bright ones: a batch-level fraction would give it far more noise
    pert = build_perturbation("salt_pepper")
    for eps in (0.25, 4.0, 16.0):
        batch = pert.sweep(AttackContext(None, None, torch.Generator(), seed=5, indices=list(range(16))),
                           x, None, [eps])[eps]
        for i in (0, 3, 11):
            alone = pert.sweep(AttackContext(None, None, torch.Generator(), seed=5, indices=[i]),
                               x[i:i + 1], None, [eps])[eps]
            assert torch.equal(alone[0], batch[i])
            assert measured_epsilon(alone, x[i:i + 1]) == measured_epsilon(batch[i:i + 1], x[i:i + 1])
        per_image = [measured_epsilon(batch[i:i + 1], x[i:i + 1]) for i in range(16)]
        # never more than √2·ε: the last pixel is added only where it brings ε² closer to the request
        assert all(e <= 2**0.5 * eps + 1e-9 for e in per_image), (eps, per_image)
        if eps >= 4:  # well above the granularity, every image but the black one hits ε within 2 %
            assert all(abs(e - eps) <= 0.02 * eps for i, e in enumerate(per_image) if i != 3), (eps, per_image)
        # granularity: on the black image every salt pixel moves ε² by 3·255²/(3·48·64) ≈ 21 at once
        assert abs(per_image[3] ** 2 - eps**2) <= 255**2 / (48 * 64) + 1e-9


def test_sweep_records_per_image_epsilon_spread_and_is_independent_of_batch_size(trained):
    loaded, ds, _, _ = trained
    perts = {"salt_pepper": build_perturbation("salt_pepper"), "gaussian": build_perturbation("gaussian")}
    small = robustness_sweep(loaded.segmenter, ds, perts, [0.5, 8.0], 19, loaded.class_weights, batch_size=1)
    large = robustness_sweep(loaded.segmenter, ds, perts, [0.5, 8.0], 19, loaded.class_weights, batch_size=4)
    for a, b in zip(small.rows, large.rows):
        assert a.miou == b.miou
        assert a.epsilon_measured == pytest.approx(b.epsilon_measured, rel=1e-12)
        spread = a.epsilon_measured_per_image
        assert spread.model_dump() == pytest.approx(b.epsilon_measured_per_image.model_dump(), rel=1e-9)
        assert spread.min <= spread.mean <= spread.max and spread.sd >= 0
        if a.perturbation == "salt_pepper":
            assert spread.max <= 2**0.5 * a.level + 1e-9


def test_pgd_runs_at_least_one_iteration_for_every_epsilon_and_takes_overrides(trained):
    loaded, _, x, y = trained
    assert all(pgd_iterations(e) >= 1 for e in (1e-3, 0.1, 0.25, 0.5, 0.99))
    assert pgd_iterations(16.0, {16.0: 30}) == 30 and pgd_iterations(4.0, {16.0: 30}) == 5
    assert pgd_iterations(4.0, 7) == 7
    calls = []

    class Counting(AttackContext):
        def gradient(self, x, loss_fn):
            calls.append(x.shape[0])  # images in the pass: the ε copies still iterating share a pass
            return super().gradient(x, loss_fn)

    ctx = Counting(loaded.segmenter, loaded.class_weights, torch.Generator())
    adv = PGD().sweep(ctx, x[:1], y[:1], [0.25])[0.25]
    assert calls == [1] and not torch.equal(adv, x[:1])  # ε < 1 still attacks
    calls.clear()
    build_perturbation("pgd", {"iterations": {"0.25": 3, 16: 2}}).sweep(ctx, x[:1], y[:1], [0.25, 16.0])
    assert calls == [2, 2, 1]  # 3 + 2 iterations: two passes with both copies, one with the ε = 0.25 copy
    for bad in ({"iterations": 0}, {"iterations": {4: -1}}, {"iterations": {"x": 2}}, {"step": -1}):
        with pytest.raises(MtkitError):
            build_perturbation("pgd", bad)


def test_fgsm_moves_every_element_by_exactly_epsilon_and_raises_loss(trained):
    loaded, _, x, y = trained
    ctx = _ctx(loaded)
    direction = fgsm_direction(ctx.input_gradient(x, y))
    for eps in (0.25, 4.0):
        adv = fgsm(x, direction, eps)
        assert torch.equal((adv - x).abs(), torch.full_like(x, eps))  # before clipping: exactly ±ε
        assert measured_epsilon(adv, x) == pytest.approx(eps, rel=1e-6)
    with torch.no_grad():
        clean = ctx.loss(x, y)
        adv_loss = ctx.loss(FGSM().sweep(ctx, x, y, [4.0])[4.0], y)
    assert adv_loss > clean


def test_pgd_stays_in_ball_and_beats_fgsm(trained):
    loaded, _, x, y = trained
    ctx = _ctx(loaded)
    eps = 4.0
    adv = pgd(ctx, x, y, eps)
    assert (adv - x).abs().max() <= eps + 1e-4
    assert adv.min() >= 0 and adv.max() <= 255
    with torch.no_grad():
        l_fgsm = ctx.loss(FGSM().sweep(ctx, x, y, [eps])[eps], y)
        l_pgd = ctx.loss(adv, y)
    assert l_pgd > l_fgsm
    start = build_perturbation("pgd", {"random_start": True}).sweep(_ctx(loaded, 3), x, y, [2.0])[2.0]
    assert (start - x).abs().max() <= 2.0 + 1e-4
    assert [pgd_iterations(e) for e in (0.25, 0.5, 1, 2, 4, 8, 16)] == [1, 1, 2, 3, 5, 10, 20]


def test_the_l2_projection_onto_ball_and_box_is_exact():
    from mtkit.perturbations.gradient import project_l2

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 5, generator=g) * 255
    x[1, 0] = 254.0  # a saturating image: a gradient step pushes these up against 255
    v = torch.randn(2, 3, 4, 5, generator=g) * 40
    v[1, 0] = 30.0
    radius = 60.0
    out = project_l2(x + v, x, radius)
    r = out - x
    assert out.min() >= 0 and out.max() <= 255
    assert r.flatten(1).norm(dim=1) == pytest.approx([radius, radius], rel=1e-5)  # on the sphere after clipping
    # the projection onto a convex set C is the point p with <z - p, c - p> <= 0 for every c in C: check it
    # against feasible points of the ball ∩ box (a box point, shrunk towards x into the ball: the box holds 0)
    for i in range(2):
        z, p = (x[i] + v[i]).double(), out[i].double()
        for _ in range(200):
            c = torch.maximum(torch.minimum(torch.randn(3, 4, 5, generator=g).double() * 50, 255 - x[i].double()),
                              -x[i].double())
            c = x[i].double() + c * min(1.0, radius / float(c.norm()))
            assert float(((z - p) * (c - p)).sum()) <= 1e-2
    inside = project_l2(x + v / 100, x, radius)  # already in the ball and the box: unchanged
    assert torch.allclose(inside, x + v / 100)


def test_pgd_rms_reaches_its_rms_epsilon_where_pgd_stays_below(trained):
    loaded, _, x, y = trained
    ctx = _ctx(loaded)
    eps = [1.0, 4.0, 16.0]
    equal_snr = build_perturbation("pgd_rms").sweep(ctx, x, y, eps)
    paper = PGD().sweep(ctx, x, y, eps)
    for e in eps:
        assert measured_epsilon(equal_snr[e], x) == pytest.approx(e, rel=0.01)
        assert equal_snr[e].min() >= 0 and equal_snr[e].max() <= 255
        assert measured_epsilon(paper[e], x) < (0.97 * e if e >= 4 else e + 1e-6)  # an L∞ bound: RMS below ε
    with torch.no_grad():  # an attack: at equal SNR it raises the loss beyond FGSM's one step
        l_fgsm = ctx.loss(FGSM().sweep(ctx, x, y, [4.0])[4.0], y)
        assert ctx.loss(equal_snr[4.0], y) > l_fgsm
    assert build_perturbation("pgd_rms").epsilon_meaning.startswith("L2 ball of RMS ε")


def test_confusion_miou_hand_example_and_torchmetrics():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]  # void pixel ignored
    # class 0: TP 1 FP 1 FN 1 -> 1/3; class 1: TP 2 FP 1 FN 1 -> 1/2; class 2: TP 1 FP 1 FN 1 -> 1/3
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert miou(conf) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    from torchmetrics.classification import MulticlassJaccardIndex

    tm = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)
    assert miou(conf) == pytest.approx(tm(pred, target).item(), abs=1e-6)
    # counts are summed over images before dividing (eq. 9), not averaged per image
    a = confusion_matrix(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    assert miou(a + b) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert q_ratio(0.3, 0.6) == 0.5


class Identity(Perturbation):
    def sweep(self, ctx, x, y, epsilons):
        return {e: x.clone() for e in epsilons}


def test_sweep_q_of_unperturbed_is_one_and_fgsm_costs_one_backward(trained):
    loaded, ds, _, _ = trained
    perts = {"identity": Identity(), "fgsm": FGSM(), "pgd": PGD(PGD.Options(iterations=2))}
    eps = [0.25, 0.5, 1, 2, 4, 8, 16]
    out = robustness_sweep(loaded.segmenter, ds, perts, eps, 19, loaded.class_weights, batch_size=2)
    rows = {(r.perturbation, r.epsilon): r for r in out.rows}
    assert out.clean.miou > 0
    for e in eps:
        assert rows[("identity", e)].q == 1.0
        assert rows[("fgsm", e)].backward_passes_per_batch == 1  # one gradient serves all 7 ε
        assert rows[("pgd", e)].backward_passes_per_batch == 2 * len(eps)
        assert rows[("fgsm", e)].epsilon_measured <= e + 1e-9  # clipping can only shrink it
        assert rows[("fgsm", e)].epsilon_measured > 0.9 * e
    assert rows[("fgsm", 16)].q < rows[("fgsm", 0.25)].q <= 1.0 + 1e-9


def test_bad_input_errors(trained):
    loaded, ds, x, _ = trained
    with pytest.raises(MtkitError, match="unknown perturbation 'fgsn'; did you mean 'fgsm'"):
        build_perturbation("fgsn")
    for eps, msg in (([], "empty"), ([-1.0], "positive"), ([float("inf")], "finite"), ([float("nan")], "finite")):
        with pytest.raises(RecipeError, match=msg):  # ε is validated once, when the recipe loads
            validate(tiny_recipe(**{"robustness.epsilons": eps}))
    with pytest.raises(MtkitError, match="needs ground-truth labels"):
        FGSM().sweep(_ctx(loaded), x, None, [1.0])
    assert list(build_perturbations(["fgsm"], {"pgd": {"step": 1}})) == ["fgsm"]  # kept for an extending recipe
    with pytest.raises(MtkitError, match="unknown perturbation 'pdg'; did you mean 'pgd'"):
        build_perturbations(["fgsm"], {"pdg": {"step": 1}})
    with pytest.raises(MtkitError, match="unknown perturbation 'fgsmm'"):
        build_perturbations(["fgsmm"], {"pgd": {"step": 1}})
    with pytest.raises(RecipeError, match=r"unknown option 'robustness.options.gaussian.sigma' of perturbation "
                                          r"'gaussian' \(allowed: none\)"):
        build_perturbation("gaussian", {"sigma": 2})


def test_apgd_checkpoints_follow_croce_and_hein():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (steps shrink by .03 down to .06)
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(20) == [0, 5, 9, 12, 14, 16, 18, 19, 20]
    assert apgd_checkpoints(1) == [0, 1]


def _miou_loss(ctx, x, y):
    with torch.no_grad():
        logits = ctx.model(x)
    return miou(confusion_matrix(logits.argmax(1), y, 19)), float(ctx.objective(logits, y))


def test_apgd_is_at_least_as_strong_as_pgd_on_the_same_budget_and_stays_in_the_ball(trained):
    loaded, _, x, y = trained
    ctx = _ctx(loaded)
    eps = [1.0, 4.0, 16.0]
    adv_pgd, adv_apgd = pgd_sweep(ctx, x, y, eps), apgd_sweep(ctx, x, y, eps)
    for e in eps:
        a = adv_apgd[e]
        assert (a - x).abs().max() <= e + 1e-4 and a.min() >= 0 and a.max() <= 255
        m_pgd, l_pgd = _miou_loss(ctx, adv_pgd[e], y)
        m_apgd, l_apgd = _miou_loss(ctx, a, y)
        assert l_apgd >= l_pgd - 1e-4, (e, l_apgd, l_pgd)  # the attacked loss: at least PGD's
        assert m_apgd <= m_pgd + 2e-3, (e, m_apgd, m_pgd)  # mIoU: no higher (within 0.2 pt)
    assert _miou_loss(ctx, adv_apgd[16.0], y)[0] < _miou_loss(ctx, adv_pgd[16.0], y)[0] - 0.005  # measured: 1.9 pt

    # the same budget: PGD's gradient passes (one per iteration), counted by the sweep
    counted = CountingContext(loaded.segmenter, loaded.class_weights, torch.Generator(), indices=list(range(len(y))))
    APGD().sweep(counted, x, y, [4.0])
    assert counted.backward_passes == pgd_iterations(4.0) == 5
    # one ε of a sweep equals the stacked sweep (each image has its own step size and checkpoints)
    assert torch.equal(apgd_sweep(ctx, x, y, [4.0])[4.0], adv_apgd[4.0])
    # restarts keep, per image, the strongest run: never weaker than the first run
    restarted = build_perturbation("apgd", {"restarts": 2}).sweep(_ctx(loaded, 1), x, y, [4.0])[4.0]
    assert ctx.image_losses_of(restarted, y).sum() >= ctx.image_losses_of(adv_apgd[4.0], y).sum() - 1e-4
    for options, msg in (({"restarts": 0}, "restarts"), ({"momentum": 0}, "momentum"), ({"rho": 2}, "rho")):
        with pytest.raises(RecipeError, match=msg):
            build_perturbation("apgd", options)


def test_worst_case_keeps_the_strongest_example_per_image_and_is_never_above_any_attack(trained):
    loaded, ds, _, _ = trained
    perts = build_perturbations(["gaussian", "fgsm", "pgd", "apgd"], {"pgd": {"iterations": 2}})
    eps = [1.0, 4.0, 16.0]
    out = robustness_sweep(loaded.segmenter, ds, perts, eps, 19, loaded.class_weights, batch_size=4)
    rows = {(r.perturbation, r.level): r for r in out.rows}
    assert {p for p, _ in rows} == {"gaussian", "fgsm", "pgd", "apgd", WORST_CASE}
    for e in eps:
        worst = rows[(WORST_CASE, e)]
        assert worst.attack and worst.miou <= min(rows[(p, e)].miou for p in ("fgsm", "pgd", "apgd")) + 1e-12
        assert worst.epsilon_measured <= e + 1e-9

    # the ensemble per image: two attacks that each attack half of the images (FGSM on even or odd dataset
    # indices, the others left clean) make up, per image, exactly FGSM: stronger than either half alone
    halves = {"even": HalfFGSM(0), "odd": HalfFGSM(1)}
    mixed = {(r.perturbation, r.level): r for r in robustness_sweep(
        loaded.segmenter, ds, halves, eps, 19, loaded.class_weights, batch_size=4).rows}
    for e in eps:
        worst = mixed[(WORST_CASE, e)]
        assert worst.note is None  # the ensemble itself, not one attack alone
        assert worst.miou == pytest.approx(rows[("fgsm", e)].miou, abs=1e-12)
        assert worst.epsilon_measured == pytest.approx(rows[("fgsm", e)].epsilon_measured, rel=1e-9)
        assert worst.miou < min(mixed[("even", e)].miou, mixed[("odd", e)].miou)

    # one gradient attack: no worst case row
    alone = robustness_sweep(loaded.segmenter, ds, build_perturbations(["fgsm", "gaussian"], {}), [4.0], 19,
                             loaded.class_weights, batch_size=4)
    assert WORST_CASE not in {r.perturbation for r in alone.rows}


class HalfFGSM(Perturbation):
    """FGSM on the images whose dataset index has the given parity; the others stay clean."""

    needs_gradient = True

    def __init__(self, parity):
        super().__init__()
        self.parity = parity

    def sweep(self, ctx, x, y, epsilons):
        keep = torch.tensor([i % 2 == self.parity for i in ctx.indices]).view(-1, 1, 1, 1)
        full = FGSM().sweep(ctx, x, y, epsilons)
        return {e: torch.where(keep, full[e], x) for e in epsilons}


def _salt_and_pepper_reference(x: torch.Tensor, eps: float, g: torch.Generator) -> torch.Tensor:
    """One image (1, C, H, W) the way the algorithm reads: pixels in random order until Σ r² reaches ε²·N, then
    the remaining pixel whose contribution best matches the deficit (the first in the order among equals)."""
    _, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, c).double()
    n = flat.shape[0]
    values = torch.randint(0, 2, (n, 1), generator=g).double() * 255.0
    contrib = ((values - flat) ** 2).sum(1)
    order = torch.randperm(n, generator=g).tolist()
    target, total, chosen = eps**2 * x.numel(), 0.0, []
    for i in order:
        if total + float(contrib[i]) >= target:
            break
        total += float(contrib[i])
        chosen.append(i)
    rest = order[len(chosen):]
    deficit = target - total
    if deficit > 0 and rest:
        best = min(rest, key=lambda i: abs(float(contrib[i]) - deficit))  # min keeps the first among equals
        if abs(float(contrib[best]) - deficit) < deficit:
            chosen.append(best)
    out = flat.clone()
    out[chosen] = values[chosen].expand(-1, c)
    return out.view(1, h, w, c).permute(0, 3, 1, 2).to(x.dtype)


def test_batched_salt_and_pepper_equals_the_per_image_algorithm_exactly():
    """The batched tensor version against the algorithm written as a loop, on integer gray values (many equal
    contributions, so the tie rule matters), black and mid-gray images, every paper ε and one far above."""
    torch.manual_seed(0)
    x = (torch.rand(5, 3, 24, 40) * 255).round()
    x[2], x[4] = 0.0, 128.0
    for eps in (0.25, 1, 4, 16, 60):
        got = salt_and_pepper_per_image(x, eps, [torch.Generator().manual_seed(10 + i) for i in range(5)])
        for i in range(5):
            ref = _salt_and_pepper_reference(x[i:i + 1], eps, torch.Generator().manual_seed(10 + i))
            assert torch.equal(got[i:i + 1], ref), (eps, i)


def test_per_image_losses_are_batched_and_equal_each_image_alone(trained):
    loaded, _, x, y = trained
    from mtkit.ops.losses import CrossEntropy, WeightedCrossEntropy
    from mtkit.perturbations import wrong_class_probability

    with torch.no_grad():
        logits = loaded.segmenter(torch.cat([x, x.flip(-1)]))  # two stacked copies of the batch
    for loss in (None, WeightedCrossEntropy(loaded.class_weights), CrossEntropy(), wrong_class_probability):
        ctx = AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator(), loss_fn=loss)
        got = ctx.image_losses(logits, y)
        ref = torch.stack([ctx.objective(logits[i:i + 1], y[i % 4:i % 4 + 1]) for i in range(8)])
        assert got.shape == (8,) and torch.allclose(got, ref, rtol=1e-5), loss


def _apgd_reference(model, x, y, eps, n, rho=0.75, alpha=0.75, eta_saved_after_halving=False):
    """APGD-CE on one image, from Croce and Hein 2020, Algorithm 1, with AutoAttack's restart bookkeeping (the
    momentum after a restart runs from the best point; η counts as unchanged when it was not halved at the last
    checkpoint): written as a loop, independently of ``apgd_sweep``."""
    def f_and_grad(z):
        z = z.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(z), y)
        (g,) = torch.autograd.grad(loss, z)
        return float(loss), g

    def proj(z):
        return torch.clamp(torch.minimum(torch.maximum(z, x - eps), x + eps), 0, 255)

    marks = set(apgd_checkpoints(n))
    eta, x_k, x_prev = 2 * eps, x.clone(), x.clone()
    f_k, g_k = f_and_grad(x_k)
    x_best, f_best, g_best = x_k, f_k, g_k
    rises, last, reduced_last, f_last = 0, 0, False, f_best
    for k in range(n):
        a = 1.0 if k == 0 else alpha
        z = proj(x_k + eta * torch.sign(g_k))
        x_new = proj(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
        x_prev = x_k
        f_new, g_new = f_and_grad(x_new)
        rises += f_new > f_k
        x_k, f_k, g_k = x_new, f_new, g_new
        if f_new > f_best:
            x_best, f_best, g_best = x_new, f_new, g_new
        if k + 1 in marks and k + 1 < n:
            unchanged = True if eta_saved_after_halving else not reduced_last  # the former code's reading
            reduce = rises < rho * (k + 1 - last) or (unchanged and f_best <= f_last)
            reduced_last, f_last, rises, last = reduce, f_best, 0, k + 1
            if reduce:
                eta /= 2
                x_k, f_k, g_k = x_best, f_best, g_best
    return x_best


def test_apgd_follows_algorithm_1_step_for_step_on_a_one_pixel_segmenter():
    """APGD's best points equal the reference loop's at 100 iterations (AutoAttack's budget) for 6 images and two
    ε, to 1e-9 gray values (batched, per-image step sizes and restarts against one image at a time). On this smooth
    model the checkpoint rule the former code misread never decides; the scripted test below makes it decide."""
    model = OnePixelSegmenter(classes=5, hidden=16, seed=3, dtype=torch.float64)
    torch.manual_seed(4)
    x = (torch.rand(6, 3, 8, 8, dtype=torch.float64) * 255)
    y = torch.randint(0, 5, (6, 1, 1))
    ctx = AttackContext(model, None, torch.Generator(), loss_fn=torch.nn.CrossEntropyLoss(reduction="mean"))
    got = apgd_sweep(ctx, x, y, [4.0, 16.0], iterations=100)
    for eps in (4.0, 16.0):
        for i in range(6):
            ref = _apgd_reference(model, x[i:i + 1], y[i:i + 1], eps, 100)
            assert float((got[eps][i:i + 1] - ref).abs().max()) < 1e-9, (eps, i)


class _Scripted(torch.nn.Module):
    """A 1x1-output segmenter whose loss at its c-th call is ``losses[c]`` (logits [0, z], label 0: J = log(1 +
    e^z)) and whose input gradient has the signs ``directions[c]``: a landscape that exercises APGD's checkpoint
    rules on purpose."""

    def __init__(self, losses, directions) -> None:
        super().__init__()
        self.losses, self.directions, self.calls = losses, directions, 0

    def forward(self, x):
        c = self.calls
        self.calls += 1
        z = math.log(math.expm1(self.losses[c])) + 1e-3 * ((x - x.detach()) * self.directions[c]).sum()
        return torch.stack([torch.zeros_like(z), z]).view(1, 2, 1, 1)


def test_apgd_halves_after_a_halving_only_when_the_loss_stops_rising():
    """Scripted losses: falling until the first checkpoint (w = 22: condition 1, η halves), then rising at every
    step without a new best until the second (w = 41): condition 1 fails, and condition 2 fails because η was just
    halved, so η stays; a new best follows at step 50. APGD's best point equals the reference's; the former
    reading (η saved after halving, so "η unchanged" always held) would halve at w = 41 and land elsewhere."""
    n = 100
    losses = [1.0, 2.0] + [2.0 - 0.04 * j for j in range(1, 22)] + [1.0 + 0.01 * j for j in range(19)]
    losses += [1.5] * 8 + [3.0] + [1.2] * (n + 1 - len(losses) - 9)
    g = torch.Generator().manual_seed(0)
    directions = [torch.where(torch.rand(1, 3, 2, 2, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
                  for _ in losses]
    x = torch.full((1, 3, 2, 2), 128.0, dtype=torch.float64)
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    scripted = _Scripted(losses, directions)
    ctx = AttackContext(scripted, None, torch.Generator(), loss_fn=torch.nn.CrossEntropyLoss())
    got = apgd_sweep(ctx, x, y, [16.0], iterations=n)[16.0]
    assert scripted.calls == n + 1
    ref = _apgd_reference(_Scripted(losses, directions), x, y, 16.0, n)
    assert torch.equal(got, ref)
    former = _apgd_reference(_Scripted(losses, directions), x, y, 16.0, n, eta_saved_after_halving=True)
    assert not torch.equal(former, ref)


def test_a_model_with_nan_logits_is_an_error_not_a_robust_model(trained):
    """NaN logits argmax to class 0 everywhere: a few % mIoU that no perturbation changes (Q = 100 %). The sweep
    stops with the reason instead of reporting it."""
    _, ds, _, _ = trained

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 19, *x.shape[-2:]), float("nan")) + 0 * x.sum()

    with pytest.raises(MtkitError, match="'broken' gives NaN or infinite logits on clean images of 'CS'"):
        robustness_sweep(Broken(), ds, {"gaussian": build_perturbation("gaussian")}, [1.0], 19, batch_size=4,
                         model_name="broken", dataset_name="CS")
