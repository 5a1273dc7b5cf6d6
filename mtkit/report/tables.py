"""Results as tables: rich tables for the terminal, markdown for report.md (shaped like the paper's Tables 2-4),
and CSV."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from rich.table import Table

from ..core.io import atomic_write_text
from ..core.results import RunResults
from .sections import (
    DEPTH_HEAD,
    SANITY_HEAD,
    aggregate,
    depth_sections,
    fmt,
    model_label,
    q_sections,
    result_axes,
    sanity_sections,
    section_title,
)

SANITY_TITLE = "Gradient-masking sanity checks (a failure: the numbers under attack may overstate robustness)"


def rich_tables(results: RunResults) -> list[Table]:
    agg = aggregate(results)
    models, datasets, _, _ = result_axes(results)
    t = Table(title="Table 2: mIoU [%]")
    t.add_column("model")
    for d in datasets:
        t.add_column(f"mIoU {d}", justify="right")
    for m in models:
        t.add_row(model_label(results, m), *[fmt(*agg["clean"].get((m, d), (math.nan, 0, 0))) for d in datasets])
    tables = [t] if results.clean else []
    for s in q_sections(results):
        t = Table(title=section_title(s, markdown=False))
        t.add_column(s["kind"])
        for lv in s["levels"]:
            t.add_column(f"{lv:g}", justify="right")
        for label, cells in s["rows"]:
            t.add_row(label, *cells)
        t.add_row("[dim]measured ε[/dim]", *[f"[dim]{v}[/dim]" for v in s["measured"]])
        tables.append(t)
    sanity = sanity_sections(results)
    if sanity:
        t = Table(title=SANITY_TITLE)
        t.add_column("model on dataset")
        for head in SANITY_HEAD:
            t.add_column(head)
        for label, cells in sanity:
            t.add_row(label, *[c.replace("**FAIL**", "[bold red]FAIL[/bold red]") for c in cells])
        tables.append(t)
    return tables


def markdown_tables(results: RunResults) -> str:
    agg = aggregate(results)
    models, datasets, _, _ = result_axes(results)
    out = ["### Table 2-style: segmentation mIoU [%]", "",
           "| model | " + " | ".join(f"mIoU {d}" for d in datasets) + " |",
           "|---|" + "---:|" * len(datasets)]
    for m in models:
        out.append(f"| {model_label(results, m)} | " + " | ".join(
            fmt(*agg["clean"].get((m, d), (math.nan, 0, 0))) for d in datasets) + " |")
    for s in q_sections(results):
        out += ["", f"### {section_title(s, markdown=True)}", "",
                f"| {s['kind']} | " + " | ".join(f"{lv:g}" for lv in s["levels"]) + " |",
                "|---|" + "---:|" * len(s["levels"])]
        out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in s["rows"]]
        out.append("| measured ε | " + " | ".join(s["measured"]) + " |")
    sanity = sanity_sections(results)
    if sanity:
        out += ["", f"### {SANITY_TITLE}", "", "| model on dataset | " + " | ".join(SANITY_HEAD) + " |",
                "|---|" + "---|" * len(SANITY_HEAD)]
        out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in sanity]
    if not results.clean:
        out = []
    if results.depth:
        out += ["", depth_markdown(results)]
    return "\n".join(out)


def depth_table(results: RunResults) -> list[Table]:
    tables = []
    for s in depth_sections(results):
        t = Table(title=f"Depth on {s['dataset']} (lower is better for the errors, higher for δ)")
        t.add_column("model")
        for h in DEPTH_HEAD:
            t.add_column(h, justify="right")
        for label, cells in s["rows"]:
            t.add_row(label, *cells)
        tables.append(t)
    return tables


def depth_markdown(results: RunResults) -> str:
    out = []
    for s in depth_sections(results):
        out += [f"### Depth on {s['dataset']}: what the segmentation task and λ do to depth quality", "",
                "| model | " + " | ".join(DEPTH_HEAD) + " |", "|---|" + "---:|" * len(DEPTH_HEAD)]
        out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in s["rows"]]
        out.append("")
    return "\n".join(out)


def write_csv(results: RunResults, path: Path) -> None:
    buf = io.StringIO()
    fields = ["model", "seed", "dataset", "perturbation", "level_kind", "level", "epsilon", "epsilon_measured", "miou",
              "miou_clean", "q", "seconds_sweep", "backward_passes_per_batch"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in results.robustness:
        w.writerow(r.model_dump())
    atomic_write_text(path, buf.getvalue())


