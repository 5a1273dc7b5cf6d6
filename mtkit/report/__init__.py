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
from .paper import paper_markdown, plot_figure4
from .plots import plot_figure5, plot_figure6, plot_other_levels
from .sections import aggregate
from .tables import depth_table, markdown_tables, rich_tables, write_csv
from .targeted import plot_targeted, targeted_markdown

__all__ = ["aggregate", "depth_table", "markdown_tables", "rich_tables", "save_report", "verdict", "write_report"]


def save_report(results: RunResults, run_dir: Path, figures: dict[str, Path] | None = None) -> dict[str, Path]:
    """``write_report``, and when the final write fails (a full disk, a folder gone unwritable), the results are
    rescued to the cache folder and the error names where they are: finished work is never lost."""
    try:
        return write_report(results, run_dir, figures)
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


def epsilon_meanings(results: RunResults) -> list[str]:
    """One note line per perturbation of the results: what its ε is (``Perturbation.epsilon_meaning``, recorded in
    the results by the evaluation) and the measured ε at the largest requested ε, so that a bound that is not an
    RMS is visible."""
    lines = []
    for p in dict.fromkeys(r.perturbation for r in results.robustness if r.perturbation != WORST_CASE):
        meaning = results.epsilon_meanings.get(p, "not recorded (results of an earlier mtkit): see its documentation")
        top = [r for r in results.robustness if r.perturbation == p and r.is_epsilon]
        e = max((r.level for r in top), default=None)
        got = [r.epsilon_measured for r in top if r.level == e]
        lines.append(f"  - {p}: {meaning}" + (f" (at ε = {e:g}: measured {sum(got) / len(got):.3g})" if got else ""))
    return lines


def write_report(results: RunResults, run_dir: Path, figures: dict[str, Path] | None = None) -> dict[str, Path]:
    """report.md, results.json, results.csv and the plots in ``run_dir``; ``figures``: drawn elsewhere from the
    models (``figure1``: the qualitative panel of ``mtkit.evaluation.qualitative``), linked in the report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "results.json", "csv": run_dir / "results.csv", "report": run_dir / "report.md"}
    results.write(paths["json"])
    write_csv(results, paths["csv"])
    # without matplotlib (a slim GPU image) the report is written without its figures, and says so
    plots = importlib.util.find_spec("matplotlib") is not None

    def plot(fn, name: str) -> Path | None:
        return fn(results, run_dir / name) if plots else None

    axis = results.epsilon_axis
    fig5 = plot(plot_figure5, "figure5_robustness.png") if results.robustness and axis != "measured" else None
    fig5m = (plot(lambda r, p: plot_figure5(r, p, measured=True), "figure5_measured_epsilon.png")
             if results.robustness and axis != "requested" else None)
    fig6 = plot(plot_figure6, "figure6_fgsm_lambda.png") if results.robustness else None
    fig4 = plot(plot_figure4, "figure4_lambda.png") if results.clean else None
    figc = plot(plot_other_levels, "figure_corruptions.png")
    seeds = results.seeds
    md = [f"# mtkit report: {results.recipe_name}", "", *([results.recipe_description, ""]
                                                          if results.recipe_description else []),
          f"Recipe `{results.recipe_source or ''}`, seeds {seeds}"
          + (" (mean ± standard deviation over seeds)" if len(seeds) > 1 else "")
          + f", device {results.environment.get('device', '?')}.", "",
          "## Verdict", "", *verdict(results), "", "## Results", "", markdown_tables(results), "",
          *paper_markdown(results)]
    if fig4:
        paths["figure4"] = fig4
        md += ["## Figure 4: mIoU over λ", "", f"![Figure 4]({fig4.name})", ""]
    if fig5:
        paths["figure5"] = fig5
        md += ["## Figure 5: Q over ε per perturbation", "", f"![Figure 5]({fig5.name})", ""]
    if fig5m:
        paths["figure5_measured"] = fig5m
        md += ["## Figure 5 over the measured ε (equal SNR on one axis)", "", f"![Figure 5, measured ε]({fig5m.name})",
               ""]
    if fig6:
        paths["figure6"] = fig6
        md += ["## Figure 6: FGSM for several λ", "", f"![Figure 6]({fig6.name})", ""]
    if figures and figures.get("figure1"):
        paths["figure1"] = figures["figure1"]
        rel = os.path.relpath(figures["figure1"], run_dir)
        md += ["## Figure 1: predictions under noise and attack", "", f"![Figure 1]({rel})", ""]
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
        md += ["## Data (Table 1: images per subset)", "", "| dataset | name | split | samples | size | skipped |",
               "|---|---|---|---|---|---|",
               *(f"| {d.key} | {d.name} | {d.split} | {d.samples} | {d.width}x{d.height} | {d.skipped}"
                 + (f" ({', '.join(d.skipped_items[:3])})" if d.skipped_items else "") + " |" for d in results.data),
               ""]
    md += ["## Notes", "", *([] if plots else ["- No figures: matplotlib is not installed here (`pip install "
                                                "matplotlib`, then `mtkit run` again redraws them from the cache); "
                                                "the tables hold every number."]),
           "- ε is meant as the RMS of the perturbation in gray values (eq. 7), so that equal ε is equal SNR; "
           "'measured ε' is the RMS reached after clipping the perturbed image to [0, 255], over the whole "
           "evaluation set. What the requested ε is for each perturbation:",
           *epsilon_meanings(results),
           "- mIoU sums TP, FP and FN over all images before dividing (eq. 9); Q = mIoU_adv / mIoU_clean "
           "(eq. 10).",
           *(["- Intervals over seeds are 95 % t-intervals of the mean, clipped to the quantity's range (mIoU and "
              "shares to [0, 100] %, Q to ≥ 0): a bound at 0 or 100 is the range's end, not a t quantile. Rates "
              "of images (detection) use Clopper–Pearson's exact interval on their counts; shares of pixels "
              "(targeted attacks) a cluster bootstrap over images."] if len(seeds) > 1 else []),
           *attack_budgets(results),
           "- Depth: KITTI Eigen protocol (monodepth2, SGDepth): ground truth capped to [1e-3, 80] m, Garg/Eigen "
           "crop, per-image median scaling; metrics averaged over images.", ""]
    atomic_write_text(paths["report"], "\n".join(md))
    return paths
