"""The report's verdict: the warnings of failed gradient-masking checks, then per model the claims the seeds
support, tested against the single-task baseline on the primary endpoints with Holm's correction."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..core.results import SANITY_CHECKS, WORST_CASE, RunResults
from .sections import as_percent, model_label, result_axes
from .stats import LEVEL, holm, paired_difference


def sanity_warnings(results: RunResults) -> list[str]:
    """The verdict's first lines: each model whose predictions do not depend on its input (first: its Q means
    nothing), then each model whose gradient-masking checks failed (its numbers under attack may overstate
    robustness); a failure of the unbounded check alone is worded as the heuristic it is."""
    lines = []
    for m in results.models:
        ignores = [r for r in results.sanity if r.model == m and r.check == "input_dependent" and r.passed is False]
        if ignores:
            lines.append(f"**Warning: {model_label(results, m)} is input-independent: {ignores[0].detail} "
                         f"({ignores[0].dataset}).** Its Q near 100 % is no robustness: check its weights, its "
                         "batch-norm statistics (eval mode) and the input it expects.")
    for m in results.models:
        failed = [r for r in results.sanity if r.model == m and r.passed is False and r.check != "input_dependent"]
        if failed and all(r.check == "unbounded" for r in failed):
            lines.append(f"**Note: {model_label(results, m)} failed the unbounded-attack heuristic "
                         f"({', '.join(dict.fromkeys(r.dataset for r in failed))}): {failed[0].detail}.** The other "
                         "gradient-masking checks passed.")
        elif failed:
            names = ", ".join(dict.fromkeys(f"{SANITY_CHECKS.get(r.check, r.check)} ({r.dataset})"
                                            for r in failed))
            lines.append(f"**Warning: {model_label(results, m)} failed gradient-masking checks: {names}.** Its "
                         "numbers under attack may overstate its robustness (see the sanity checks below).")
    return lines


def verdict(results: RunResults) -> list[str]:
    """Plain sentences on whether each multi-task model was more robust than the single-task one, paired by seed.

    The rule, declared before looking at the cells: a **primary endpoint** per dataset, the worst-case mIoU under
    attack averaged over ε (the ``worst_case`` rows; without them, the mIoU under attack averaged over every
    (perturbation, ε) cell), and the same average of Q, each a paired t-test of multi − single over the seeds;
    Holm's adjustment over these 2 × datasets tests keeps the family-wise error at 5 %. The word follows Q (the
    share of clean mIoU kept: robustness); a lower mIoU under attack with Q not resolved is said to follow the
    clean accuracy, not a loss of robustness. The (dataset, perturbation, ε) cells are secondary, counted after
    Holm's adjustment over all cells. With one seed no claim of significance is made. Each claim names the seeds
    and images behind it."""
    models, datasets, perts, eps = result_axes(results)
    singles = [m for m in models if "depth" not in results.models[m].tasks and not results.models[m].factory]
    multis = [m for m in models if "depth" in results.models[m].tasks]
    warnings = sanity_warnings(results)
    if not singles or not multis:
        return [*warnings, "The run has no single-task/multi-task pair to compare."]
    s = singles[0]
    images = {r.dataset: r.images for r in results.clean if r.images}
    by = {"clean": _by_seed(results.clean, lambda r: (r.model, r.dataset), lambda r: r.miou)}
    by["miou"] = _by_seed(results.robustness, lambda r: (r.model, r.dataset, r.perturbation, r.level),
                          lambda r: r.miou)
    by["q"] = _by_seed(results.robustness, lambda r: (r.model, r.dataset, r.perturbation, r.level), lambda r: r.q)
    worst = sorted({r.level for r in results.robustness if r.perturbation == WORST_CASE and r.is_epsilon})
    endpoint_cells = [(WORST_CASE, e) for e in worst] or [(p, e) for p in perts for e in eps]
    endpoint_name = ("worst-case mIoU averaged over ε" if worst else
                     f"mIoU under attack averaged over the {len(endpoint_cells)} (perturbation, ε) cells")
    lines = []
    for m in multis:
        n = len(set(by["clean"].get((m, datasets[0]), {})) & set(by["clean"].get((s, datasets[0]), {}))) \
            if datasets else 0
        cells = {k: {(d, p, e): paired_difference(by[k].get((m, d, p, e), {}), by[k].get((s, d, p, e), {}))
                     for d in datasets for p in perts for e in eps} for k in ("miou", "q")}
        cells = {k: {c: iv for c, iv in ivs.items() if iv.n} for k, ivs in cells.items()}
        details = []
        for d in datasets:
            clean = paired_difference(by["clean"].get((m, d), {}), by["clean"].get((s, d), {}))
            parts = [f"{p}: mIoU " + ", ".join(cells["miou"][(d, p, e)].text(" pt") for e in eps
                                                if (d, p, e) in cells["miou"])
                     + "; Q " + ", ".join(cells["q"][(d, p, e)].text(" pt") for e in eps if (d, p, e) in cells["q"])
                     for p in perts]
            details.append(f"- **{d}** ({images.get(d, '?')} images, {n} seed{'s' if n != 1 else ''}): clean mIoU "
                           f"{clean.text(' pt')} (multi − single); under attack, per ε {eps}: " + " | ".join(parts))
        label = model_label(results, m)
        if n < 2:
            higher = sum(iv.mean > 0 for iv in cells["miou"].values())
            head = (f"**{label} vs the single-task model: one seed, so no claim of significance is possible.** "
                    f"Single measurements: mIoU under attack higher in {higher} of {len(cells['miou'])} (dataset, "
                    "perturbation, ε) cells; judging them needs several seeds (`--seeds 0,1,2,3,4`; for the "
                    "quickstart's comparison, `mtkit run recipes/quickstart-seeds.yaml` runs it over 10 seeds).")
        else:
            primary = {(k, d): paired_difference(_endpoint(by[k], m, d, endpoint_cells),
                                                 _endpoint(by[k], s, d, endpoint_cells))
                       for k in ("miou", "q") for d in datasets}
            head = _tested_head(label, n, datasets, cells, primary, endpoint_name)
        lines += [head, *details]
    return [*warnings, *lines]


def _endpoint(by_k: dict[tuple, dict[int, float]], model: str, dataset: str, cells: list[tuple[str, float]]
              ) -> dict[int, float]:
    """seed → the mean of the model's values over ``cells`` on ``dataset`` (seeds with every cell measured)."""
    per_cell = [by_k.get((model, dataset, p, e), {}) for p, e in cells]
    seeds = set.intersection(*(set(c) for c in per_cell)) if per_cell else set()
    values = {seed: statistics.fmean(c[seed] for c in per_cell) for seed in seeds}
    return {seed: v for seed, v in values.items() if v == v}


def _direction(ivs: list, adjusted: list[float]) -> tuple[int, int, int]:
    """(higher, lower, not resolved) of paired differences, judged by Holm-adjusted p-values at 1 - LEVEL."""
    hi = sum(1 for iv, p in zip(ivs, adjusted) if p < 1 - LEVEL and iv.mean > 0)
    lo = sum(1 for iv, p in zip(ivs, adjusted) if p < 1 - LEVEL and iv.mean < 0)
    return hi, lo, len(ivs) - hi - lo


def _tested_head(label: str, n: int, datasets: list[str], cells: dict[str, dict], primary: dict[tuple, Any],
                 endpoint_name: str) -> str:
    """The verdict line of a model over several seeds: the word from the Holm-adjusted primary endpoints, their
    values, and the secondary cell counts."""
    keys = list(primary)
    adjusted = dict(zip(keys, holm([primary[k].p for k in keys])))
    dirs = {k: _direction([primary[(k, d)] for d in datasets], [adjusted[(k, d)] for d in datasets])
            for k in ("miou", "q")}
    (mhi, mlo, _), (qhi, qlo, _) = dirs["miou"], dirs["q"]
    if qhi or qlo:
        word = ("more robust" if not qlo else "less robust" if not qhi else
                "mixed: more robust on some datasets, less on others")
    elif mlo and not mhi:
        word = ("lower mIoU under attack, but not resolved as less robust: Q does not differ, so the loss follows "
                "the clean accuracy")
    elif mhi and not mlo:
        word = ("higher mIoU under attack, but not resolved as more robust: Q does not differ, so the gain follows "
                "the clean accuracy")
    else:
        word = "not resolved"
    values = "; ".join(f"{d}: mIoU {primary[('miou', d)].text(' pt')} (Holm p = {adjusted[('miou', d)]:.3f}), "
                       f"Q {primary[('q', d)].text(' pt')} (Holm p = {adjusted[('q', d)]:.3f})" for d in datasets)
    counts = {}
    for k, ivs in cells.items():
        items = list(ivs.values())
        counts[k] = _direction(items, holm([iv.p for iv in items]))
    (hi, lo, unres), (qh, ql, qu) = counts["miou"], counts["q"]
    return (f"**{label} vs the single-task model over {n} seeds: {word}.** Primary endpoint, the {endpoint_name} "
            f"and the same average of Q, multi − single with its 95 % t-interval, Holm-adjusted over the "
            f"{len(keys)} primary tests: {values}. Secondary, per (dataset, perturbation, ε) cell, Holm-adjusted over "
            f"the {hi + lo + unres} cells: mIoU under attack higher in {hi}, lower in {lo}, not resolved in {unres}; "
            f"Q higher in {qh}, lower in {ql}, not resolved in {qu}."
            + (f" Where a difference is not resolved, {n} seeds cannot tell its sign." if unres or qu else ""))


def _by_seed(rows, key, value) -> dict[tuple, dict[int, float]]:
    """key(row) → {seed: value(row) in %}."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        out[key(r)][r.seed] = as_percent(value(r))
    return out
