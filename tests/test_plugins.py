"""The plugin packages under plugins/, installed into the test environment (tools/with-env.sh installs them) and
reached only through their distributions' entry points."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import OnePixelSegmenter, tiny_recipe

from mtkit.core.errors import MtkitError
from mtkit.core.results import SANITY_CHECKS
from mtkit.evaluation.sweep import CountingContext, robustness_sweep
from mtkit.ops.losses import IGNORE_INDEX
from mtkit.perturbations import FGSM, AttackContext, Gaussian, measured_epsilon
from mtkit.plugins.manager import get_registry, load_plugins
from mtkit.recipe.build import build_perturbation
from mtkit.recipe.load import validate

PACKAGES = {"mtkit-attacks": "attacks", "mtkit-corruptions": "corruptions", "mtkit-edges": "edges"}


def _ctx(loaded, seed=0):
    return CountingContext(loaded.segmenter, loaded.class_weights, torch.Generator().manual_seed(seed))


def test_plugin_distributions_are_installed_and_found_through_entry_points():
    eps = {ep.name: ep for ep in metadata.entry_points(group="mtkit")}
    for dist, ep_name in PACKAGES.items():
        assert ep_name in eps, f"{dist} is not installed (pip install ./plugins/{dist})"
        assert eps[ep_name].dist.metadata["Name"] == dist
    plugins = load_plugins()
    assert plugins.failures == []
    reg = plugins.registry
    version = metadata.version("mtkit-attacks")
    for name in ("mifgsm", "segpgd", "cospgd", "uap"):
        assert reg.entry("perturbation", name).origin == f"mtkit-attacks {version}"
    assert reg.entry("perturbation", "corrupt_fog").origin.startswith("mtkit-corruptions ")
    assert reg.entry("task", "edges").origin.startswith("mtkit-edges ")
    # without entry points the same names are unknown, and the error names the package that provides them
    bare = load_plugins(entry_points=False).registry
    with pytest.raises(MtkitError, match="pip install mtkit-attacks"):
        bare.get("perturbation", "mifgsm")
    with pytest.raises(MtkitError, match="pip install mtkit-corruptions"):
        bare.get("perturbation", "corrupt_snow")
    with pytest.raises(MtkitError, match="Installed perturbations: apgd, fgsm, gaussian, opgd, pgd, pgd_rms, "
                                         "salt_pepper"):
        bare.get("perturbation", "my_own_attack")


@pytest.mark.parametrize("name", ["mifgsm", "segpgd", "cospgd"])
def test_iterative_attacks_stay_in_the_ball_and_raise_the_loss(trained, name):
    loaded, _, x, y = trained
    ctx = _ctx(loaded)
    eps = 4.0
    adv = build_perturbation(name).sweep(ctx, x, y, [eps])[eps]
    assert (adv - x).abs().max() <= eps + 1e-4
    assert adv.min() >= 0 and adv.max() <= 255
    assert measured_epsilon(adv, x) <= eps + 1e-6
    assert ctx.backward_passes > 1
    with torch.no_grad():
        clean, attacked = ctx.loss(x, y), ctx.loss(adv, y)
        fgsm = ctx.loss(FGSM().sweep(ctx, x, y, [eps])[eps], y)
    assert attacked > clean
    if name == "mifgsm":
        assert attacked > fgsm  # iterated with momentum: stronger than one step
    if name == "cospgd":  # the random start is the evaluation's: the same generator seed, the same example
        assert torch.equal(adv, build_perturbation(name).sweep(_ctx(loaded), x, y, [eps])[eps])


def test_cospgd_scales_each_pixel_by_its_cosine_similarity_to_the_label():
    from mtkit_attacks import cospgd_loss

    logits = torch.tensor([[[[4.0, 0.0, 1.0]], [[0.0, 0.0, 1.0]]]], requires_grad=True)  # 2 classes, 3 pixels
    y = torch.tensor([[[0, 0, 255]]])  # pixel 2 is void
    p = logits.softmax(1)[0, :, 0, :2]
    ce = -torch.log(p[0])
    cos = p[0] / p.norm(dim=0)  # cosine of (p0, p1) with the one-hot (1, 0)
    assert float(cospgd_loss(logits, y)) == pytest.approx(float((cos * ce).sum() / 2), rel=1e-6)
    # the scale is a constant of the step: the gradient is that of Σ cos·CE with cos held fixed
    (grad,) = torch.autograd.grad(cospgd_loss(logits, y), logits)
    (fixed,) = torch.autograd.grad((cos.detach() * -torch.log(logits.softmax(1)[0, 0, 0, :2])).sum() / 2, logits)
    assert torch.allclose(grad, fixed)
    assert cos[0] > cos[1]  # the confidently correct pixel weighs more than the undecided one


def test_segpgd_weights_wrong_pixels_more_over_the_iterations():
    from mtkit_attacks import segpgd_loss

    logits = torch.tensor([[[[4.0, -4.0]], [[0.0, 0.0]]]])  # pixel 0 predicted class 0, pixel 1 class 1
    y = torch.tensor([[[0, 0]]])  # pixel 0 correct, pixel 1 wrong
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")[0, 0]
    assert segpgd_loss(logits, y, 0.0) == pytest.approx(float(ce[0]) / 2)
    assert segpgd_loss(logits, y, 0.5) == pytest.approx(float(ce[0] + ce[1]) / 4)


def test_universal_perturbation_is_saved_and_transfers(trained, tmp_path):
    loaded, ds, _, _ = trained
    eps = 8.0
    opts = {"dataset": {"name": "synthetic", "split": "train", "options": {"domain": "city", "sequences": 4,
                                                                          "frames": 8}},
            "epochs": 4, "images": 32, "folder": str(tmp_path)}
    uap = build_perturbation("uap", opts)
    held_out = robustness_sweep(loaded.segmenter, ds, {"uap": uap}, [eps], 19, loaded.class_weights, 4)
    (row,) = held_out.rows
    files = list(tmp_path.glob("uap-*.pt"))
    assert len(files) == 1 and uap.files == files
    xi = torch.load(files[0], weights_only=True)["perturbation"]
    assert xi.shape == (3, 32, 64) and xi.abs().max() <= eps
    # Gaussian noise at the UAP's measured ε hurts less on the same held-out images
    gauss = robustness_sweep(loaded.segmenter, ds, {"gaussian": Gaussian()}, [row.epsilon_measured], 19,
                             loaded.class_weights, 4).rows[0]
    assert row.miou < gauss.miou, (row.miou, gauss.miou)
    # a second instance loads the file instead of learning again (no backward pass)
    again = build_perturbation("uap", opts)
    ctx = _ctx(loaded)
    again.sweep(ctx, held_out_batch(ds), None, [eps])
    assert ctx.backward_passes == 0


def held_out_batch(ds):
    return torch.stack([ds[i]["image"] for i in range(2)])


def test_every_corruption_runs_and_reports_its_measured_epsilon(trained):
    loaded, _, x, _ = trained
    reg = get_registry()
    names = [n for n in reg.names("perturbation") if n.startswith("corrupt_")]
    import imagecorruptions
    import mtkit_corruptions

    assert list(mtkit_corruptions.CORRUPTIONS) == list(imagecorruptions.get_corruption_names("all"))
    assert sorted(names) == sorted(f"corrupt_{n}" for n in mtkit_corruptions.CORRUPTIONS)
    ctx = _ctx(loaded)
    img = x[:1].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[0]
    weaker = []
    for name in names:
        pert = build_perturbation(name, {"severities": [1, 5]})
        assert pert.level_kind == "severity" and pert.levels([1.0]) == [1.0, 5.0]
        out = pert.sweep(ctx, x[:1], None, [1.0])
        for sev, adv in out.items():
            assert adv.shape == x[:1].shape and adv.min() >= 0 and adv.max() <= 255, (name, sev)
            # the values: imagecorruptions' own corrupt() on the same uint8 image, NumPy seeded with the image's
            # seed (its per-image generator for this corruption and severity), cropped to the size
            g = ctx.image_generators(1, pert.corruption, int(sev))[0]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            state = np.random.get_state()
            try:
                with mtkit_corruptions._compat():
                    np.random.seed(seed)
                    ref = np.asarray(imagecorruptions.corrupt(np.ascontiguousarray(img), severity=int(sev),
                                                              corruption_name=pert.corruption))
            finally:
                np.random.set_state(state)
            ref = np.clip(ref[:img.shape[0], :img.shape[1]].astype(np.float32), 0, 255)
            got = adv[0].permute(1, 2, 0).numpy()
            if ref.shape == got.shape:
                assert np.array_equal(got, ref), name
        again = pert.sweep(ctx, x[:1], None, [1.0])  # reproducible (impulse_noise drew fresh entropy before)
        assert all(torch.equal(out[k], again[k]) for k in out), name
        if measured_epsilon(out[5.0], x[:1]) <= measured_epsilon(out[1.0], x[:1]):
            weaker.append(name)
    assert weaker == [], f"severity 5 changes the image less than severity 1: {weaker}"
    noise = build_perturbation("corrupt_gaussian_noise").sweep(ctx, x[:2], None, [])
    eps = [measured_epsilon(noise[float(s)], x[:2]) for s in range(1, 6)]
    assert eps == sorted(eps) and eps[0] > 1  # stronger severity, larger measured ε
    with pytest.raises(MtkitError, match=r"corrupt_fog.severities.0.: Input should be less than or equal to 5"):
        build_perturbation("corrupt_fog", {"severities": [7]})


def test_recipe_sweep_with_plugin_attacks_and_corruptions(tmp_path):
    from mtkit.pipeline.runner import run

    data = tiny_recipe(**{"models": [{"name": "single", "tasks": ["segmentation"]}],
                          "robustness.perturbations": ["fgsm", "mifgsm", "segpgd", "cospgd", "uap", "corrupt_fog",
                                                       "corrupt_gaussian_noise"],
                          "robustness.epsilons": [2.0, 8.0],
                          "robustness.datasets": ["CS"],
                          "robustness.options": {
                              "mifgsm": {"iterations": 2}, "segpgd": {"iterations": 2}, "cospgd": {"iterations": 2},
                              "uap": {"dataset": {"name": "synthetic", "split": "train",
                                                  "options": {"domain": "city", "sequences": 2, "frames": 8}},
                                      "epochs": 1, "images": 4, "folder": str(tmp_path / "uap")},
                              "corrupt_fog": {"severities": [1, 3]}}})
    res = run(validate(data), progress=False, run_dir=tmp_path / "run", log=lambda m: None)
    rows = res.results.robustness
    assert {r.perturbation for r in rows} == {"fgsm", "mifgsm", "segpgd", "cospgd", "uap", "corrupt_fog",
                                                  "corrupt_gaussian_noise", "worst_case"}
    assert {c.check for c in res.results.sanity} == set(SANITY_CHECKS)
    fog = [r for r in rows if r.perturbation == "corrupt_fog"]
    assert [(r.level_kind, r.level, r.epsilon) for r in fog] == [("severity", 1.0, None),
                                                                         ("severity", 3.0, None)]
    assert all(r.epsilon_measured > 0 for r in fog)
    assert len([r for r in rows if r.perturbation == "corrupt_gaussian_noise"]) == 5
    assert res.paths["figure_corruptions"].stat().st_size > 0
    report = res.paths["report"].read_text()
    assert "under **corrupt_fog** on CS (by severity; ε measured)" in report
    assert "[%]: **segpgd** on CS" in report


def test_a_plugin_task_trains_through_a_recipe(tmp_path):
    from mtkit.training.trainer import train

    data = tiny_recipe(**{"models": [{"name": "edges", "tasks": ["segmentation", "edges"], "lambda": 0.9,
                                      "task_scales": {"edges": 0.1}}],
                          "train.steps_per_epoch": 12, "train.epochs": 1, "train.lr": 1e-3})
    res = train(validate(data), "edges", tmp_path, progress=False)
    steps = [r for r in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "step"]
    assert len(steps) == 12 and all("edges" in s for s in steps)
    first, last = sum(s["edges"] for s in steps[:3]), sum(s["edges"] for s in steps[-3:])
    assert last < first
    from mtkit.evaluation.robustness import load_model

    model = load_model(res.last).model
    assert set(model.aux_heads) == {"edges"} and model.aux_scales == {"edges": 0.1}
    with pytest.raises(MtkitError, match="task_scales names"):
        validate(tiny_recipe(**{"models": [{"name": "m", "tasks": ["segmentation"], "task_scales": {"x": 1}}]}))
    with pytest.raises(MtkitError, match="unknown task 'edge'; did you mean 'edges'"):
        train(validate(tiny_recipe(**{"models": [{"name": "m", "tasks": ["segmentation", "edge"],
                                                  "lambda": 0.5}]})), "m",
              tmp_path / "x", progress=False)


def test_plugin_task_gradient_is_scaled_where_it_meets_the_encoder():
    """Eq. 5 generalised: the encoder gets λ·g_seg + s·g_edges, each head its unscaled gradient."""
    from mtkit.core.schema import ModelConfig
    from mtkit.ops.losses import weighted_cross_entropy
    from mtkit.recipe.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(), ["segmentation", "edges"], 0.7, task_scales={"edges": 0.2}).double().train()
    x = torch.rand(2, 3, 32, 64, dtype=torch.float64) * 255
    y = torch.randint(0, 19, (2, 32, 64))
    task = model.aux_tasks["edges"]

    def grads(lam: float, scale: float, which: str) -> dict[str, torch.Tensor]:
        model.lam, model.aux_scales["edges"] = lam, scale
        model.zero_grad()
        out = model(x)
        losses = {"seg": weighted_cross_entropy(out["seg_logits"], y), "edges": task.loss(out["aux"]["edges"], x)}
        (losses["seg"] + losses["edges"] if which == "both" else losses[which]).backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    g_seg, g_edges, g_total = grads(1.0, 1.0, "seg"), grads(1.0, 1.0, "edges"), grads(0.7, 0.2, "both")
    for name, g in g_total.items():
        part = name.split(".")[0]
        expected = {"encoder": 0.7 * g_seg[name] + 0.2 * g_edges[name], "seg_head": g_seg[name],
                    "aux_heads": g_edges[name]}[part]
        assert torch.allclose(g, expected, atol=1e-6, rtol=1e-6), name


def test_mifgsm_equals_torchattacks_momentum_normalisation_and_step():
    """MI-FGSM against torchattacks' MIFGSM (the same model on [0, 1] images, ε/255, α = ε/T/255): momentum μ,
    the per-image L1 normalisation of the gradient and the step α·sign(g) give the same images."""
    torchattacks = pytest.importorskip("torchattacks")
    from mtkit_attacks import mifgsm

    from mtkit.plugin_api import AttackContext

    model = OnePixelSegmenter()
    torch.manual_seed(3)
    x = (torch.rand(5, 3, 8, 8) * 255).round()
    y = torch.randint(0, 4, (5,))
    ours = mifgsm(AttackContext(model, None, torch.Generator()), x, y.view(5, 1, 1), 8.0, iterations=5, decay=0.9)

    class Flat(torch.nn.Module):
        def forward(self, z):
            return model(z * 255.0).flatten(1)

    ref = torchattacks.MIFGSM(Flat(), eps=8 / 255, alpha=8 / 5 / 255, steps=5, decay=0.9)(x / 255.0, y) * 255.0
    assert float((ours - ref).abs().max()) < 1e-3


def test_segpgd_schedule_is_lambda_t_equal_to_t_minus_1_over_2t():
    """SegPGD's λ_t = (t-1)/(2T) for t = 1..T (Gu et al. 2022, eq. 6): the weights each step takes, and the images
    of the loop written out with them."""
    import mtkit_attacks

    from mtkit.plugin_api import AttackContext, project

    model = OnePixelSegmenter()
    torch.manual_seed(4)
    x = (torch.rand(3, 3, 8, 8) * 255).round()
    y = torch.randint(0, 4, (3, 1, 1))
    seen = []
    import sys

    segpgd_module = sys.modules["mtkit_attacks.seg_pgd"]

    real = mtkit_attacks.segpgd_loss
    ctx = AttackContext(model, None, torch.Generator())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segpgd_module, "segpgd_loss", lambda logits, yy, lam, w=None: seen.append(lam) or
                   real(logits, yy, lam, w))
        got = mtkit_attacks.segpgd(ctx, x, y, 4.0, step=1.0, iterations=4)
    assert seen == [0.0, 1 / 8, 2 / 8, 3 / 8]
    ref = x.clone()
    for lam in seen:
        z = ref.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(real(model(z), y, lam), z)
        ref = project(ref + torch.where(g >= 0, 1.0, -1.0), x, 4.0)
    assert torch.equal(got, ref)


def test_cospgd_follows_the_authors_formulation_step_by_step():
    """CosPGD against a reference written from the authors' code (shashankskagnihotri/cospgd: ``cospgd_scale`` on
    ``CrossEntropyLoss(reduction='none', ignore_index=255)``, the mean, a signed step, the L∞ clamp and [0, 1]) on
    images in [0, 1], in float64, with a void pixel: the same adversarial images after every iteration."""
    from mtkit_attacks import cospgd

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(6, 4, 3, padding=1)).double()
    x = (torch.rand(2, 3, 6, 7, dtype=torch.float64) * 255).round()
    y = torch.randint(0, 4, (2, 6, 7))
    y[0, 0, 0] = IGNORE_INDEX

    def authors(images, labels, eps, alpha, iterations, num_classes=4):
        orig = images.clone()
        adv = images.clone()
        criterion = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=255)
        for _ in range(iterations):
            adv.requires_grad_(True)
            predictions = net(adv * 255.0)
            loss = criterion(predictions, labels)
            target = F.one_hot(torch.clamp(labels, labels.min(), num_classes - 1), num_classes).permute(0, 3, 1, 2)
            cossim = F.cosine_similarity(F.softmax(predictions, dim=1), target, dim=1)
            loss = (cossim.detach() * loss).mean()
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + alpha * grad.sign()
            adv = torch.min(torch.max(adv, orig - eps), orig + eps).clamp(0, 1)
        return adv

    ctx = AttackContext(net, None, torch.Generator())
    for iterations in (1, 3, 6):
        ours = cospgd(ctx, x, y, 4.0, step=1.0, iterations=iterations, random_start=False)
        ref = authors(x / 255.0, y, 4.0 / 255, 1.0 / 255, iterations) * 255.0
        assert float((ours - ref).abs().max()) < 1e-9, iterations
