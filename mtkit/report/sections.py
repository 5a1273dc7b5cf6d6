"""Aggregation of typed results over seeds: mean and spread of clean mIoU and Q, the axes of the tables and
plots, the sections of the Q and depth tables, and the verdict."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from ..core.results import SANITY_CHECKS, RunResults
from .stats import t_interval


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


#: the range of each bounded quantity [%]: its t-intervals are clipped to it (``t_interval``)
MIOU_RANGE, Q_RANGE, SHARE_RANGE = (0.0, 100.0), (0.0, math.inf), (0.0, 100.0)


def _summary(values: list[float], bounds: tuple[float, float]) -> tuple[float, float, int, float, float]:
    iv = t_interval(values, bounds=bounds)
    return iv.mean, iv.sd, iv.n, iv.low, iv.high


def as_percent(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def percent_cell(values: list[float | None]) -> str:
    """Shares over seeds as a table cell in %: the value (one seed) or the mean and its 95 % t-interval clipped
    to [0, 100]; None values (no pixels to share) left out, "–" without any."""
    iv = t_interval([100 * v for v in values if v is not None], bounds=SHARE_RANGE)
    if iv.n == 0:
        return "–"
    return f"{iv.mean:.1f}" if iv.n == 1 else f"{iv.mean:.1f} [{iv.low:.1f}, {iv.high:.1f}]"


def aggregate(results: RunResults) -> dict[str, Any]:
    """Over seeds, as (mean, sd, seeds, 95 % interval low, high): clean mIoU per (model, dataset), and Q and the
    absolute mIoU under attack per (model, dataset, perturbation, ε) [%]; the measured ε. The t-intervals are
    clipped to the quantity's range: mIoU to [0, 100] %, Q to ≥ 0 (Q may exceed 100 % where noise helps)."""
    clean = defaultdict(list)
    for r in results.clean:
        clean[(r.model, r.dataset)].append(as_percent(r.miou))
    q = defaultdict(list)
    adv = defaultdict(list)
    eps_meas = defaultdict(list)
    for r in results.robustness:
        key = (r.model, r.dataset, r.perturbation, r.level)
        q[key].append(as_percent(r.q))
        adv[key].append(as_percent(r.miou))
        eps_meas[key].append(r.epsilon_measured)
    return {"clean": {k: _summary(v, MIOU_RANGE) for k, v in clean.items()},
            "q": {k: _summary(v, Q_RANGE) for k, v in q.items()},
            "miou": {k: _summary(v, MIOU_RANGE) for k, v in adv.items()},
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
