"""Targeted segmentation attacks of the mtkit-attacks plugin (Metzen et al.'s static and dynamic targets, per image
and universal; DAG; data-free GD-UAP): their losses by hand, their success on a trained tiny model, the universal
versions' cache and transfer, the evaluation's targeted rows and report, and the bring-your-own-model path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import tiny_recipe

from mtkit import api
from mtkit.core.errors import MtkitError
from mtkit.evaluation.sweep import robustness_sweep
from mtkit.ops.losses import IGNORE_INDEX
from mtkit.ops.metrics import targeted_counts, targeted_rates
from mtkit.plugins.manager import list_entries
from mtkit.recipe.build import build_perturbation
from mtkit.recipe.load import validate

LOGITS = torch.tensor([[[[2.0, 0.0, 1.0], [0.0, 3.0, 0.5]],
                        [[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]]]])  # 2 classes on a 2x3 image


def _ce(i: int, j: int, c: int) -> float:
    """-log softmax(LOGITS)[c] at pixel (i, j), from the numbers."""
    a, b = float(LOGITS[0, 0, i, j]), float(LOGITS[0, 1, i, j])
    return -([a, b][c] - math.log(math.exp(a) + math.exp(b)))


def test_the_losses_by_hand_on_a_2x3_image():
    from mtkit_attacks import dag_objective, fill_hidden, gd_uap_loss, metzen_loss

    target = torch.tensor([[[1, 1, 0], [0, 1, IGNORE_INDEX]]])
    pixels = [(0, 0, 1), (0, 1, 1), (0, 2, 0), (1, 0, 0), (1, 1, 1)]
    static = sum(_ce(*p) for p in pixels) / 5  # the mean over the 5 pixels with a target
    assert float(metzen_loss(LOGITS, target)[0]) == pytest.approx(static, rel=1e-6)
    hidden = torch.tensor([[[True, False, False], [False, True, False]]])  # I_o: (0, 0) and (1, 1)
    omega = 0.8
    dynamic = (omega * (_ce(0, 0, 1) + _ce(1, 1, 1)) + (1 - omega) * (_ce(0, 1, 1) + _ce(0, 2, 0) + _ce(1, 0, 0))) / 5
    assert float(metzen_loss(LOGITS, target, hidden, omega)[0]) == pytest.approx(dynamic, rel=1e-6)
    # DAG: active where the prediction is still the label; the sum of f_target − f_label there
    labels = torch.tensor([[[0, 1, 0], [1, 0, 0]]])  # predicted: [[0, 1, 0/1 tie → 0], [1, 0, 0]]
    targets = torch.tensor([[[1, 0, 1], [0, 1, IGNORE_INDEX]]])
    value, active = dag_objective(LOGITS, labels, targets)
    assert active.tolist() == [[[True, True, True], [True, True, False]]]
    by_hand = (0.0 - 2.0) + (0.0 - 1.0) + (1.0 - 1.0) + (0.0 - 2.0) + (0.0 - 3.0)
    assert float(value[0]) == pytest.approx(by_hand)
    # Metzen's dynamic target: the hidden class takes the nearest other pixel's label
    assert fill_hidden(torch.tensor([[[0, 11, 11, 2]]]), 11).tolist() == [[[0, 0, 2, 2]]]
    assert fill_hidden(torch.tensor([[[11, 11]]]), 11).tolist() == [[[11, 11]]]  # nothing to fill from
    # GD-UAP: −Σ log ‖l_i‖: norms 2 and 0.5 give −(log 2 + log 0.5) = 0
    assert float(gd_uap_loss([torch.tensor([2.0, 0.0]), torch.tensor([0.3, 0.4])])) == pytest.approx(-math.log(
        2.0 * 0.5))


def test_the_targeted_counts_and_rates_by_hand():
    pred = torch.tensor([[[1, 1, 0], [3, 3, 0]]])
    target = torch.tensor([[[1, 0, 0], [3, 2, IGNORE_INDEX]]])
    reference = torch.tensor([[[3, 1, 0], [3, 2, 0]]])  # the clean prediction: class 3 hidden at 2 pixels
    counts = targeted_counts(pred, target, "dynamic", 3, reference)
    # took the target: 3 of 5; hidden pixels removed: (0, 0) now 1, (1, 0) still 3 → 1 of 2; the 4 others kept:
    # (0, 1) 1 = 1, (0, 2) 0 = 0, (1, 1) 3 ≠ 2, (1, 2) 0 = 0 → 3 of 4
    assert counts.tolist() == [[3, 5, 1, 2, 3, 4]]  # one row per image
    assert targeted_rates(counts) == (0.6, 0.5, 0.75)
    assert targeted_rates(targeted_counts(pred, target, "static"))[1:] == (None, None)


@pytest.fixture(scope="module")
def setup(trained):
    """The trained tiny segmenter, its evaluation set (32x64) and a static target: the model's prediction on
    another image of the set (Metzen et al.'s choice)."""
    loaded, ds, _, _ = trained
    cfg = {"name": "synthetic", "split": "val", "height": 32, "width": 64, "limit": 4,
           "options": {"domain": "city", "sequences": 2, "frames": 8}}
    return loaded, ds, cfg


def _sweep(loaded, ds, perts: dict, eps: list[float]):
    return robustness_sweep(loaded.segmenter, ds, perts, eps, 19, loaded.class_weights, batch_size=4)


def test_static_target_success_rises_with_eps_and_with_iterations(setup):
    loaded, ds, cfg = setup
    static = {"metzen_static": build_perturbation("metzen_static", {"target_dataset": cfg, "target_index": 3})}
    rows = _sweep(loaded, ds, static, [1.0, 4.0, 16.0]).targeted
    success = [r.success for r in sorted(rows, key=lambda r: r.epsilon)]
    assert [r.kind for r in rows] == ["static"] * 3
    assert success[0] < success[1] < success[2] and success[2] > 0.5, success
    assert rows[0].success_clean == rows[2].success_clean < success[0]  # above what the clean images agreed
    few = build_perturbation("metzen_static", {"target_dataset": cfg, "target_index": 3, "iterations": 1})
    one = _sweep(loaded, ds, {"metzen_static": few}, [4.0]).targeted[0].success
    assert one < success[1], (one, success[1])  # 5 iterations at ε = 4 (Kurakin) beat one


def test_dynamic_target_hides_a_class_and_keeps_the_rest(setup):
    loaded, ds, _ = setup
    with torch.no_grad():
        pred = loaded.segmenter(torch.stack([ds[i]["image"] for i in range(len(ds))])).argmax(1)
    counts = torch.bincount(pred.flatten(), minlength=19)
    hidden = int(counts.argsort(descending=True)[1])  # the second most frequent predicted class
    pert = build_perturbation("metzen_dynamic", {"hidden_class": hidden})
    rows = sorted(_sweep(loaded, ds, {"metzen_dynamic": pert}, [2.0, 16.0]).targeted, key=lambda r: r.epsilon)
    assert rows[0].kind == "dynamic" and rows[0].removed < rows[1].removed
    assert rows[1].removed > 0.3 and rows[1].kept > 0.8, (rows[1].removed, rows[1].kept)  # measured 0.49, 0.97


def test_dag_stops_on_pixels_that_have_their_target_and_breaks_more_pixels_with_iterations(setup):
    from mtkit_attacks import dag

    from mtkit.perturbations import AttackContext

    loaded, ds, _ = setup
    x = torch.stack([ds[i]["image"] for i in range(4)])
    y = torch.stack([ds[i]["label"] for i in range(4)]).long()
    ctx = AttackContext(loaded.segmenter, None, torch.Generator(), indices=[0, 1, 2, 3])
    with torch.no_grad():
        pred = loaded.segmenter(x).argmax(1)
    # labels no pixel is predicted as: no pixel is active, so DAG stops at once and leaves the images alone
    assert torch.equal(dag(ctx, x, (pred + 1) % 19, pred, 8.0), x)
    pert = build_perturbation("dag", {"iterations": 2})
    targets = pert.targets(ctx, x, y).labels
    assert ((targets != y) | (y == IGNORE_INDEX)).all()  # every pixel's target differs from its label
    # with more iterations fewer pixels keep their true label (DAG's active set shrinks: 76 % → 74 % measured at
    # γ = 2) and the mIoU falls; few reach their target (under 1 %): a pixel that leaves its label for any other
    # one leaves the active set, and the normalised steps move most pixels far less than ε
    active = []
    for iterations in (2, 40):
        adv = dag(ctx, x, y, targets, 8.0, gamma=2.0, iterations=iterations)
        with torch.no_grad():
            active.append(float((loaded.segmenter(adv).argmax(1) == y).float().mean()))
    assert active[1] < active[0], active
    few = _sweep(loaded, ds, {"dag": build_perturbation("dag", {"iterations": 2, "gamma": 2.0})}, [8.0]).targeted[0]
    many = _sweep(loaded, ds, {"dag": build_perturbation("dag", {"iterations": 40, "gamma": 2.0})},
                  [8.0]).targeted[0]
    # more pixels take their target, and the mIoU does not rise (its fall here is small: most pixels leave
    # their label for some other class after a few steps, when they leave the active set)
    assert few.success <= many.success <= 1 and many.miou <= few.miou + 1e-3, (few, many)


def test_universal_targets_are_cached_and_transfer_better_than_noise(setup, tmp_path, monkeypatch):
    loaded, ds, cfg = setup
    train = {"name": "synthetic", "split": "train", "options": {"domain": "city", "sequences": 2, "frames": 8}}
    options = {"target_dataset": cfg, "target_index": 3, "dataset": train, "epochs": 3, "images": 16,
               "folder": str(tmp_path)}
    first = build_perturbation("metzen_static_uap", options)
    row = _sweep(loaded, ds, {"metzen_static_uap": first}, [16.0]).targeted[0]
    assert len(list(tmp_path.glob("metzen-static-*.pt"))) == 1  # fingerprinted by the model, saved
    again = build_perturbation("metzen_static_uap", options)
    assert _sweep(loaded, ds, {"metzen_static_uap": again}, [16.0]).targeted[0].success == row.success
    # random signs of the same ε on the held-out images hit the target less often
    static = build_perturbation("metzen_static", {"target_dataset": cfg, "target_index": 3})
    from mtkit.perturbations import AttackContext

    ctx = AttackContext(loaded.segmenter, None, torch.Generator())
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    target = static.targets(ctx, x, None).labels
    noise = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 16.0
    with torch.no_grad():
        noisy = loaded.segmenter((x + noise).clamp(0, 255)).argmax(1)
    assert row.success > targeted_rates(targeted_counts(noisy, target, "static"))[0]
    # the dynamic targets of the training images are filled once per image, not in every learning step (the
    # fill is a distance transform on the CPU): 2 epochs over the 16 training images fill 16, and the sweep's
    # batch once
    import mtkit_attacks.metzen as metzen

    filled, real_fill = [], metzen.fill_hidden
    monkeypatch.setattr(metzen, "fill_hidden", lambda pred, hidden: filled.append(pred.shape[0]) or real_fill(
        pred, hidden))
    dyn = build_perturbation("metzen_dynamic_uap", {"hidden_class": 0, "dataset": train, "epochs": 2,
                                                    "images": 16, "folder": str(tmp_path)})
    assert _sweep(loaded, ds, {"metzen_dynamic_uap": dyn}, [16.0]).targeted[0].kind == "dynamic"
    assert sum(filled) == 16 + len(ds), filled


def test_gd_uap_needs_no_data_and_works_with_any_timm_backbone(tmp_path):
    from mtkit_attacks import gd_uap_loss, learn_gd_uap

    from mtkit.core.schema import ModelConfig
    from mtkit.recipe.build import build_model

    torch.manual_seed(0)
    seg = build_model(ModelConfig(backbone="resnet10t", pretrained=False)).segmenter().eval()
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in seg.modules()
             if isinstance(m, torch.nn.Conv2d)]
    try:
        def loss_of(delta):
            acts.clear()
            with torch.no_grad():
                seg((127.5 + delta).clamp(0, 255)[None])
            return float(gd_uap_loss(acts))
        start = torch.zeros(3, 32, 64)
        delta = learn_gd_uap(seg, 8.0, (3, 32, 64), iterations=20)
        assert delta.abs().max() <= 8.0 + 1e-6
        assert loss_of(delta) < loss_of(start)  # the activations grew: no image, no label was used
    finally:
        for h in hooks:
            h.remove()
    pert = build_perturbation("gd_uap", {"iterations": 5, "folder": str(tmp_path)})
    assert not pert.targeted and pert.needs_gradient


def test_targeted_rows_reach_results_report_and_list(setup, tmp_path):
    loaded, _, cfg = setup
    recipe = validate(tiny_recipe(**{
        "robustness.perturbations": ["fgsm", "metzen_static", "dag"], "robustness.epsilons": [4.0],
        "robustness.datasets": ["CS"], "robustness.sanity.enabled": False,
        "robustness.options": {"metzen_static": {"target_dataset": cfg, "target_index": 1},
                               "dag": {"iterations": 3}}}))
    ckpt = tmp_path / "m.pt"
    torch.save(loaded.checkpoint, ckpt)
    res = api.evaluate(recipe, [ckpt], progress=False)
    assert {(r.perturbation, r.kind) for r in res.targeted} == {("metzen_static", "static"), ("dag", "per_pixel")}
    assert {r.perturbation for r in res.robustness} == {"fgsm", "metzen_static", "dag"}  # no worst case of one
    for r in res.targeted:  # the per-image counts behind the report's cluster bootstrap add up to the share
        assert [c[0] for c in r.image_counts] == list(range(res.clean[0].images))
        assert sum(c[1] for c in r.image_counts) / sum(c[2] for c in r.image_counts) == r.success
        assert sum(c[1] for c in r.clean_image_counts) / sum(c[2] for c in r.clean_image_counts) == r.success_clean
    from mtkit.report import save_report

    paths = save_report(res, tmp_path / "out")
    report = paths["report"].read_text()
    assert "## Targeted attacks" in report and "| metzen_static |" in report.replace(" CS | ", " ")
    assert paths["figure_targeted"].stat().st_size > 5000
    options = {e["name"]: e["options"] for e in list_entries("perturbation")}  # what `mtkit list` shows
    assert {"metzen_static", "metzen_dynamic", "metzen_static_uap", "metzen_dynamic_uap", "dag", "gd_uap"} <= set(
        options)
    assert "hidden_class=11" in options["metzen_dynamic"] and "gamma=0.5" in options["dag"]
    assert options["metzen_static_uap"].startswith("dataset,") or ", dataset," in options["metzen_static_uap"]
    with pytest.raises(MtkitError, match="target_dataset"):
        build_perturbation("metzen_static", {})


def test_every_targeted_attack_runs_on_a_torchvision_model_through_the_cli(tmp_path, capsys):
    """The bring-your-own-model path: `mtkit eval --model-factory` with torchvision's DeepLabV3 (untrained, no
    download) and every targeted attack and GD-UAP."""
    import json

    from support import run_cli

    recipe = validate(tiny_recipe(**{"robustness.epsilons": [2.0], "robustness.datasets": ["CS"],
                                     "robustness.sanity.enabled": False}))
    cfg = recipe.data.eval["CS"].model_dump()
    train = {"name": "synthetic", "split": "train", "options": {"domain": "city", "sequences": 2, "frames": 8}}
    options = {"metzen_static": {"target_dataset": cfg, "target_index": 1, "iterations": 1},
               "metzen_dynamic": {"hidden_class": 0, "iterations": 1}, "dag": {"iterations": 1},
               "metzen_static_uap": {"target_dataset": cfg, "dataset": train, "epochs": 1, "images": 4,
                                     "folder": str(tmp_path)},
               "metzen_dynamic_uap": {"dataset": train, "epochs": 1, "images": 4, "folder": str(tmp_path)},
               "gd_uap": {"iterations": 2, "folder": str(tmp_path)}}
    data = recipe.to_dict()
    data["robustness"]["options"] = options
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(data))
    torch.manual_seed(0)
    code, _, err = run_cli(["eval", str(recipe_file), "--model-factory",
                            "torchvision.models.segmentation:deeplabv3_mobilenet_v3_large", "--model-kwargs",
                            json.dumps({"weights": None, "weights_backbone": None, "num_classes": 19}), "--name",
                            "deeplab", "--input-range", "unit", "--mean", "0.485,0.456,0.406", "--std",
                            "0.229,0.224,0.225", "--out", str(tmp_path / "out"), "--no-progress",
                            *[arg for p in options for arg in ("--perturbation", p)]], capsys)
    assert code == 0, err
    res = api.RunResults.read(tmp_path / "out" / "results.json")
    assert {r.perturbation for r in res.robustness} == set(options)
    assert {r.perturbation for r in res.targeted} == set(options) - {"gd_uap"}
    assert all(0 <= r.epsilon_measured <= 2.0 + 1e-3 for r in res.robustness)
    assert np.isfinite([r.success for r in res.targeted]).all()
    assert "## Targeted attacks" in (tmp_path / "out" / "report.md").read_text()
