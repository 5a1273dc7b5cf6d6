"""Aggregation of typed results over seeds: mean and spread of clean mIoU and Q, the axes of the tables and
plots, the sections of the Q and depth tables, and the verdict."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from ..results import SANITY_CHECKS, RunResults
from ..statistics import paired_difference, t_interval


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
    """Plain sentences on whether each multi-task model was more robust than the single-task one, judged on the
    absolute mIoU under attack and on Q, paired by seed: "more robust" only where the 95 % t-interval of the
    difference (multi − single) over seeds excludes zero; with one seed no claim of significance is made. Each
    claim names the seeds and images behind it."""
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
    lines = []
    for m in multis:
        n = len(set(by["clean"].get((m, datasets[0]), {})) & set(by["clean"].get((s, datasets[0]), {}))) \
            if datasets else 0
        counts = {k: [0, 0, 0] for k in ("miou", "q")}  # higher, lower, not resolved
        measured_higher = 0  # cells where the mean difference is above zero, resolved or not
        details = []
        for d in datasets:
            clean = paired_difference(by["clean"].get((m, d), {}), by["clean"].get((s, d), {}))
            parts = []
            for p in perts:
                diffs = {k: [paired_difference(by[k].get((m, d, p, e), {}), by[k].get((s, d, p, e), {}))
                             for e in eps] for k in ("miou", "q")}
                for k, ivs in diffs.items():
                    for iv in ivs:
                        if iv.n == 0:
                            continue
                        idx = 0 if iv.resolved and iv.low > 0 else 1 if iv.resolved else 2
                        counts[k][idx] += 1
                        measured_higher += k == "miou" and iv.mean > 0
                parts.append(f"{p}: mIoU " + ", ".join(iv.text(" pt") for iv in diffs["miou"])
                             + "; Q " + ", ".join(iv.text(" pt") for iv in diffs["q"]))
            details.append(f"- **{d}** ({images.get(d, '?')} images, {n} seed{'s' if n != 1 else ''}): clean mIoU "
                           f"{clean.text(' pt')} (multi − single); under attack, per ε {eps}: " + " | ".join(parts))
        cells = sum(counts["miou"])
        label = model_label(results, m)
        if n < 2:
            head = (f"**{label} vs the single-task model: one seed, so no claim of significance is possible.** "
                    f"Single measurements: mIoU under attack higher in {measured_higher} of {cells} (dataset, "
                    "perturbation, ε) cells; judging them needs several seeds (`--seeds 0,1,2,3,4`).")
        else:
            hi, lo, unres = counts["miou"]
            qhi, qlo, qunres = counts["q"]
            word = ("more robust" if hi and not lo else "less robust" if lo and not hi else
                    "mixed: more robust in some cells, less in others" if hi and lo else "not resolved")
            head = (f"**{label} vs the single-task model over {n} seeds (95 % t-intervals of the paired "
                    f"difference): {word}.** mIoU under attack higher in {hi}, lower in {lo}, not resolved in "
                    f"{unres} of {cells} (dataset, perturbation, ε) cells; Q higher in {qhi}, lower in {qlo}, not "
                    f"resolved in {qunres}." + (" Where the interval includes zero, the difference is not resolved "
                                                 f"at {n} seeds." if unres or qunres else ""))
        lines += [head, *details]
    return [*warnings, *lines]


def _by_seed(rows, key, value) -> dict[tuple, dict[int, float]]:
    """key(row) → {seed: value(row) in %}."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        out[key(r)][r.seed] = _pct(value(r))
    return out
