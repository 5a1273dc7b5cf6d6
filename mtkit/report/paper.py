"""The paper's own numbers beside ours (Klingner, Bär, Fingscheidt, CVPRW 2020): Table 1 (images per data
subset), Table 2 (mIoU of the single-task model and of each λ on CS and K), Table 3 (Q under Gaussian noise on
CS) and Table 4 (Q under FGSM on CS), each with our value and the difference, written when the recipe is
``recipes/paper.yaml``; and Figure 4 (mIoU on CS and K over λ) for any run with several λ."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.results import RunResults
from .plots import _save
from .sections import aggregate, model_label

#: Table 1: (dataset, subset) → images
PAPER_TABLE1 = {("KITTI", "training"): 28937, ("KITTI", "validation"): 1158, ("KITTI", "testing"): 200,
                ("Cityscapes", "training"): 2975, ("Cityscapes", "validation"): 500, ("Cityscapes", "testing"): 1525}
#: Table 2: λ (None: single-task) → (mIoU CS, mIoU K) [%]
PAPER_TABLE2 = {None: (63.5, 43.0), 0.1: (67.4, 49.6), 0.2: (68.9, 47.7), 0.5: (67.4, 34.7), 0.9: (67.7, 29.8)}
PAPER_EPS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
#: Tables 3 (gaussian) and 4 (fgsm): perturbation → (Q single-task, Q multi-task λ = 0.1) per ε of PAPER_EPS [%]
PAPER_Q = {"gaussian": ((100.0, 99.7, 98.6, 93.7, 75.1, 44.7, 18.4), (99.9, 99.7, 99.4, 97.0, 87.5, 61.4, 28.0)),
           "fgsm": ((63.8, 57.0, 51.0, 43.9, 29.6, 9.6, 2.4), (73.6, 67.8, 63.5, 59.9, 52.2, 31.9, 14.5))}
#: the multi-task model of Tables 3-4 and Figure 5
PAPER_LAMBDA = 0.1


def is_paper_run(results: RunResults) -> bool:
    """The run is the paper's recipe (``recipes/paper.yaml``, name "paper")."""
    return results.recipe_name == "paper"


def _models(results: RunResults) -> tuple[str | None, dict[float, str]]:
    """The first single-task mtkit model and the multi-task models by λ."""
    single = next((m for m, i in results.models.items() if "depth" not in i.tasks and not i.factory), None)
    multis = {float(i.lam): m for m, i in results.models.items() if "depth" in i.tasks}
    return single, multis


def _cell(ours: float, paper: float) -> str:
    return "–" if math.isnan(ours) else f"{ours:.1f} ({ours - paper:+.1f})"


def paper_markdown(results: RunResults) -> list[str]:
    """The "Paper vs ours" section: Tables 1-4 with the paper's value, ours and ours − paper (empty unless
    ``is_paper_run``). Ours is the mean over seeds."""
    if not is_paper_run(results):
        return []
    agg = aggregate(results)
    single, multis = _models(results)
    md = ["## Paper vs ours", "",
          "The paper's values (Klingner et al., CVPRW 2020) beside this run's, as ours (ours − paper); ours are the "
          "mean over seeds. A reproduction on the real data should land within a few points; the paper reports "
          "one training run per model, so its own seed-to-seed spread is unknown.", "",
          "**Table 1: images per data subset** (ours: what this run evaluated and trained on)", "",
          "| dataset | subset | paper | ours |", "|---|---|---:|---:|"]
    ours_data = {(d.name, d.split): d.samples for d in results.data}
    names = {"KITTI": ("kitti_raw", "kitti2015"), "Cityscapes": ("cityscapes",)}
    splits = {"training": "train", "validation": "val", "testing": "test"}
    for (dataset, subset), n in PAPER_TABLE1.items():
        got = sorted({v for (name, split), v in ours_data.items() if name in names[dataset]
                      and split == splits[subset]})
        md.append(f"| {dataset} | {subset} | {n:,} | {', '.join(f'{v:,}' for v in got) or '–'} |")
    md += ["", "**Table 2: mIoU [%]**", "", "| model | paper CS | ours CS (Δ) | paper K | ours K (Δ) |",
           "|---|---:|---:|---:|---:|"]
    for lam, (cs, k) in PAPER_TABLE2.items():
        m = single if lam is None else multis.get(lam)
        if m is None:
            continue
        ours = [agg["clean"].get((m, d), (math.nan,))[0] for d in ("CS", "K")]
        md.append(f"| {model_label(results, m)} | {cs:.1f} | {_cell(ours[0], cs)} | {k:.1f} | {_cell(ours[1], k)} |")
    for table, p in (("3", "gaussian"), ("4", "fgsm")):
        paper_single, paper_multi = PAPER_Q[p]
        md += ["", f"**Table {table}: Q [%] under {p} on CS**", "",
               "| model | " + " | ".join(f"ε = {e:g}" for e in PAPER_EPS) + " |", "|---|" + "---:|" * len(PAPER_EPS)]
        for label, m, row in (("single-task", single, paper_single),
                              (f"multi-task (λ={PAPER_LAMBDA:g})", multis.get(PAPER_LAMBDA), paper_multi)):
            md.append(f"| {label}: paper | " + " | ".join(f"{v:.1f}" for v in row) + " |")
            if m is not None:
                ours = [agg["q"].get((m, "CS", p, e), (math.nan,))[0] for e in PAPER_EPS]
                md.append(f"| {label}: ours (Δ) | " + " | ".join(_cell(o, v) for o, v in zip(ours, row)) + " |")
    return [*md, ""]


def plot_figure4(results: RunResults, path: Path) -> Path | None:
    """Figure 4: clean mIoU [%] on each evaluation set over λ (the multi-task models), the single-task model as a
    dashed line per set; error bars are the sd over seeds. None with fewer than two λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single, multis = _models(results)
    if len(multis) < 2:
        return None
    agg = aggregate(results)
    datasets = sorted({r.dataset for r in results.clean})
    lams = sorted(multis)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for i, d in enumerate(datasets):
        ys = [agg["clean"].get((multis[lam], d), (math.nan, 0.0)) for lam in lams]
        ax.errorbar(lams, [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", ms=4, color=f"C{i}",
                    capsize=2, label=f"multi-task, {d}")
        if single is not None and (single, d) in agg["clean"]:
            ax.axhline(agg["clean"][(single, d)][0], color=f"C{i}", linestyle="--", linewidth=1,
                       label=f"single-task, {d}")
    ax.set_xlabel("λ (gradient scaling of eq. 5)")
    ax.set_ylabel("mIoU [%]")
    ax.set_title("Figure 4: segmentation over λ")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
