"""A Figure 1-style qualitative panel: for a few evaluation images, the clean and perturbed input (noise and an
attack, each at two ε), the single- and the multi-task model's predictions in the Cityscapes colours and the
multi-task model's predicted depth, drawn with the evaluation's own perturbations (each image's noise from its own
stream; each model attacked white-box on its own gradient)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.io import atomic_write
from ..data.labels import trainids_to_colors
from ..perturbations import AttackContext, Perturbation


def pick_epsilons(epsilons: list[float]) -> list[float]:
    """Two ε of the sweep for the panel: 4 and 16 where the sweep has them (where the paper's figures part the
    models), else its middle and its largest."""
    if {4.0, 16.0} <= set(epsilons):
        return [4.0, 16.0]
    e = sorted(set(epsilons))
    return e if len(e) < 2 else [e[(len(e) - 1) // 2], e[-1]]


def qualitative_panel(segmenters: dict[str, nn.Module], depth_model: nn.Module | None, dataset,
                      perturbations: dict[str, Perturbation], epsilons: list[float], path: Path,
                      class_weights: dict[str, torch.Tensor | None] | None = None, indices: list[int] | None = None,
                      seed: int = 0, device: torch.device | str = "cpu") -> Path:
    """Draw the panel to ``path`` (PNG): one block of rows per image of ``indices`` (default the first two), a row
    per condition (clean, then each perturbation at each ε), columns: the input (for an attack: the one on the
    last segmenter, the multi-task model), each segmenter's prediction (under its own attack), the depth of
    ``depth_model`` (the multi-task network) and, in the clean row, the ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = torch.device(device)
    indices = indices if indices is not None else list(range(min(2, len(dataset))))
    batch = [dataset[i] for i in indices]
    x = torch.stack([b["image"] for b in batch]).to(device)
    labels = [b["label"].numpy() for b in batch]
    conditions: list[tuple[str, float]] = [("clean", 0.0)] + [(p, e) for p in perturbations for e in epsilons]
    inputs: dict[tuple[str, float], torch.Tensor] = {("clean", 0.0): x}
    preds: dict[tuple[str, str, float], np.ndarray] = {}
    for name, seg in segmenters.items():
        seg.eval()
        weights = (class_weights or {}).get(name)
        ctx = AttackContext(seg, None if weights is None else weights.to(device), torch.Generator().manual_seed(seed),
                            seed, indices)
        y = torch.stack([b["label"] for b in batch]).to(device)
        with torch.no_grad():
            preds[(name, "clean", 0.0)] = seg(x).argmax(1).cpu().numpy()
        for p, pert in perturbations.items():
            with torch.enable_grad() if pert.needs_gradient else torch.no_grad():
                advs = pert.sweep(ctx, x, y, list(epsilons))
            for e in epsilons:
                inputs[(p, e)] = advs[e]  # the last segmenter's (the multi-task model's) attack is the one shown
                with torch.no_grad():
                    preds[(name, p, e)] = seg(advs[e]).argmax(1).cpu().numpy()
    depth = {}
    if depth_model is not None:
        with torch.no_grad():
            for key, xi in inputs.items():
                depth[key] = depth_model.predict_depth(xi)[:, 0].cpu().numpy()
    cols = ["input", *(f"{n} prediction" for n in segmenters), *(["depth (multi-task)"] if depth else []),
            "ground truth"]
    rows = len(indices) * len(conditions)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 1.5 * rows), squeeze=False)
    for k in range(len(indices)):
        for c, (p, e) in enumerate(conditions):
            ax_row = axes[k * len(conditions) + c]
            label = "clean" if p == "clean" else f"{p} ε={e:g}"
            image = inputs[(p, e)][k].permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy()
            panels = [image, *(trainids_to_colors(preds[(n, p, e)][k].astype(np.uint8)) for n in segmenters)]
            if depth:
                panels.append(1.0 / depth[(p, e)][k])  # disparity: near is bright
            panels.append(trainids_to_colors(labels[k].astype(np.uint8)) if p == "clean" else None)
            for ax, panel in zip(ax_row, panels):
                ax.set_xticks([])
                ax.set_yticks([])
                if panel is None:
                    ax.axis("off")
                    continue
                ax.imshow(panel, cmap="magma" if panel.ndim == 2 else None)
            ax_row[0].set_ylabel(f"#{indices[k]} {label}", fontsize=7)
    for ax, title in zip(axes[0], cols):
        ax.set_title(title, fontsize=8)
    fig.suptitle("Figure 1-style: predictions under noise and attack (each model attacked on its own gradient)",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=90))
    plt.close(fig)
    return path
