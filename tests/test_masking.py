"""Gradient-masking sanity checks (``mtkit.evaluation.masking``): each check passes on a normal model and fails
on models built to mask their gradient, and a failure reaches the report's verdict and its table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtkit.core.results import ModelInfo, RunResults
from mtkit.core.schema import SanityConfig
from mtkit.evaluation.masking import masking_checks
from mtkit.evaluation.sweep import robustness_sweep
from mtkit.recipe.build import build_perturbations
from mtkit.report import write_report

EPS = [1.0, 4.0, 16.0]
CHECKS = {"monotone", "iterative_vs_fgsm", "unbounded", "attack_vs_noise", "input_dependent"}


class ReversedQuantizer(torch.autograd.Function):
    """Rounds the input to 32 gray levels; its backward pass is a wrong straight-through estimate that points the
    wrong way (a masked gradient: attacks that follow it lower the loss)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x / 8) * 8

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Masked(nn.Module):
    def __init__(self, segmenter: nn.Module, mode: str) -> None:
        super().__init__()
        self.segmenter, self.mode = segmenter, mode

    def forward(self, x):
        if self.mode == "reversed":
            return self.segmenter(ReversedQuantizer.apply(x))
        if self.mode == "round":  # torch.round: a zero gradient everywhere
            return self.segmenter(torch.round(x / 8) * 8)
        if self.mode == "ignores":  # the input drowned (as by wrong batch-norm statistics): a gradient, no effect
            return self.segmenter(x * 1e-6 + 128)
        return self.segmenter(x)


@pytest.fixture(scope="module")
def sweeps(trained):
    loaded, ds, _, _ = trained
    perts = build_perturbations(["gaussian", "fgsm", "pgd"], {})
    config = SanityConfig(iterations=3)
    out = {}
    for mode in ("normal", "reversed", "round", "ignores"):
        sweep = robustness_sweep(Masked(loaded.segmenter, mode), ds, perts, EPS, 19, loaded.class_weights,
                                 batch_size=4, model_name=mode, dataset_name="CS", sanity=config)
        out[mode] = (sweep, {c.check: c for c in masking_checks(sweep, config)})
    return out


def test_every_check_passes_on_a_normal_model(sweeps):
    sweep, checks = sweeps["normal"]
    assert set(checks) == CHECKS
    assert all(c.passed for c in checks.values()), {c.check: c.detail for c in checks.values()}
    assert sweep.unbounded.miou < 0.05 < sweep.clean.miou
    assert "unbounded" not in {r.perturbation for r in sweep.rows}  # the check's attack is not a sweep row


def test_every_check_fails_on_a_model_whose_gradient_points_the_wrong_way(sweeps):
    _, checks = sweeps["reversed"]
    masking = {k: c for k, c in checks.items() if k != "input_dependent"}  # its predictions do follow the input
    assert all(c.passed is False for c in masking.values()), {c.check: c.detail for c in checks.values()}
    assert checks["input_dependent"].passed
    assert "from ε" in checks["monotone"].detail and "> fgsm" in checks["iterative_vs_fgsm"].detail
    assert "> gaussian" in checks["attack_vs_noise"].detail


def test_a_zero_gradient_does_not_move_the_unbounded_attack(sweeps):
    sweep, checks = sweeps["round"]
    assert checks["unbounded"].passed is False
    assert sweep.unbounded.miou == pytest.approx(sweep.clean.miou)  # torch.sign(0) = 0: the image never moved


def test_checks_without_rows_to_compare_are_not_applicable(sweeps):
    sweep, _ = sweeps["normal"]
    only_pgd = type(sweep)(sweep.clean, [r for r in sweep.rows if r.perturbation == "pgd"], sweep.images, None)
    checks = {c.check: c for c in masking_checks(only_pgd, SanityConfig())}
    assert checks["monotone"].passed is True
    assert checks["iterative_vs_fgsm"].passed is None and checks["attack_vs_noise"].passed is None
    assert checks["unbounded"].passed is None
    loose = {c.check: c for c in masking_checks(sweeps["reversed"][0], SanityConfig(tolerance=100, near_zero=100))}
    assert all(c.passed for c in loose.values())  # the thresholds are the config's
    # an attack that is not iterative (a universal perturbation) is not held to FGSM's strength
    universal = {c.check: c for c in masking_checks(sweeps["reversed"][0], SanityConfig(), iterative=set())}
    assert universal["iterative_vs_fgsm"].passed is None and universal["attack_vs_noise"].passed is False


def test_a_failed_check_is_flagged_in_the_verdict_and_tabled(sweeps, tmp_path):
    res = RunResults(seeds=[0], models={m: ModelInfo(tasks=["segmentation"], lam=0.0) for m in ("normal", "reversed")})
    for mode in ("normal", "reversed"):
        sweep, checks = sweeps[mode]
        res.clean.append(sweep.clean)
        res.robustness += sweep.rows
        res.sanity += checks.values()
    report = write_report(res, tmp_path)["report"].read_text()
    verdict = report.split("## Verdict")[1].split("## Results")[0]
    assert "Warning: reversed (single-task) failed gradient-masking checks" in verdict
    assert "normal (single-task) failed" not in verdict
    table = report.split("### Gradient-masking sanity checks")[1]
    assert "| normal (single-task) on CS | pass | pass | pass | pass | pass |" in table
    assert table.count("**FAIL** (1/1 seeds)") == 4
    again = RunResults.read(tmp_path / "results.json")
    assert [c.passed for c in again.sanity] == [c.passed for c in res.sanity]


def test_the_paper_recipe_checks_with_an_attack_of_known_strength():
    """The paper's protocol runs the unbounded check as AutoAttack runs APGD-CE (100 iterations); the synthetic
    recipes keep 10 and the quickstart 5 to stay within their minutes, and say so."""
    from support import ROOT

    from mtkit.recipe.load import load_recipe

    assert load_recipe(ROOT / "recipes" / "paper.yaml").robustness.sanity.iterations == 100
    for name, iterations in (("synthetic.yaml", 10), ("quickstart.yaml", 5)):
        assert load_recipe(ROOT / "recipes" / name).robustness.sanity.iterations == iterations
        assert "100, AutoAttack's strength" in (ROOT / "recipes" / name).read_text()


def test_a_model_that_ignores_its_input_is_flagged_first_in_the_verdict(sweeps, tmp_path):
    sweep, checks = sweeps["ignores"]
    assert all(r.q == pytest.approx(1.0, abs=1e-3) and r.changed < 1e-3 for r in sweep.rows)  # "robust" at any ε
    assert checks["input_dependent"].passed is False and "do not depend on the input" in \
        checks["input_dependent"].detail
    normal = sweeps["normal"][0]
    assert max(r.changed for r in normal.rows if r.level == 16.0) > 0.05  # a real model: many labels change
    res = RunResults(seeds=[0], models={m: ModelInfo(tasks=["segmentation"], lam=0.0) for m in ("normal", "ignores")})
    for mode in ("normal", "ignores"):
        res.clean.append(sweeps[mode][0].clean)
        res.robustness += sweeps[mode][0].rows
        res.sanity += sweeps[mode][1].values()
    verdict = write_report(res, tmp_path)["report"].read_text().split("## Verdict")[1].split("## Results")[0]
    assert verdict.lstrip().startswith("**Warning: ignores (single-task) is input-independent: at ε 16")
    assert "normal (single-task) is input-independent" not in verdict
    # the unbounded check alone failing is worded as the heuristic it is, with its threshold
    assert "heuristic's threshold, robustness.sanity.near_zero" in sweeps["round"][1]["unbounded"].detail
