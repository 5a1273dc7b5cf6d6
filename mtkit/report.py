"""Results as JSON, CSV, rich tables shaped like the paper's Tables 2-4, PNG plots like Figures 5-6, and a
markdown report."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(mean: float, sd: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if n <= 1 else f"{mean:.1f} ± {sd:.1f}"


def aggregate(results: dict[str, Any]) -> dict[str, Any]:
    """Mean and spread over seeds: clean mIoU per (model, dataset), Q per (model, dataset, perturbation, ε)."""
    clean = defaultdict(list)
    for r in results["clean"]:
        clean[(r["model"], r["dataset"])].append(100 * r["miou"])
    q = defaultdict(list)
    eps_meas = defaultdict(list)
    for r in results["robustness"]:
        key = (r["model"], r["dataset"], r["perturbation"], _level(r))
        q[key].append(100 * r["q"])
        eps_meas[key].append(r["epsilon_measured"])
    return {"clean": {k: (*_mean_sd(v), len(v)) for k, v in clean.items()},
            "q": {k: (*_mean_sd(v), len(v)) for k, v in q.items()},
            "eps_measured": {k: statistics.fmean(v) for k, v in eps_meas.items()}}


def _level(row: dict[str, Any]) -> float:
    """The sweep key of a result row: the requested ε, or another level (a corruption's severity)."""
    return row.get("level", row["epsilon"])


def _is_eps(row: dict[str, Any]) -> bool:
    return row.get("level_kind", "epsilon") == "epsilon"


def _axes(results: dict[str, Any]) -> tuple[list[str], list[str], list[str], list[float]]:
    """Models, datasets, and the perturbations swept over requested ε with their ε values."""
    models = list(results["models"])
    datasets = sorted({r["dataset"] for r in results["clean"]})
    rows = [r for r in results["robustness"] if _is_eps(r)]
    perts = list(dict.fromkeys(r["perturbation"] for r in rows))
    eps = sorted({r["epsilon"] for r in rows})
    return models, datasets, perts, eps


def _other_axes(results: dict[str, Any]) -> dict[str, tuple[str, list[float]]]:
    """Perturbations swept over another level (e.g. corruption severity): name → (level kind, levels)."""
    out: dict[str, tuple[str, set[float]]] = {}
    for r in results["robustness"]:
        if not _is_eps(r):
            out.setdefault(r["perturbation"], (r["level_kind"], set()))[1].add(r["level"])
    return {p: (kind, sorted(levels)) for p, (kind, levels) in out.items()}


def _label(results: dict[str, Any], model: str) -> str:
    m = results["models"][model]
    return f"{model} (λ={m['lambda']:g})" if "depth" in m["tasks"] else f"{model} (single-task)"


def q_sections(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One Q table per (perturbation, dataset): its level axis ("ε", or e.g. "severity" for corruptions), one row
    of Q [%] per model (mean ± sd over seeds) and the measured ε per level."""
    agg = aggregate(results)
    models, datasets, perts, eps = _axes(results)
    axes = [(p, "ε", eps) for p in perts] + [(p, kind, lv) for p, (kind, lv) in _other_axes(results).items()]
    sections = []
    for p, kind, levels in axes:
        for d in datasets:
            sections.append({
                "perturbation": p, "dataset": d, "kind": kind, "levels": levels,
                "rows": [(f"Q ({_label(results, m)})",
                          [_fmt(*agg["q"].get((m, d, p, lv), (math.nan, 0, 0))) for lv in levels]) for m in models],
                "measured": [f"{agg['eps_measured'].get((models[0], d, p, lv), math.nan):.3g}" for lv in levels]})
    return sections


def _section_title(s: dict[str, Any], markdown: bool) -> str:
    p = f"**{s['perturbation']}**" if markdown else s["perturbation"]
    if s["kind"] == "ε":
        return f"{'Table 3/4-style: ' if markdown else ''}Q [%] under {p} on {s['dataset']}"
    return f"Q [%] under {p} on {s['dataset']} (by {s['kind']}; ε measured)"


def rich_tables(results: dict[str, Any]) -> list[Table]:
    agg = aggregate(results)
    models, datasets, _, _ = _axes(results)
    t = Table(title="Table 2: mIoU [%]")
    t.add_column("model")
    for d in datasets:
        t.add_column(f"mIoU {d}", justify="right")
    for m in models:
        t.add_row(_label(results, m), *[_fmt(*agg["clean"].get((m, d), (math.nan, 0, 0))) for d in datasets])
    tables = [t]
    for s in q_sections(results):
        t = Table(title=_section_title(s, markdown=False))
        t.add_column(s["kind"])
        for lv in s["levels"]:
            t.add_column(f"{lv:g}", justify="right")
        for label, cells in s["rows"]:
            t.add_row(label, *cells)
        t.add_row("[dim]measured ε[/dim]", *[f"[dim]{v}[/dim]" for v in s["measured"]])
        tables.append(t)
    return tables


def markdown_tables(results: dict[str, Any]) -> str:
    agg = aggregate(results)
    models, datasets, _, _ = _axes(results)
    out = ["### Table 2-style: segmentation mIoU [%]", "",
           "| model | " + " | ".join(f"mIoU {d}" for d in datasets) + " |",
           "|---|" + "---:|" * len(datasets)]
    for m in models:
        out.append(f"| {_label(results, m)} | " + " | ".join(
            _fmt(*agg["clean"].get((m, d), (math.nan, 0, 0))) for d in datasets) + " |")
    for s in q_sections(results):
        out += ["", f"### {_section_title(s, markdown=True)}", "",
                f"| {s['kind']} | " + " | ".join(f"{lv:g}" for lv in s["levels"]) + " |",
                "|---|" + "---:|" * len(s["levels"])]
        out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in s["rows"]]
        out.append("| measured ε | " + " | ".join(s["measured"]) + " |")
    return "\n".join(out)


def write_csv(results: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    fields = ["model", "seed", "dataset", "perturbation", "level_kind", "level", "epsilon", "epsilon_measured", "miou",
              "miou_clean", "q", "seconds_sweep", "backward_passes_per_batch"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in results["robustness"]:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def plot_figure5(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per perturbation type: Q [%] over ε (log axis), one curve per model and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    models, datasets, perts, eps = _axes(results)
    if not perts:
        return None
    fig, axes = plt.subplots(1, len(perts), figsize=(4.2 * len(perts), 3.8), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, p in zip(axes[0], perts):
        for mi, m in enumerate(models):
            for di, d in enumerate(datasets):
                ys = [agg["q"].get((m, d, p, e), (math.nan, 0, 0)) for e in eps]
                ax.errorbar(eps, [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", ms=3,
                            linestyle=styles[di % len(styles)], color=f"C{mi}", capsize=2,
                            label=f"{_label(results, m)} {d}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.set_ylim(0, 105)
        ax.set_xlabel("ε (gray values, RMS)")
        ax.set_ylabel("Q [%]")
        ax.set_title(p)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Robustness: mIoU ratio Q over perturbation strength (Figure 5)")
    fig.tight_layout()
    return _save(fig, path)


def plot_figure6(results: dict[str, Any], path: Path, perturbation: str = "fgsm") -> Path | None:
    """FGSM (or another perturbation) for several λ: one panel per dataset, one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    models, datasets, perts, eps = _axes(results)
    if perturbation not in perts:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for mi, m in enumerate(models):
            ys = [agg["q"].get((m, d, perturbation, e), (math.nan, 0, 0))[0] for e in eps]
            ax.plot(eps, ys, marker="o", ms=3, color=f"C{mi}", label=_label(results, m))
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.set_ylim(0, 105)
        ax.set_xlabel("ε (gray values, RMS)")
        ax.set_ylabel("Q [%]")
        ax.set_title(f"{perturbation.upper()} on {d}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Q for several gradient scales λ (Figure 6)")
    fig.tight_layout()
    return _save(fig, path)


def plot_other_levels(results: dict[str, Any], path: Path) -> Path | None:
    """Perturbations swept by another level (corruptions by severity) on the paper's SNR axis: Q [%] over the
    measured ε, one panel per dataset, one colour per perturbation, one line style per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    others = _other_axes(results)
    if not others:
        return None
    agg = aggregate(results)
    models, datasets, _, _ = _axes(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, d in zip(axes[0], datasets):
        for pi, (p, (_, levels)) in enumerate(others.items()):
            for mi, m in enumerate(models):
                xs = [agg["eps_measured"].get((m, d, p, lv), math.nan) for lv in levels]
                ys = [agg["q"].get((m, d, p, lv), (math.nan, 0, 0))[0] for lv in levels]
                ax.plot(xs, ys, marker="o", ms=3, color=f"C{pi % 10}", linestyle=styles[mi % len(styles)],
                        label=f"{p} {m}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 105)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("measured ε (gray values, RMS)")
        ax.set_ylabel("Q [%]")
        ax.set_title(f"corruptions on {d}")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Q over the measured ε of each severity (same SNR axis as Figure 5)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def verdict(results: dict[str, Any]) -> list[str]:
    """Plain sentences: was the multi-task model more robust than the single-task one, with numbers."""
    agg = aggregate(results)
    models, datasets, perts, eps = _axes(results)
    singles = [m for m in models if "depth" not in results["models"][m]["tasks"]]
    multis = [m for m in models if "depth" in results["models"][m]["tasks"]]
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
            lines.append(f"- **{d}**: mIoU {_label(results, m)} {clean_m:.1f} % vs single-task {clean_s:.1f} %; "
                         f"mean Q difference (multi − single) over ε: " + ", ".join(parts) + ".")
        if total:
            word = "more robust" if wins > total / 2 else ("as robust" if wins == total / 2 else "less robust")
            lines.insert(len(lines) - len(datasets),
                         f"**{_label(results, m)} was {word} than the single-task model on this run**: higher mean "
                         f"Q in {wins} of {total} (perturbation, dataset) pairs.")
    return lines


def write_report(results: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """report.md, results.json, results.csv and the plots in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "results.json", "csv": run_dir / "results.csv", "report": run_dir / "report.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, sort_keys=False))
    write_csv(results, paths["csv"])
    fig5 = plot_figure5(results, run_dir / "figure5_robustness.png") if results["robustness"] else None
    fig6 = plot_figure6(results, run_dir / "figure6_fgsm_lambda.png") if results["robustness"] else None
    figc = plot_other_levels(results, run_dir / "figure_corruptions.png")
    seeds = results.get("seeds", [])
    md = [f"# mtkit report: {results.get('recipe_name', '')}", "",
          f"Recipe `{results.get('recipe_source', '')}`, seeds {seeds}"
          + (" (mean ± standard deviation over seeds)" if len(seeds) > 1 else "")
          + f", device {results.get('environment', {}).get('device', '?')}.", "",
          "## Verdict", "", *verdict(results), "", "## Results", "", markdown_tables(results), ""]
    if fig5:
        paths["figure5"] = fig5
        md += ["## Figure 5: Q over ε per perturbation", "", f"![Figure 5]({fig5.name})", ""]
    if fig6:
        paths["figure6"] = fig6
        md += ["## Figure 6: FGSM for several λ", "", f"![Figure 6]({fig6.name})", ""]
    if figc:
        paths["figure_corruptions"] = figc
        md += ["## Corruptions on the same SNR axis", "", f"![Corruptions]({figc.name})", ""]
    md += ["## Notes", "",
           "- ε is the RMS of the perturbation in gray values (eq. 7); 'measured ε' is the RMS after clipping "
           "the perturbed image to [0, 255], over the whole evaluation set.",
           "- mIoU sums TP, FP and FN over all images before dividing (eq. 9); Q = mIoU_adv / mIoU_clean "
           "(eq. 10).", ""]
    atomic_write_text(paths["report"], "\n".join(md))
    return paths
