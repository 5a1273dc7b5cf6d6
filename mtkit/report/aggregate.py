"""Aggregation of typed results over seeds: mean and spread of clean mIoU and Q, the axes of the tables and
plots, the sections of the Q and depth tables, and the verdict."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from ..results import RunResults


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(mean: float, sd: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if n <= 1 else f"{mean:.1f} ± {sd:.1f}"


def _pct(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def aggregate(results: RunResults) -> dict[str, Any]:
    """Mean and spread over seeds: clean mIoU per (model, dataset), Q per (model, dataset, perturbation, ε)."""
    clean = defaultdict(list)
    for r in results.clean:
        clean[(r.model, r.dataset)].append(_pct(r.miou))
    q = defaultdict(list)
    eps_meas = defaultdict(list)
    for r in results.robustness:
        key = (r.model, r.dataset, r.perturbation, r.level)
        q[key].append(_pct(r.q))
        eps_meas[key].append(r.epsilon_measured)
    return {"clean": {k: (*mean_sd(v), len(v)) for k, v in clean.items()},
            "q": {k: (*mean_sd(v), len(v)) for k, v in q.items()},
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
    return f"{model} (λ={m.lam:g})" if "depth" in m.tasks else f"{model} (single-task)"


def q_sections(results: RunResults) -> list[dict[str, Any]]:
    """One Q table per (perturbation, dataset): its level axis ("ε", or e.g. "severity" for corruptions), one row
    of Q [%] per model (mean ± sd over seeds) and the measured ε per level."""
    agg = aggregate(results)
    models, datasets, perts, eps = result_axes(results)
    sweeps = [(p, "ε", eps) for p in perts] + [(p, kind, lv) for p, (kind, lv) in other_axes(results).items()]
    sections = []
    for p, kind, levels in sweeps:
        for d in datasets:
            sections.append({
                "perturbation": p, "dataset": d, "kind": kind, "levels": levels,
                "rows": [(f"Q ({model_label(results, m)})",
                          [fmt(*agg["q"].get((m, d, p, lv), (math.nan, 0, 0))) for lv in levels]) for m in models],
                "measured": [f"{agg['eps_measured'].get((models[0], d, p, lv), math.nan):.3g}" for lv in levels]})
    return sections


def section_title(s: dict[str, Any], markdown: bool) -> str:
    p = f"**{s['perturbation']}**" if markdown else s["perturbation"]
    if s["kind"] == "ε":
        return f"{'Table 3/4-style: ' if markdown else ''}Q [%] under {p} on {s['dataset']}"
    return f"Q [%] under {p} on {s['dataset']} (by {s['kind']}; ε measured)"


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


def verdict(results: RunResults) -> list[str]:
    """Plain sentences: was the multi-task model more robust than the single-task one, with numbers."""
    agg = aggregate(results)
    models, datasets, perts, eps = result_axes(results)
    singles = [m for m in models if "depth" not in results.models[m].tasks]
    multis = [m for m in models if "depth" in results.models[m].tasks]
    if not singles or not multis:
        return ["The run has no single-task/multi-task pair to compare."]
    s = singles[0]
    lines = []
    for m in multis:
        wins, total = 0, 0
        for d in datasets:
            parts = []
            for p in perts:
                diffs = []
                for e in eps:
                    qs, qm = agg["q"].get((s, d, p, e)), agg["q"].get((m, d, p, e))
                    if qs and qm and not math.isnan(qs[0]) and not math.isnan(qm[0]):
                        diffs.append(qm[0] - qs[0])
                if diffs:
                    mean = statistics.fmean(diffs)
                    wins += mean > 0
                    total += 1
                    parts.append(f"{p} {mean:+.1f} pt")
            clean_s = agg["clean"].get((s, d), (math.nan,))[0]
            clean_m = agg["clean"].get((m, d), (math.nan,))[0]
            lines.append(f"- **{d}**: mIoU {model_label(results, m)} {clean_m:.1f} % vs single-task {clean_s:.1f} %; "
                         f"mean Q difference (multi − single) over ε: " + ", ".join(parts) + ".")
        if total:
            word = "more robust" if wins > total / 2 else ("as robust" if wins == total / 2 else "less robust")
            lines.insert(len(lines) - len(datasets),
                         f"**{model_label(results, m)} was {word} than the single-task model on this run**: "
                         f"higher mean Q in {wins} of {total} (perturbation, dataset) pairs.")
    return lines


