"""PNG plots shaped like the paper's Figures 5-6, and corruptions on the same SNR axis; written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.io import atomic_write
from ..core.results import RunResults
from .sections import aggregate, model_label, other_axes, result_axes


def plot_figure5(results: RunResults, path: Path, measured: bool = False) -> Path | None:
    """One column per perturbation type: Q [%] over ε (log axis) on top, the absolute mIoU under attack [%]
    below (a ratio can make a weaker model look robust), one curve per model and dataset; error bars are the
    sd over seeds. ``measured``: each point at the ε the perturbation measured (the RMS of eq. 7, averaged over
    the seeds) instead of the requested ε, so that curves of equal SNR lie over each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    models, datasets, perts, eps = result_axes(results)
    if not perts:
        return None
    fig, axes = plt.subplots(2, len(perts), figsize=(4.2 * len(perts), 7.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for col, p in enumerate(perts):
        for row, (key, ylabel) in enumerate((("q", "Q [%]"), ("miou", "mIoU under attack [%]"))):
            ax = axes[row][col]
            for mi, m in enumerate(models):
                for di, d in enumerate(datasets):
                    ys = [agg[key].get((m, d, p, e), (math.nan, 0, 0)) for e in eps]
                    xs = [agg["eps_measured"].get((m, d, p, e), math.nan) for e in eps] if measured else eps
                    ax.errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", ms=3,
                                linestyle=styles[di % len(styles)], color=f"C{mi}", capsize=2,
                                label=f"{model_label(results, m)} {d}")
            epsilon_axes(ax, eps, ylabel, p)
            if measured:
                ax.set_xlabel("measured ε (RMS, gray values)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Robustness over perturbation strength (Figure 5): Q, and mIoU under attack"
                 + (", over the measured ε" if measured else "")
                 + " (what ε means for each perturbation: the report's notes)")
    fig.tight_layout()
    return _save(fig, path)


def plot_figure6(results: RunResults, path: Path, perturbation: str = "fgsm") -> Path | None:
    """FGSM (or another perturbation) for several λ: one panel per dataset, one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    models, datasets, perts, eps = result_axes(results)
    if perturbation not in perts:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for mi, m in enumerate(models):
            ys = [agg["q"].get((m, d, perturbation, e), (math.nan, 0, 0))[0] for e in eps]
            ax.plot(eps, ys, marker="o", ms=3, color=f"C{mi}", label=model_label(results, m))
        epsilon_axes(ax, eps, "Q [%]", f"{perturbation.upper()} on {d}")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Q for several gradient scales λ (Figure 6)")
    fig.tight_layout()
    return _save(fig, path)


def plot_other_levels(results: RunResults, path: Path) -> Path | None:
    """Perturbations swept by another level (corruptions by severity) on the paper's SNR axis: Q [%] over the
    measured ε, one panel per dataset, one colour per perturbation, one line style per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    others = other_axes(results)
    if not others:
        return None
    agg = aggregate(results)
    models, datasets, _, _ = result_axes(results)
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


def epsilon_axes(ax, eps: list[float], ylabel: str, title: str, top: float = 105) -> None:
    """The ε axis every figure shares (log 2, the recipe's ε as ticks), the y label, title and grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_ylim(0, top)
    ax.set_xlabel("requested ε (gray values)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path
