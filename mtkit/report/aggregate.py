"""Aggregation of typed results over seeds: mean and spread of clean mIoU and Q, the axes of the tables and
plots, the sections of the Q and depth tables, and the verdict."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from ..results import SANITY_CHECKS, RunResults
from ..statistics import LEVEL, holm, paired_difference, t_interval
from ..sweep import WORST_CASE


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(mean: float, sd: float, n: int, low: float = math.nan, high: float = math.nan) -> str:
    """One seed: the value; several: mean ± sd and the 95 % t-interval of the mean."""
    if math.isnan(mean):
        return "–"
    if n <= 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {sd:.1f} [{low:.1f}, {high:.1f}]"


def _summary(values: list[float]) -> tuple[float, float, int, float, float]:
    iv = t_interval(values)
    return iv.mean, iv.sd, iv.n, iv.low, iv.high


def _pct(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def percent_cell(values: list[float | None]) -> str:
    """Shares over seeds as a table cell in %: the value (one seed) or the mean and its 95 % t-interval; None
    values (no pixels to share) left out, "–" without any."""
    iv = t_interval([100 * v for v in values if v is not None])
    if iv.n == 0:
        return "–"
    return f"{iv.mean:.1f}" if iv.n == 1 else f"{iv.mean:.1f} [{iv.low:.1f}, {iv.high:.1f}]"


def aggregate(results: RunResults) -> dict[str, Any]:
    """Over seeds, as (mean, sd, seeds, 95 % interval low, high): clean mIoU per (model, dataset), and Q and the
    absolute mIoU under attack per (model, dataset, perturbation, ε) [%]; the measured ε."""
    clean = defaultdict(list)
    for r in results.clean:
        clean[(r.model, r.dataset)].append(_pct(r.miou))
    q = defaultdict(list)
    adv = defaultdict(list)
    eps_meas = defaultdict(list)
    for r in results.robustness:
        key = (r.model, r.dataset, r.perturbation, r.level)
        q[key].append(_pct(r.q))
        adv[key].append(_pct(r.miou))
        eps_meas[key].append(r.epsilon_measured)
    return {"clean": {k: _summary(v) for k, v in clean.items()},
            "q": {k: _summary(v) for k, v in q.items()},
            "miou": {k: _summary(v) for k, v in adv.items()},
            "eps_measured": {k: statistics.fmean(v) for k, v in eps_meas.items()}}


def result_axes(results: RunResults) -> tuple[list[str], list[str], list[str], list[float]]:
    """Models, datasets, and the perturbations swept over requested ε with their ε values."""
    models = list(results.models)
    datasets = sorted({r.dataset for r in results.clean})
    rows = [r for r in results.robustness if r.is_epsilon]
    perts = list(dict.fromkeys(r.perturbation for r in rows))
    eps = sorted({r.epsilon for r in rows})
    return models, datasets, perts, eps


def other_axes(results: RunResults) -> dict[str, tuple[str, list[float]]]:
    """Perturbations swept over another level (e.g. corruption severity): name → (level kind, levels)."""
    out: dict[str, tuple[str, set[float]]] = {}
    for r in results.robustness:
        if not r.is_epsilon:
            out.setdefault(r.perturbation, (r.level_kind, set()))[1].add(r.level)
    return {p: (kind, sorted(levels)) for p, (kind, levels) in out.items()}


def model_label(results: RunResults, model: str) -> str:
    m = results.models[model]
    if m.factory:
        return f"{model} (external)"
    return f"{model} (λ={m.lam:g})" if "depth" in m.tasks else f"{model} (single-task)"


def q_sections(results: RunResults) -> list[dict[str, Any]]:
    """One table per (perturbation, dataset): its level axis ("ε", or e.g. "severity" for corruptions), a row of
    Q [%] and a row of the absolute mIoU under attack [%] per model (mean ± sd and 95 % interval over seeds),
    and the measured ε per level."""
    agg = aggregate(results)
    models, datasets, perts, eps = result_axes(results)
    sweeps = [(p, "ε", eps) for p in perts] + [(p, kind, lv) for p, (kind, lv) in other_axes(results).items()]
    sections = []
    for p, kind, levels in sweeps:
        for d in datasets:
            sections.append({
                "perturbation": p, "dataset": d, "kind": kind, "levels": levels,
                "rows": [row for m in models for row in (
                    (f"Q ({model_label(results, m)})",
                     [fmt(*agg["q"].get((m, d, p, lv), (math.nan, 0, 0))) for lv in levels]),
                    (f"mIoU ({model_label(results, m)})",
                     [fmt(*agg["miou"].get((m, d, p, lv), (math.nan, 0, 0))) for lv in levels]))],
                "measured": [f"{agg['eps_measured'].get((models[0], d, p, lv), math.nan):.3g}" for lv in levels]})
    return sections


def section_title(s: dict[str, Any], markdown: bool) -> str:
    p = f"**{s['perturbation']}**" if markdown else s["perturbation"]
    if s["kind"] == "ε":
        return f"{'Table 3/4-style: ' if markdown else ''}Q [%] and mIoU under attack [%]: {p} on {s['dataset']}"
    return f"Q [%] and mIoU [%] under {p} on {s['dataset']} (by {s['kind']}; ε measured)"


DEPTH_COLUMNS = (("abs_rel", "abs_rel", 3), ("sq_rel", "sq_rel", 3), ("rmse", "rmse", 3),
                 ("rmse_log", "rmse_log", 3), ("a1", "δ<1.25", 3), ("a2", "δ<1.25²", 3), ("a3", "δ<1.25³", 3))


def depth_sections(results: RunResults) -> list[dict[str, Any]]:
    """One depth table per evaluation set: a row per model (its λ), each metric as mean ± sd over seeds, the
    median scale ratio, and the images (and skipped split lines) behind it."""
    rows = results.depth
    sections = []
    for d in dict.fromkeys(r.dataset for r in rows):
        table = []
        for m in dict.fromkeys(r.model for r in rows if r.dataset == d):
            rs = [r for r in rows if r.dataset == d and r.model == m]
            cells = []
            for key, _, digits in DEPTH_COLUMNS:
                mean, sd = mean_sd([r.metrics[key] for r in rs])
                cells.append(f"{mean:.{digits}f}" if len(rs) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}")
            scale = mean_sd([r.scale_median for r in rs if r.scale_median is not None])[0]
            cells.append("–" if math.isnan(scale) else f"{scale:.3g}")
            skipped = sum(r.skipped for r in rs)
            cells.append(f"{rs[0].images}" + (f" ({skipped} skipped)" if skipped else ""))
            table.append((model_label(results, m), cells))
        sections.append({"dataset": d, "rows": table, "seeds": len({r.seed for r in rows if r.dataset == d})})
    return sections


DEPTH_HEAD = [c[1] for c in DEPTH_COLUMNS] + ["median scale", "images"]

SANITY_HEAD = list(SANITY_CHECKS.values())


def sanity_sections(results: RunResults) -> list[tuple[str, list[str]]]:
    """The gradient-masking checks as table rows: one per (model, dataset), a cell per check: "pass", "FAIL" with
    the numbers of the first failure, or "n/a", and the seeds behind it."""
    by: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in results.sanity:
        by[(r.model, r.dataset, r.check)].append(r)
    rows = []
    for m in results.models:
        for d in sorted({r.dataset for r in results.sanity if r.model == m}):
            cells = []
            for check in SANITY_CHECKS:
                rs = by.get((m, d, check), [])
                failed = [r for r in rs if r.passed is False]
                judged = [r for r in rs if r.passed is not None]
                if not judged:
                    cells.append("n/a")
                elif failed:
                    cells.append(f"**FAIL** ({len(failed)}/{len(judged)} seeds): {failed[0].detail}")
                else:
                    cells.append("pass" + (f" ({len(judged)}/{len(judged)} seeds)" if len(judged) > 1 else ""))
            rows.append((f"{model_label(results, m)} on {d}", cells))
    return rows


def sanity_warnings(results: RunResults) -> list[str]:
    """One line per model whose gradient-masking checks failed: its numbers under attack may overstate robustness."""
    lines = []
    for m in results.models:
        failed = [r for r in results.sanity if r.model == m and r.passed is False]
        if failed:
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
        out[key(r)][r.seed] = _pct(value(r))
    return out
