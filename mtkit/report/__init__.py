"""Reports: ``results.json`` (typed, ``mtkit.core.results``), ``results.csv``, ``report.md`` with tables shaped like
the paper's Tables 2-4 and a depth table, and PNG plots like Figures 5-6 (aggregation, tables and plots each in
their own module)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from ..core.errors import MtkitError
from ..core.io import atomic_write_text, cache_dir
from ..core.results import WORST_CASE, RunResults
from .claims import verdict
from .detection import detection_markdown, plot_detection, plot_roc
from .plots import plot_figure5, plot_figure6, plot_other_levels
from .sections import aggregate
from .tables import depth_table, markdown_tables, rich_tables, write_csv
from .targeted import plot_targeted, targeted_markdown

__all__ = ["aggregate", "depth_table", "markdown_tables", "rich_tables", "save_report", "verdict", "write_report"]


def save_report(results: RunResults, run_dir: Path) -> dict[str, Path]:
    """``write_report``, and when the final write fails (a full disk, a folder gone unwritable), the results are
    rescued to the cache folder and the error names where they are: finished work is never lost."""
    try:
        return write_report(results, run_dir)
    except OSError as exc:
        rescue = cache_dir() / "rescued" / f"results-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        try:
            results.write(rescue)
        except OSError:
            raise MtkitError(f"cannot write the results to {run_dir} ({exc.strerror or exc}) nor to {rescue}") \
                from None
        raise MtkitError(f"cannot write the results to {run_dir} ({exc.strerror or exc}); they were saved to "
                         f"{rescue}") from None


def attack_budgets(results: RunResults) -> list[str]:
    """A note line with every gradient attack's gradient passes per image over its sweep of the ε list
    (iterations × restarts summed over ε; a shared pass, as FGSM's, counts once), so that each attack's strength
    is stated."""
    budgets: dict[str, set[float]] = {}
    for r in results.robustness:
        if r.attack and r.is_epsilon and r.perturbation != WORST_CASE:
            budgets.setdefault(r.perturbation, set()).add(round(r.backward_passes_per_batch, 3))
    if not budgets:
        return []
    eps = sorted({r.level for r in results.robustness if r.attack and r.is_epsilon})
    parts = [f"{p}: " + " / ".join(f"{v:g}" for v in sorted(v)) for p, v in budgets.items()]
    return [f"- Attack budgets, gradient passes per image over the sweep of ε = {', '.join(f'{e:g}' for e in eps)} "
            "(iterations × restarts, summed over ε): " + "; ".join(parts) + ". APGD as in AutoAttack runs 100 "
            "iterations at each ε: `robustness.options.apgd.iterations: 100`."]


def write_report(results: RunResults, run_dir: Path) -> dict[str, Path]:
    """report.md, results.json, results.csv and the plots in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "results.json", "csv": run_dir / "results.csv", "report": run_dir / "report.md"}
    results.write(paths["json"])
    write_csv(results, paths["csv"])
    # without matplotlib (a slim GPU image) the report is written without its figures, and says so
    plots = importlib.util.find_spec("matplotlib") is not None

    def plot(fn, name: str) -> Path | None:
        return fn(results, run_dir / name) if plots else None

    fig5 = plot(plot_figure5, "figure5_robustness.png") if results.robustness else None
    fig6 = plot(plot_figure6, "figure6_fgsm_lambda.png") if results.robustness else None
    figc = plot(plot_other_levels, "figure_corruptions.png")
    seeds = results.seeds
    md = [f"# mtkit report: {results.recipe_name}", "", *([results.recipe_description, ""]
                                                          if results.recipe_description else []),
          f"Recipe `{results.recipe_source or ''}`, seeds {seeds}"
          + (" (mean ± standard deviation over seeds)" if len(seeds) > 1 else "")
          + f", device {results.environment.get('device', '?')}.", "",
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
    md += targeted_markdown(results)
    png = plot(plot_targeted, "figure_targeted.png")
    if png:
        paths["figure_targeted"] = png
        md += ["### Targeted attacks: success over ε", "", f"![Targeted attacks]({png.name})", ""]
    md += detection_markdown(results)
    for key, fn, title in (("figure_detection", plot_detection, "Detection rate over ε"),
                           ("figure_roc", plot_roc, "ROC curves at the smallest ε")):
        png = plot(fn, f"{key}.png")
        if png:
            paths[key] = png
            md += [f"### {title}", "", f"![{title}]({png.name})", ""]
    if results.data:
        md += ["## Data", "", "| dataset | name | split | samples | size | skipped |", "|---|---|---|---|---|---|",
               *(f"| {d.key} | {d.name} | {d.split} | {d.samples} | {d.width}x{d.height} | {d.skipped}"
                 + (f" ({', '.join(d.skipped_items[:3])})" if d.skipped_items else "") + " |" for d in results.data),
               ""]
    md += ["## Notes", "", *([] if plots else ["- No figures: matplotlib is not installed here (`pip install "
                                                "matplotlib`, then `mtkit run` again redraws them from the cache); "
                                                "the tables hold every number."]),
           "- ε is the RMS of the perturbation in gray values (eq. 7); 'measured ε' is the RMS after clipping "
           "the perturbed image to [0, 255], over the whole evaluation set.",
           "- mIoU sums TP, FP and FN over all images before dividing (eq. 9); Q = mIoU_adv / mIoU_clean "
           "(eq. 10).",
           *attack_budgets(results),
           "- Depth: KITTI Eigen protocol (monodepth2, SGDepth): ground truth capped to [1e-3, 80] m, Garg/Eigen "
           "crop, per-image median scaling; metrics averaged over images.", ""]
    atomic_write_text(paths["report"], "\n".join(md))
    return paths
