"""Claims with their statistics: t-intervals over seeds, paired differences, verdict wording that follows the
interval, absolute mIoU beside Q, and PGD restarts."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_recipe

from mtkit.core.errors import MtkitError
from mtkit.core.results import CleanRow, ModelInfo, ResultRow, RunResults, Spread
from mtkit.perturbations import AttackContext, strongest
from mtkit.recipe.build import build_perturbation
from mtkit.recipe.load import validate
from mtkit.report import markdown_tables, verdict
from mtkit.report.stats import holm, paired_difference, t_interval


def test_t_interval_equals_a_hand_computation():
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd = sqrt(5/3) = 1.290994, t_{0.975, 3} = 3.182446 → half width 3.182446 * 1.290994 / 2 = 2.054260
    assert iv.mean == 2.5 and iv.sd == pytest.approx(1.290994, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    one = t_interval([7.0])
    assert one.n == 1 and math.isnan(one.low) and not one.resolved
    # the t-test of mean = 0: t = 2.5 / (1.290994 / 2) = 3.872983 on 3 degrees of freedom
    assert iv.p == pytest.approx(0.030466, abs=1e-6) and math.isnan(one.p)
    for values in ([1.0, 2.0, 3.0, 4.0], [-1.0, -1.2, -0.5], [0.3, -0.2, 0.5], [1.0, 1.1, 0.9, 1.0]):
        test = t_interval(values)
        assert (test.p < 0.05) == test.resolved, values  # the p-value and the 95 % interval agree


def test_holm_equals_a_hand_computation():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 · 0.01 = 0.03, 2 · 0.03 = 0.06, max(0.06, 1 · 0.04) = 0.06; NaN untested
    assert holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, 0.04, 0.03, math.nan])[3])
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)] and holm([]) == []


def test_the_paired_difference_pairs_by_seed():
    # differences over the shared seeds 0-2: 1, 2, 1 → mean 4/3, sd 0.57735, t_{0.975, 2} = 4.302653
    iv = paired_difference({0: 5.0, 1: 7.0, 2: 6.0}, {0: 4.0, 1: 5.0, 2: 5.0, 3: 100.0})
    assert iv.n == 3 and iv.mean == pytest.approx(4 / 3)
    assert (iv.low, iv.high) == pytest.approx((4 / 3 - 1.434218, 4 / 3 + 1.434218), abs=1e-5)
    assert not iv.resolved  # the interval includes zero
    assert paired_difference({0: 5.0, 1: 6.0, 2: 7.0}, {0: 3.0, 1: 4.1, 2: 4.9}).resolved


def _results(single: dict[int, float], multi: dict[int, float]) -> RunResults:
    """mIoU under FGSM at ε = 4 per seed (clean mIoU 0.6 for both)."""
    res = RunResults(seeds=sorted(single), models={"single": ModelInfo(tasks=["segmentation"], lam=1.0),
                                                   "multi": ModelInfo(tasks=["segmentation", "depth"], lam=0.1)})
    for model, values in (("single", single), ("multi", multi)):
        for seed, m in values.items():
            res.clean.append(CleanRow(model=model, seed=seed, dataset="CS", miou=0.6, images=32))
            res.robustness.append(ResultRow(
                model=model, seed=seed, dataset="CS", perturbation="fgsm", level_kind="epsilon", level=4.0,
                epsilon=4.0, epsilon_measured=4.0, epsilon_measured_per_image=Spread(min=4, max=4, mean=4, sd=0),
                miou=m, miou_clean=0.6, q=m / 0.6, per_class_iou=[], seconds_sweep=0.0,
                backward_passes_per_batch=1.0))
    return res


def test_the_verdict_follows_the_interval():
    one = "\n".join(verdict(_results({0: 0.30}, {0: 0.40})))
    assert "one seed, so no claim of significance is possible" in one and "32 images, 1 seed" in one
    assert "mIoU under attack higher in 1 of 1 (dataset" in one  # the single measurement: 0.40 > 0.30
    lower = "\n".join(verdict(_results({0: 0.40}, {0: 0.30})))
    assert "mIoU under attack higher in 0 of 1 (dataset" in lower
    clear = "\n".join(verdict(_results({0: 0.30, 1: 0.31, 2: 0.29}, {0: 0.40, 1: 0.42, 2: 0.41})))
    assert "over 3 seeds" in clear and ": more robust.**" in clear and "higher in 1, lower in 0" in clear
    noisy = "\n".join(verdict(_results({0: 0.30, 1: 0.45, 2: 0.29}, {0: 0.40, 1: 0.31, 2: 0.41})))
    assert ": not resolved.**" in noisy and "3 seeds cannot tell its sign" in noisy


def _sweep(clean: dict[str, dict[int, float]], attacked: dict[str, dict[int, dict[float, float]]]) -> RunResults:
    """Clean mIoU per (model, seed) and the mIoU under FGSM per (model, seed, ε)."""
    seeds = sorted(clean["single"])
    res = RunResults(seeds=seeds, models={"single": ModelInfo(tasks=["segmentation"], lam=1.0),
                                          "multi": ModelInfo(tasks=["segmentation", "depth"], lam=0.1)})
    for model in ("single", "multi"):
        for seed in seeds:
            c = clean[model][seed]
            res.clean.append(CleanRow(model=model, seed=seed, dataset="CS", miou=c, images=32))
            for eps, m in attacked[model][seed].items():
                res.robustness.append(ResultRow(
                    model=model, seed=seed, dataset="CS", perturbation="fgsm", level_kind="epsilon", level=eps,
                    epsilon=eps, epsilon_measured=eps, epsilon_measured_per_image=Spread(min=eps, max=eps, mean=eps,
                                                                                          sd=0),
                    miou=m, miou_clean=c, q=m / c, per_class_iou=[], seconds_sweep=0.0, backward_passes_per_batch=1.0))
    return res


def test_the_verdict_controls_the_error_over_the_family_of_cells():
    """Ten ε cells, each lower by -1.0, -1.2, -0.5 pt over 3 seeds (p = 0.0496 each: every 95 % interval excludes
    zero): one test per cell called all ten "lower" and the model "less robust"; Holm over the cells and the
    declared primary endpoint resolve none of them."""
    eps = [float(e) for e in range(1, 11)]
    single = {seed: {e: 0.30 for e in eps} for seed in range(3)}
    multi = {seed: {e: 0.30 + d / 100 for e in eps} for seed, d in enumerate([-1.0, -1.2, -0.5])}
    clean = {"single": {0: 0.6, 1: 0.6, 2: 0.6}, "multi": {0: 0.6, 1: 0.6, 2: 0.6}}
    text = "\n".join(verdict(_sweep(clean, {"single": single, "multi": multi})))
    assert ": not resolved.**" in text and "less robust" not in text
    assert "lower in 0, not resolved in 10" in text and "Holm-adjusted over the 2 primary tests" in text
    assert "mIoU under attack averaged over the 10 (perturbation, ε) cells" in text


def test_the_verdict_tells_lower_accuracy_from_lower_robustness():
    """The multi-task model loses clean mIoU and, in proportion, mIoU under attack: Q is unchanged, so the verdict
    says the loss follows the clean accuracy instead of "less robust"."""
    clean = {"single": {0: 0.60, 1: 0.62, 2: 0.58}, "multi": {0: 0.50, 1: 0.52, 2: 0.48}}
    attacked = {model: {seed: {4.0: c / 2 + (0.001 * seed if model == "multi" else 0)} for seed, c in cs.items()}
                for model, cs in clean.items()}
    text = "\n".join(verdict(_sweep(clean, attacked)))
    assert "lower mIoU under attack, but not resolved as less robust" in text and "follows the clean accuracy" in text


def test_tables_show_absolute_miou_beside_q_with_intervals():
    md = markdown_tables(_results({0: 0.30, 1: 0.31, 2: 0.29}, {0: 0.40, 1: 0.42, 2: 0.41}))
    assert "| mIoU (multi (λ=0.1)) | 41.0 ± 1.0 [38.5, 43.5] |" in md
    assert "| Q (multi (λ=0.1)) | 68.3 ± 1.7 [64.2, 72.5] |" in md  # 68.33 ± 4.302653 · 1.6667 / √3


def test_pgd_restarts_keep_the_strongest_example_and_bad_options_fail_at_load(trained):
    loaded, _, x, y = trained
    ctx = AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator().manual_seed(0))
    a, b = x.clone(), (x + 40).clamp(0, 255)
    best = strongest(ctx, [a, b], y)
    for i in range(len(x)):
        with torch.no_grad():
            losses = [float(ctx.objective(loaded.segmenter(c[i:i + 1]), y[i:i + 1])) for c in (a, b)]
        assert torch.equal(best[i], (a, b)[losses.index(max(losses))][i])
    adv = build_perturbation("pgd", {"iterations": 2, "restarts": 3}).sweep(ctx, x, y, [4.0])[4.0]
    assert (adv - x).abs().max() <= 4.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
    for options, match in (({"restarts": 0}, "restarts"), ({"step": -1}, "step")):
        with pytest.raises(MtkitError, match=match):
            validate(tiny_recipe(**{"robustness.options": {"pgd": options}}))
    with pytest.raises(MtkitError, match="no_such_loss"):
        validate(tiny_recipe(**{"loss.segmentation": "no_such_loss"}))


def test_exact_binomial_intervals_by_hand():
    """Clopper–Pearson from the beta quantiles: 3 of 72 gives [0.87, 11.70] % (scipy's binomtest agrees), where a
    t-interval over 3 per-seed rates went below zero; 0 of n starts at 0 and n of n ends at 1; the cell pools
    the seeds' counts."""
    from scipy.stats import binomtest

    from mtkit.report.stats import exact_interval, rate_cell

    low, high = exact_interval(3, 72)
    ci = binomtest(3, 72).proportion_ci(confidence_level=0.95, method="exact")
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert round(100 * low, 1) == 0.9 and round(100 * high, 1) == 11.7
    assert exact_interval(0, 24)[0] == 0.0 and exact_interval(24, 24)[1] == 1.0
    assert exact_interval(0, 24)[1] == pytest.approx(1 - 0.025 ** (1 / 24))  # (α/2)^(1/n) by hand
    assert rate_cell([(1, 24), (2, 24), (0, 24)]) == "4.2 [0.9, 11.7] (3/72)"
    assert rate_cell([]) == "–"


def test_bounded_intervals_are_clipped_to_their_range():
    iv = t_interval([1.0, 2.0, 12.0])  # an mIoU near 0: the unclipped t-interval goes below 0
    assert iv.low < 0
    clipped = t_interval([1.0, 2.0, 12.0], bounds=(0.0, 100.0))
    assert (clipped.low, clipped.high) == (0.0, iv.high)
    from mtkit.report.sections import percent_cell

    assert percent_cell([0.99, 1.0, 0.9]).endswith(", 100.0]")  # a share near 100 %


def test_the_cluster_bootstrap_resamples_images_not_pixels():
    import numpy as np

    from mtkit.report.stats import cluster_bootstrap, exact_interval, share_cell

    clusters = [(90, 100), (10, 100), (55, 100), (0, 50), (50, 50)]
    low, high = cluster_bootstrap(clusters, resamples=500, seed=3)
    # by hand: the same draws of images, the pooled share of each draw, its 2.5 and 97.5 % quantiles
    rng = np.random.default_rng(3)
    shares = []
    for draw in rng.integers(0, 5, size=(500, 5)):
        shares.append(sum(clusters[i][0] for i in draw) / sum(clusters[i][1] for i in draw))
    assert (low, high) == pytest.approx((np.quantile(shares, 0.025), np.quantile(shares, 0.975)))
    # images that disagree make the interval far wider than a binomial one over their 400 pixels
    cp = exact_interval(205, 400)
    assert high - low > 3 * (cp[1] - cp[0])
    assert cluster_bootstrap([(3, 10), (30, 100)]) == pytest.approx((0.3, 0.3))  # equal shares: no spread
    assert share_cell([(5, 10)]) == "50.0" and share_cell([(0, 0)]) == "–"


def test_the_paper_recipe_puts_the_papers_values_beside_ours(tmp_path):
    from mtkit.report import write_report
    from mtkit.report.paper import PAPER_EPS

    models = {"single": ModelInfo(tasks=["segmentation"], lam=1.0),
              "multi-0.1": ModelInfo(tasks=["segmentation", "depth"], lam=0.1),
              "multi-0.2": ModelInfo(tasks=["segmentation", "depth"], lam=0.2)}
    res = RunResults(recipe_name="paper", seeds=[0], models=models)
    clean = {"single": 0.6, "multi-0.1": 0.70, "multi-0.2": 0.68}
    for m, v in clean.items():
        for d in ("CS", "K"):
            res.clean.append(CleanRow(model=m, seed=0, dataset=d, miou=v if d == "CS" else v - 0.2))
            for p in ("gaussian", "fgsm"):
                for e in PAPER_EPS:
                    adv = v * (1 - e / 32)
                    res.robustness.append(ResultRow(
                        model=m, seed=0, dataset=d, perturbation=p, level_kind="epsilon", level=e, epsilon=e,
                        epsilon_measured=e, epsilon_measured_per_image=Spread(min=e, max=e, mean=e, sd=0.0),
                        miou=adv, miou_clean=v, q=adv / v, per_class_iou=[], attack=p == "fgsm"))
    paths = write_report(res, tmp_path)
    report = paths["report"].read_text()
    section = report.split("## Paper vs ours")[1]
    # Table 2: ours 70.0 on CS beside the paper's 67.4 for λ = 0.1, 50.0 on K beside 49.6
    assert "| multi-0.1 (λ=0.1) | 67.4 | 70.0 (+2.6) | 49.6 | 50.0 (+0.4) |" in section
    assert "| single (single-task) | 63.5 | 60.0 (−3.5) |".replace("−", "-") in section
    # Tables 3 and 4: Q at ε = 16 is 50 % for every model here; the paper's FGSM single-task is 2.4
    fgsm = section.split("Table 4")[1]
    assert "| single-task: paper | 63.8 |" in fgsm and "50.0 (+47.6) |" in fgsm
    assert paths["figure4"].stat().st_size > 5000  # Figure 4: mIoU over the two λ
    res.recipe_name = "quickstart"
    assert "Paper vs ours" not in write_report(res, tmp_path)["report"].read_text()
