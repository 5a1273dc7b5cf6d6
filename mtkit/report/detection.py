"""The report's "Detecting attacks" section: the detection rate at the target false-positive rate and the ROC-AUC
per (model, dataset, perturbation, ε) with their spread over seeds, the claims with paired intervals, and the
figures (detection rate over ε, ROC curves)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..core.results import DetectionRow, RunResults
from .plots import _save, epsilon_axes
from .sections import percent_cell
from .stats import paired_difference, rate_cell, t_interval


def _by(rows: list[DetectionRow]) -> dict[tuple, dict[int, DetectionRow]]:
    out: dict[tuple, dict[int, DetectionRow]] = defaultdict(dict)
    for r in rows:
        out[(r.model, r.dataset, r.perturbation, r.epsilon)][r.seed] = r
    return out


def detection_markdown(results: RunResults) -> list[str]:
    """Markdown lines of the section (empty without detection rows)."""
    rows = results.detection
    if not rows:
        return []
    by = _by(rows)
    models = list(dict.fromkeys(r.model for r in rows))
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    perts = list(dict.fromkeys(r.perturbation for r in rows))
    eps = sorted({r.epsilon for r in rows})
    first = rows[0]
    seeds = sorted({r.seed for r in rows})
    md = ["## Detecting attacks", "",
          f"Detector `{first.detector}` (Klingner et al., IROS 2022: the edges of the image, the predicted depth and "
          f"the predicted segmentation disagree under attack), threshold fitted per model and set on the clean "
          f"images with an even index for a {100 * first.fpr_target:g} % false-positive rate; every rate below is "
          f"measured on the other {first.images} images of the set, clean and perturbed ({first.fit_images} fitted "
          f"on). Cells: detection rate [%] (the share of perturbed images flagged) with its exact 95 % "
          f"(Clopper–Pearson) interval and the counts, then ROC-AUC [%]"
          + (f" (mean and 95 % t-interval over {len(seeds)} seeds). Rates pool the seeds' decisions: each (seed, "
             f"image) counts as a trial. The same images recur under every seed, so the pooled interval is "
             f"narrower than a bootstrap over images would be where the seeds flag the same images; results.json "
             f"keeps each seed's counts, not each image's decision, so no such bootstrap is made."
             if len(seeds) > 1 else " (one seed)."), ""]
    for m in models:
        for d in datasets:
            fprs = [_counts(r.fpr, r.images) for r in rows if r.model == m and r.dataset == d
                    and r.perturbation == perts[0] and r.epsilon == eps[0]]
            md += [f"**{m} on {d}**: false-positive rate on the held-out clean images {rate_cell(fprs)} % "
                   f"(target {100 * first.fpr_target:g} %; the threshold is the conformal rank of the fitting "
                   f"scores, so a fresh clean image exceeds it with probability at most the target).", "",
                   "| perturbation | " + " | ".join(f"ε = {e:g}" for e in eps) + " |",
                   "|---|" + "---|" * len(eps)]
            for p in perts:
                cells = []
                for e in eps:
                    got = list(by.get((m, d, p, e), {}).values())
                    rate = rate_cell([_counts(r.detection_rate, r.images) for r in got])
                    auc = percent_cell([r.auc for r in got])
                    cells.append(f"{rate} (AUC {auc})" if got else "–")
                md.append(f"| {p} | " + " | ".join(cells) + " |")
            md.append("")
    md += _claims(by, models, datasets, perts, eps, seeds)
    return md


def _counts(rate: float, images: int) -> tuple[int, int]:
    """(flagged, images) of a row's rate: results.json holds the rate over its ``images``, exactly k/n."""
    return round(rate * images), images


def _claims(by, models, datasets, perts, eps, seeds) -> list[str]:
    """Paired statements over seeds: each perturbation at the largest ε against the clean false-positive rate,
    and the adaptive attack (opgd) against PGD at each ε."""
    if len(seeds) < 2:
        return ["With one seed the rates are single measurements; run several seeds for intervals.", ""]
    top = eps[-1]
    lines = ["Paired over seeds (95 % t-intervals of the difference):", ""]
    for m in models:
        for d in datasets:
            for p in perts:
                got = by.get((m, d, p, top), {})
                diff = paired_difference({s: 100 * r.detection_rate for s, r in got.items()},
                                         {s: 100 * r.fpr for s, r in got.items()})
                if diff.n:
                    word = "resolved" if diff.resolved else "not resolved"
                    lines.append(f"- {m} on {d}, {p} at ε = {top:g}: detection rate − false-positive rate "
                                 f"{diff.text(' pt')} ({word})")
            if "opgd" in perts and "pgd" in perts:
                for e in eps:
                    a, b = by.get((m, d, "opgd", e), {}), by.get((m, d, "pgd", e), {})
                    diff = paired_difference({s: 100 * r.detection_rate for s, r in a.items()},
                                             {s: 100 * r.detection_rate for s, r in b.items()})
                    if diff.n:
                        lines.append(f"- {m} on {d} at ε = {e:g}: detection rate under the adaptive opgd − under "
                                     f"pgd {diff.text(' pt')} ({'resolved' if diff.resolved else 'not resolved'})")
    return [*lines, ""]


def plot_detection(results: RunResults, path: Path) -> Path | None:
    """Detection rate [%] over ε (log axis) per perturbation, one panel per (model, dataset), the target
    false-positive rate dashed; error bars are the sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.detection
    if not rows:
        return None
    by = _by(rows)
    panels = list(dict.fromkeys((r.model, r.dataset) for r in rows))
    perts = list(dict.fromkeys(r.perturbation for r in rows))
    eps = sorted({r.epsilon for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (m, d) in zip(axes[0], panels):
        for i, p in enumerate(perts):
            ivs = [t_interval([100 * r.detection_rate for r in by.get((m, d, p, e), {}).values()]) for e in eps]
            ax.errorbar(eps, [iv.mean for iv in ivs], yerr=[0 if math.isnan(iv.sd) else iv.sd for iv in ivs],
                        marker="o", ms=3, color=f"C{i}", capsize=2, label=p)
        ax.axhline(100 * rows[0].fpr_target, color="gray", linestyle="--", linewidth=1, label="target FPR")
        epsilon_axes(ax, eps, "detection rate [%]", f"{m} on {d}", top=102)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Detection rate over ε (edge consistency)")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(results: RunResults, path: Path) -> Path | None:
    """ROC curves at the smallest ε (where the detector has the hardest task), one per perturbation (first
    seed), one panel per (model, dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.detection
    if not rows:
        return None
    top = min(r.epsilon for r in rows)
    seed = min(r.seed for r in rows)
    panels = list(dict.fromkeys((r.model, r.dataset) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (m, d) in zip(axes[0], panels):
        chosen = [r for r in rows if (r.model, r.dataset) == (m, d) and r.epsilon == top and r.seed == seed]
        for i, r in enumerate(chosen):
            ax.plot([p[0] for p in r.roc], [p[1] for p in r.roc], color=f"C{i}",
                    label=f"{r.perturbation} (AUC {100 * r.auc:.0f} %)")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("detection rate")
        ax.set_title(f"{m} on {d}, ε = {top:g}, seed {seed}")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
