"""Attack detection by edge consistency (Klingner et al., IROS 2022): the measures, the threshold's false-positive
rate, ROC statistics, the adaptive attack, the detection stage of ``mtkit run`` and a detector from a plugin."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from plugin_utils import make_dist
from support import tiny_recipe, with_plugins_on_path

from mtkit.core.errors import MtkitError
from mtkit.evaluation.robustness import load_model
from mtkit.ops.edge_consistency import (
    consistency_measures,
    edge_consistency_loss,
    edge_maps,
    fit_threshold,
    gaussian_ssim,
    roc_auc,
    roc_points,
)
from mtkit.perturbations.adaptive import image_miou, orthogonal


def _scene(h: int = 24, w: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A perfectly consistent triple: two regions (an L-shaped boundary), each with its own colour, label and
    depth, so that every boundary pixel is an edge of the same relative strength in all three."""
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[:, h // 3:, w // 3:] = 1
    colours = torch.tensor([[30.0, 60, 90], [200, 180, 20]])
    image = colours[labels[0]].permute(2, 0, 1).unsqueeze(0)
    depth = torch.tensor([5.0, 20.0])[labels].unsqueeze(1)
    return image, labels, depth


def test_the_measures_are_one_for_consistent_edges_and_drop_with_an_injected_edge():
    image, labels, depth = _scene()
    assert torch.allclose(consistency_measures(image, labels, depth), torch.ones(1, 3), atol=1e-5)
    marked = image.clone()
    marked[..., 5, 2:10] = 255.0  # an edge in the image that neither the segmentation nor the depth has
    m = consistency_measures(marked, labels, depth)[0]
    assert m[0] < 0.9 and m[1] < 0.9 and m[2] == pytest.approx(1.0, abs=1e-5)  # image-seg, image-depth drop
    stronger = image.clone()
    stronger[..., 5:8, 2:20] = 255.0
    assert (consistency_measures(stronger, labels, depth)[0, :2] < m[:2]).all()  # a longer edge drops them more
    # the differentiable form: 0 for a disparity whose edges sit exactly where the image's do, with the same
    # strength; positive once they disagree
    flat = image.mean(1, keepdim=True) / 255.0
    assert float(edge_consistency_loss(image.mean(1, keepdim=True).expand(1, 3, -1, -1), flat)) < 1e-6
    assert float(edge_consistency_loss(marked, flat)) > 0.01


def test_edge_maps_and_ssim_by_hand():
    t = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 4.0]]]])
    gx, gy = edge_maps(t)
    # |Δx| = [[1, 0], [0, 4]] scaled by its maximum, |Δy| = [[0, 1, 3]] / 3
    assert torch.equal(gx, torch.tensor([[[[0.25, 0.0], [0.0, 1.0]]]]))
    assert torch.allclose(gy, torch.tensor([[[[0.0, 1 / 3, 1.0]]]]))
    ux, _ = edge_maps(torch.tensor([[[[3, 3, 5], [3, 3, 5]]]]), "unequal")
    assert torch.equal(ux, torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
    a = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gaussian_ssim(a, a), torch.ones(2))
    assert torch.allclose(gaussian_ssim(a, a.flip(-1)), gaussian_ssim(a.flip(-1), a))
    assert (gaussian_ssim(a, 1 - a) < 0).all()  # anti-correlated maps


def test_the_threshold_reproduces_the_target_rate_within_its_sampling_error():
    """Fitted on 4,000 clean scores for 5 %, the threshold flags 5 % of another 4,000 within three standard
    errors (√(0.05·0.95/4000) = 0.34 %), for several seeds."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        fit, held_out = rng.normal(size=4000), rng.normal(size=4000)
        t = fit_threshold(fit, 0.05)
        assert (fit > t).mean() <= 0.05
        assert abs((held_out > t).mean() - 0.05) < 3 * math.sqrt(0.05 * 0.95 / 4000)
    with pytest.raises(MtkitError, match="no clean images"):
        fit_threshold(np.array([]), 0.05)


def test_roc_statistics_by_hand():
    clean, attacked = np.array([0.0, 1.0, 2.0]), np.array([1.5, 3.0])
    # pairs (attacked > clean): 1.5 beats 0 and 1, 3 beats all three: 5 of 6
    assert roc_auc(clean, attacked) == pytest.approx(5 / 6)
    assert roc_auc(np.array([1.0]), np.array([1.0])) == pytest.approx(0.5)  # a tie counts half
    fpr, tpr = roc_points(clean, attacked)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert all(a <= b for a, b in zip(fpr, fpr[1:])) and all(a <= b for a, b in zip(tpr, tpr[1:]))
    # the trapezoids under the full curve give the same area
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)


def test_o_pgd_parts_by_hand():
    g = torch.tensor([[[[3.0, 4.0]]]])
    o = torch.tensor([[[[1.0, 0.0]]]])
    assert torch.allclose(orthogonal(g, o), torch.tensor([[[[0.0, 4.0]]]]))  # the component along o removed
    assert float((orthogonal(g, o) * o).sum()) == pytest.approx(0.0)
    labels = torch.tensor([[[0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 0]]])
    # class 0: inter 1, union 2; class 1: inter 1, union 2 (the void pixel left out) → mIoU 0.5
    assert image_miou(pred, labels, 3).tolist() == [0.5]


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """``mtkit run`` of a tiny multi-task model with detection on: FGSM, PGD and the adaptive O-PGD at ε = 16."""
    from mtkit.pipeline.runner import run
    from mtkit.recipe.load import load_recipe

    data = tiny_recipe(**{"train.steps_per_epoch": 30, "train.lr": 1e-3, "robustness.perturbations": ["fgsm"],
                          "robustness.epsilons": [16.0], "robustness.datasets": ["CS"]})
    data["models"] = [data["models"][1]]
    data["data"]["eval"]["CS"]["limit"] = 16
    data["detection"] = {"enabled": True, "perturbations": ["gaussian", "fgsm", "pgd", "opgd"],
                         "epsilons": [4.0, 16.0], "datasets": ["CS"], "fpr": 0.125}  # 8 fitting images: ≥ 7
    data["robustness"]["options"] = {}
    folder = tmp_path_factory.mktemp("detection")
    recipe_file = folder / "det.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    recipe = load_recipe(recipe_file)
    return recipe, run(recipe, progress=False, run_dir=folder / "run", log=lambda m: None)


def test_the_detection_stage_runs_under_the_evaluation_policy_with_sized_passes(detection_run, monkeypatch):
    """The detection stage enters the evaluation's CUDA math policy (IEEE fp32 attack gradients unless
    ``robustness.tf32``), sizes its attack passes as the sweep does (``pass_size``: a 7 ε × 8 images PGD pass at
    1024x512 would ask a GPU for ~50 GB), and predicts each perturbed batch once (the detector's pass gives the
    labels the mIoU counts)."""
    import mtkit.evaluation.detection as det
    from mtkit.evaluation.robustness import load_model

    recipe, res = detection_run
    loaded = load_model(next(res.run_dir.glob("train/multi-*/last.pt")), "cpu")
    seen, passes, segmenter_calls = [], [], []
    real_mode, real_size = det.math_mode, det.pass_size
    monkeypatch.setattr(det, "math_mode", lambda tf32, deterministic=False: seen.append(tf32) or real_mode(tf32))
    monkeypatch.setattr(det, "pass_size", lambda *a, **k: passes.append(real_size(*a, **k)) or passes[-1])
    loaded.segmenter.register_forward_hook(lambda m, inputs, out: segmenter_calls.append(inputs[0].shape[0]))
    rows = det.evaluate_detection(loaded, recipe, ["CS"], 0)
    assert seen == [False] and len(passes) == 1 and passes[0] >= 1
    untimed = lambda rs: [r.model_copy(update={"seconds": 0.0}) for r in rs]  # noqa: E731
    assert untimed(rows) == untimed(r for r in res.results.detection if r.dataset == "CS")  # the stage's rows
    # the segmenter runs only inside the attacks (their gradients), never to predict a perturbed batch again:
    # with noise alone it runs only for the pass sizing (one image)
    segmenter_calls.clear()
    noise_only = recipe.model_copy(update={"detection": recipe.detection.model_copy(
        update={"perturbations": ["gaussian"]})})
    assert det.evaluate_detection(loaded, noise_only, ["CS"], 0) and segmenter_calls == [1]


def test_the_detection_stage_writes_rows_tables_and_plots_and_is_cached(detection_run):
    from mtkit.core.results import RunResults
    from mtkit.pipeline.runner import run

    recipe, res = detection_run
    rows = res.results.detection
    assert {(r.perturbation, r.epsilon) for r in rows} == {(p, e) for p in ("gaussian", "fgsm", "pgd", "opgd")
                                                          for e in (4.0, 16.0)}
    assert all(r.images == 8 and r.fit_images == 8 and 0 <= r.auc <= 1 and r.roc[0] == (0.0, 0.0) for r in rows)
    saved = RunResults.read(res.run_dir / "results.json")
    assert saved.detection == rows
    report = (res.run_dir / "report.md").read_text()
    assert "## Detecting attacks" in report and "| opgd |" in report and "one seed" in report
    for png in ("figure_detection.png", "figure_roc.png"):
        assert (res.run_dir / png).stat().st_size > 5000
    again = run(recipe, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert "detect attacks multi seed 0 on CS" in again.stages_cached and again.results.detection == rows


def test_fgsm_is_detected_far_more_often_than_clean_images(detection_run):
    """On the trained tiny model FGSM at ε = 16 is flagged far more often than the held-out clean images: the
    detector separates them (AUC). The false-positive rate of 8 held-out images is a coarse estimate (one image
    is 12.5 points; the tiny model trains differently on AVX2 and AVX-512 CPUs, and the threshold's rank on 8
    fitted images is not a 5 % rate): it is only held below the detection rate here, and the threshold's rate is
    tested on its own (``test_the_threshold_reproduces_the_target_rate_within_its_sampling_error``)."""
    _, res = detection_run
    fgsm = next(r for r in res.results.detection if r.perturbation == "fgsm" and r.epsilon == 16.0)
    # measured on an AVX2 CPU (AMD EPYC, 2026-12-03): 5 of 8 flagged, 1 of 8 clean, AUC 0.797 (chance: 0.5); the
    # AVX-512 machine's model passed ≥ 6 of 8 and AUC ≥ 0.8
    assert fgsm.detection_rate >= 0.5 and fgsm.detection_rate > fgsm.fpr and fgsm.auc >= 0.75


def test_the_adaptive_attack_evades_the_detector_better_than_pgd_at_the_same_budget(detection_run):
    """O-PGD keeps the edges consistent while it attacks: descending the detector's score from the first step
    (success_miou 1: every image counts as broken), at the same ε, iterations and step as PGD, its images get a
    lower detector score than PGD's, image by image (measured −0.093 / −0.119 against −0.076 / −0.065 at ε = 4 /
    16); and it still lowers the mIoU."""
    from mtkit.ops.edge_consistency import EdgeConsistency
    from mtkit.perturbations import AttackContext
    from mtkit.recipe.build import build_perturbations
    from mtkit.recipe.prepare import prepared_dataset

    recipe, res = detection_run
    rows = {(r.perturbation, r.epsilon): r for r in res.results.detection}
    clean = next(c.miou for c in res.results.clean if c.model == "multi" and c.dataset == "CS")
    assert rows[("opgd", 16.0)].miou_attacked < clean
    loaded = load_model(next((res.run_dir / "train").glob("multi-*/last.pt")))
    ds = prepared_dataset(recipe, "data.eval.CS", progress=False)
    idx = list(range(1, len(ds), 2))
    x = torch.stack([ds[i]["image"] for i in idx])
    y = torch.stack([ds[i]["label"] for i in idx]).long()
    detector, model = EdgeConsistency(), loaded.model.eval()
    perts = build_perturbations(["pgd", "opgd"], {"opgd": {"success_miou": 1.0}})
    scores = {}
    for name, pert in perts.items():
        ctx = AttackContext(loaded.segmenter.eval(), loaded.class_weights, torch.Generator(), 0, idx,
                            multitask=model, detector=detector)
        for e, adv in pert.sweep(ctx, x, y, [4.0, 16.0]).items():
            scores[(name, e)] = detector.score(detector.measures(model, adv.detach()))
    for e in (16.0, 4.0):
        lower = scores[("opgd", e)] < scores[("pgd", e)]
        assert scores[("opgd", e)].mean() < scores[("pgd", e)].mean() and lower.float().mean() >= 0.75, \
            (e, scores[("opgd", e)], scores[("pgd", e)])


def test_o_pgd_runs_in_the_robustness_sweep_with_the_worst_case_and_the_checks(detection_run):
    from mtkit.evaluation.sweep import robustness_sweep
    from mtkit.recipe.build import build_perturbations
    from mtkit.recipe.prepare import prepared_dataset

    recipe, res = detection_run
    loaded = load_model(next((res.run_dir / "train").glob("multi-*/last.pt")))
    ds = prepared_dataset(recipe, "data.eval.CS", progress=False)
    perts = build_perturbations(["fgsm", "opgd"], {})
    sweep = robustness_sweep(loaded.segmenter, ds, perts, [4.0], 19, loaded.class_weights, batch_size=8,
                             sanity=recipe.robustness.sanity, multitask=loaded.model)
    names = {r.perturbation for r in sweep.rows}
    assert names == {"fgsm", "opgd", "worst_case"} and sweep.unbounded is not None
    opgd_row = next(r for r in sweep.rows if r.perturbation == "opgd")
    assert opgd_row.backward_passes_per_batch == 2 * 5  # two gradients per iteration, 5 iterations at ε = 4: counted
    worst = next(r for r in sweep.rows if r.perturbation == "worst_case")
    assert worst.miou <= min(r.miou for r in sweep.rows if r.perturbation != "worst_case") + 1e-9


def test_the_adaptive_attack_attacks_the_stage_s_own_detector(detection_run, monkeypatch):
    """The detection stage hands its detector (with the recipe's measures) to O-PGD through AttackContext.detector,
    and O-PGD differentiates that detector's score; too few fitting images for the rate are refused before any
    attack runs."""
    from mtkit.evaluation.detection import evaluate_detection
    from mtkit.ops.edge_consistency import EdgeConsistency
    from mtkit.recipe.load import validate

    recipe, res = detection_run
    seen = []
    original = EdgeConsistency.differentiable_score

    def spy(self, model, images):
        seen.append(tuple(self.options.measures))
        return original(self, model, images)
    monkeypatch.setattr(EdgeConsistency, "differentiable_score", spy)
    data = json.loads(json.dumps(recipe.to_dict()))
    data["detection"].update(options={"measures": ["image-depth"]}, perturbations=["opgd"], epsilons=[4.0])
    loaded = load_model(next((res.run_dir / "train").glob("multi-*/last.pt")))
    rows = evaluate_detection(loaded, validate(data), ["CS"], 0)
    assert [r.perturbation for r in rows] == ["opgd"] and seen and set(seen) == {("image-depth",)}
    data["detection"]["fpr"] = 0.05
    seen.clear()
    with pytest.raises(MtkitError, match="8 clean fitting image.*at least 19"):
        evaluate_detection(loaded, validate(data), ["CS"], 0)
    assert not seen


def test_a_single_task_model_gets_a_clear_error(detection_run, trained):
    from mtkit.evaluation.detection import evaluate_detection

    recipe, _ = detection_run
    with pytest.raises(MtkitError, match="has no depth head.*multi-task model"):
        evaluate_detection(trained[0], recipe, ["CS"], 0)


PLUGIN = """
import torch
from mtkit.plugin_api import Detector, DetectorOptions, Field, consistency_measures, hookimpl


class Options(DetectorOptions):
    weight: float = Field(1.0, gt=0)


class DepthOnly(Detector):
    '''Flags images whose image and depth edges disagree (the image-depth measure alone), scaled by weight.'''

    Options = Options
    measure_names = ("image-depth",)

    def measures(self, model, images):
        with torch.no_grad():
            logits, depth = model.predict(images)
        return consistency_measures(images, logits.argmax(1), depth)[:, 1:2]

    def score(self, measures):
        return -self.options.weight * measures[:, 0]


@hookimpl
def mtkit_register(registry):
    registry.add("detector", "depth_only", DepthOnly)
"""


def test_a_plugin_registers_a_detector_through_the_plugin_api(detection_run, tmp_path, monkeypatch):
    from mtkit.evaluation.detection import evaluate_detection
    from mtkit.plugins.manager import list_entries
    from mtkit.recipe.load import validate

    recipe, res = detection_run
    with_plugins_on_path(make_dist(tmp_path / "site", "mtkit-depth-only", "0.1", "mtkit_depth_only", PLUGIN),
                         monkeypatch)
    assert any(e["name"] == "depth_only" and e["kind"] == "detector" for e in list_entries("detector"))
    data = json.loads(json.dumps(recipe.to_dict()))
    data["detection"].update(detector="depth_only", options={"weight": 2.0}, perturbations=["fgsm"],
                             epsilons=[16.0])
    loaded = load_model(next((res.run_dir / "train").glob("multi-*/last.pt")))
    rows = evaluate_detection(loaded, validate(data), ["CS"], 0)
    assert [(r.detector, r.perturbation) for r in rows] == [("depth_only", "fgsm")]
    data["detection"]["options"] = {"weight": -1}
    with pytest.raises(MtkitError, match="detection.options.weight"):
        validate(data)
