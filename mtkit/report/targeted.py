"""The report's "Targeted attacks" section: the share of pixels that took their target (static targets, DAG) or,
for a dynamic target, the share of the hidden class removed and of the other pixels kept (Metzen et al.), per
(model, dataset, attack, ε) with the spread over seeds, and a figure of success over ε."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.results import RunResults, TargetedRow
from .plots import _save, epsilon_axes
from .sections import percent_cell
from .stats import share_cell, t_interval


def image_clusters(rows: list[TargetedRow], column: int, clean: bool = False) -> list[tuple[int, int]]:
    """One (k, n) per image of the rows' per-image counts, summed over the seeds (the same image under every
    seed is one cluster): ``column`` 0 took the target, 1 hidden removed, 2 others kept."""
    out: dict[int, list[int]] = {}
    for r in rows:
        for c in (r.clean_image_counts if clean else r.image_counts):
            kn = out.setdefault(c[0], [0, 0])
            kn[0] += c[1 + 2 * column]
            kn[1] += c[2 + 2 * column]
    return [(k, n) for k, n in out.values()]


def _share(rows: list[TargetedRow], column: int, clean: bool = False) -> str:
    if all(r.clean_image_counts if clean else r.image_counts for r in rows):
        return share_cell(image_clusters(rows, column, clean))
    # results.json of an earlier mtkit, without per-image counts: the t-interval over seeds
    field = "success_clean" if clean else ("success", "removed", "kept")[column]
    return percent_cell([getattr(r, field) for r in rows])


def _cell(rows: list[TargetedRow]) -> str:
    if not rows:
        return "–"
    if rows[0].kind == "dynamic":
        return f"{_share(rows, 1)} / {_share(rows, 2)}"
    return f"{_share(rows, 0)} (clean {_share(rows, 0, clean=True)})"


def targeted_markdown(results: RunResults) -> list[str]:
    """Markdown lines of the section (empty without targeted rows)."""
    rows = results.targeted
    if not rows:
        return []
    eps = sorted({r.epsilon for r in rows})
    groups = list(dict.fromkeys((r.model, r.dataset, r.perturbation) for r in rows))
    md = ["## Targeted attacks", "",
          "Static targets and DAG: the share [%] of the pixels with a target that took it, and in brackets the "
          "share the clean prediction already had (a target scene resembles the attacked one). Dynamic targets (hide a "
          "class, Metzen et al.): the share of the hidden class's pixels removed / of the other pixels whose label "
          "was kept. Each share pools the pixels of every image"
          + (" and seed" if len({r.seed for r in rows}) > 1 else "")
          + "; its 95 % interval is a cluster bootstrap over the images (2000 draws of the images with replacement"
          + (", an image under every seed one cluster" if len({r.seed for r in rows}) > 1 else "")
          + "): an image's pixels succeed or fail together, so they are not independent binomial trials and an "
          "exact interval over pixels would be far too narrow. The measured ε and the mIoU are in the robustness "
          "tables.", "",
          "| model | dataset | attack | " + " | ".join(f"ε = {e:g}" for e in eps) + " |",
          "|---|---|---|" + "---|" * len(eps)]
    for m, d, p in groups:
        cells = [_cell([r for r in rows if (r.model, r.dataset, r.perturbation, r.epsilon) == (m, d, p, e)])
                 for e in eps]
        md.append(f"| {m} | {d} | {p} | " + " | ".join(cells) + " |")
    return [*md, ""]


def plot_targeted(results: RunResults, path: Path) -> Path | None:
    """Success [%] over ε per targeted attack (removed share for dynamic targets), one panel per dataset, one
    curve per (model, attack); error bars are the sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.targeted
    if not rows:
        return None
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    curves = list(dict.fromkeys((r.model, r.perturbation) for r in rows))
    eps = sorted({r.epsilon for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, (m, p) in enumerate(curves):
            ivs = []
            for e in eps:
                got = [r for r in rows if (r.model, r.dataset, r.perturbation, r.epsilon) == (m, d, p, e)]
                ivs.append(t_interval([100 * (r.removed if r.kind == "dynamic" else r.success) for r in got
                                       if (r.removed if r.kind == "dynamic" else r.success) is not None]))
            ax.errorbar(eps, [iv.mean for iv in ivs], yerr=[0 if math.isnan(iv.sd) else iv.sd for iv in ivs],
                        marker="o", ms=3, color=f"C{i}", capsize=2, label=f"{m} {p}")
        epsilon_axes(ax, eps, "success [%] (dynamic: hidden removed)", d, top=102)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Targeted attacks: success over ε")
    fig.tight_layout()
    return _save(fig, path)
