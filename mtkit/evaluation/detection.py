"""Evaluation of the attack detector (``mtkit.ops.edge_consistency``, the recipe's ``detection`` section) for one
trained multi-task model on the evaluation sets: per (dataset, perturbation, ε) the detection rate at the target
false-positive rate, the measured false-positive rate, the ROC curve and its AUC (``DetectionRow``).

Honest by construction: the threshold is fitted on the clean images with an even index in the set and everything
reported is measured on the odd-indexed ones, so the false-positive rate is not the fitting set's own. The
perturbations are the registry's, with the same per-image random draws as the robustness evaluation; the
adaptive attack (``opgd``) sees the multi-task network through ``AttackContext.multitask``.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..core.errors import MtkitError
from ..core.precision import math_mode, resolve_precision
from ..core.progress import progress_bar
from ..core.results import DetectionRow
from ..core.schema import Recipe
from ..ops.edge_consistency import fit_threshold, require_fit_images, roc_auc, roc_points
from ..ops.metrics import confusion_counts, confusion_from_counts, miou
from ..perturbations import AttackContext
from ..recipe.build import build_detector, build_perturbations, build_segmentation_loss
from .robustness import LoadedModel, eval_dataset
from .sweep import pass_size

#: ROC points kept per row (evenly spaced over the curve; the AUC uses every point)
ROC_POINTS = 50


def detection_datasets(recipe: Recipe) -> list[str]:
    """The evaluation sets the detection section covers."""
    return list(recipe.detection.datasets or recipe.robustness.datasets or recipe.data.eval)


def evaluate_detection(loaded: LoadedModel, recipe: Recipe, datasets: list[str], seed: int,
                       device: torch.device | str = "cpu", progress: bool = False, data: dict | None = None
                       ) -> list[DetectionRow]:
    """The detection rows of one multi-task model (see the module) on ``datasets`` (keys of ``data.eval``)."""
    cfg, rob = recipe.detection, recipe.robustness
    if getattr(loaded.model, "depth_head", None) is None:
        raise MtkitError(f"detection: model '{loaded.spec.name}' has no depth head (tasks {loaded.spec.tasks}); the "
                         f"{cfg.detector} detector compares the depth's edges with the segmentation's: evaluate a "
                         "multi-task model")
    device = torch.device(device)
    detector = build_detector(cfg.detector, cfg.options)
    perts = build_perturbations(cfg.perturbations or rob.perturbations, rob.options)
    epsilons = cfg.epsilons or rob.epsilons
    model = loaded.model.to(device).eval()
    segmenter = loaded.segmenter.to(device).eval()
    cw = None if loaded.class_weights is None else loaded.class_weights.to(device)
    loss = build_segmentation_loss(recipe.loss.segmentation, loaded.class_weights).to(device)
    precision = resolve_precision(rob.amp, rob.channels_last, rob.compile, device, "robustness", rob.tf32)
    with math_mode(precision.tf32):  # the evaluation's policy: IEEE fp32 attack gradients unless robustness.tf32
        return [row for key in datasets for row in _detect_on(
            loaded, recipe, key, eval_dataset(recipe, key, progress, data), detector, perts, epsilons, model,
            segmenter, cw, loss, seed, device, progress)]


def _detect_on(loaded: LoadedModel, recipe: Recipe, key: str, ds, detector, perts, epsilons, model, segmenter, cw,
               loss, seed: int, device: torch.device, progress: bool) -> list[DetectionRow]:
    """The detection rows of one evaluation set (see ``evaluate_detection``). Attack passes are sized as the
    robustness sweep's (``pass_size``: what the device's memory allows, at most ``CPU_PASS_BYTES`` on a CPU)."""
    cfg, classes = recipe.detection, recipe.model.num_classes
    rows: list[DetectionRow] = []
    passes = pass_size(segmenter, tuple(ds[0]["image"].shape), device)
    fit, test = list(range(0, len(ds), 2)), list(range(1, len(ds), 2))
    if not fit or not test:
        raise MtkitError(f"detection on {key}: {len(ds)} image(s); the threshold needs clean images of its own "
                         "and the rates images of theirs: give the set at least 2 images (better 100+)")
    require_fit_images(len(fit), cfg.fpr)  # before any work: the threshold could not meet detection.fpr
    bs = cfg.batch_size
    batches = [fit[i:i + bs] for i in range(0, len(fit), bs)]
    test_batches = [test[i:i + bs] for i in range(0, len(test), bs)]
    # scores, counts and Σ r² stay on the device; everything is read back once, after the set
    fit_scores: list[torch.Tensor] = []
    clean_scores: list[torch.Tensor] = []
    scores: dict[tuple[str, float], list[torch.Tensor]] = {(p, e): [] for p in perts for e in epsilons}
    counts = {(p, e): torch.zeros(classes * classes + 1, dtype=torch.long, device=device)
              for p in perts for e in epsilons}
    sq = {k: torch.zeros((), dtype=torch.float64, device=device) for k in scores}
    numel = 0
    seconds = dict.fromkeys(perts, 0.0)
    gen = torch.Generator().manual_seed(seed)
    label = f"{loaded.spec.name}/{key} detection"
    with progress_bar(progress, len(batches) + len(test_batches), label) as advance:
        for idx in batches:
            x = torch.stack([ds[i]["image"] for i in idx]).to(device)
            fit_scores.append(detector.score(detector.measures(model, x)))
            advance()
        for idx in test_batches:
            items = [ds[i] for i in idx]
            x = torch.stack([it["image"] for it in items]).to(device)
            y = torch.stack([it["label"] for it in items]).to(device).long()
            clean_scores.append(detector.score(detector.measures(model, x)))
            numel += x[0].numel() * len(idx)
            for name, pert in perts.items():
                ctx = AttackContext(segmenter, cw, gen, seed, idx, loss, passes, model, detector)
                t0 = time.perf_counter()
                with contextlib.nullcontext() if pert.needs_gradient else torch.no_grad():
                    advs = pert.sweep(ctx, x, y, list(epsilons))
                seconds[name] += time.perf_counter() - t0
                for e, adv in advs.items():
                    adv = adv.detach()
                    measures, pred = detector.measures_and_prediction(model, adv)  # one encoder pass
                    if pred is None:  # a detector that does not predict: the segmenter's own pass
                        with torch.no_grad():
                            pred = segmenter(adv).argmax(1)
                    scores[(name, e)].append(detector.score(measures))
                    counts[(name, e)] += confusion_counts(pred, y, classes)
                    sq[(name, e)] += ((adv - x).double() ** 2).sum()
            advance()
    threshold = fit_threshold(torch.cat(fit_scores).cpu().numpy(), cfg.fpr)
    clean = torch.cat(clean_scores).cpu().numpy()
    for (name, e), parts in scores.items():
        attacked = torch.cat(parts).cpu().numpy()
        fpr, tpr = roc_points(clean, attacked)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).round().astype(int))
        rows.append(DetectionRow(
            model=loaded.spec.name, seed=seed, dataset=key, detector=cfg.detector, perturbation=name,
            epsilon=e, epsilon_measured=(float(sq[(name, e)]) / max(numel, 1)) ** 0.5, fpr_target=cfg.fpr,
            threshold=threshold, fpr=float((clean > threshold).mean()),
            detection_rate=float((attacked > threshold).mean()), auc=roc_auc(clean, attacked),
            images=len(test), fit_images=len(fit),
            miou_attacked=miou(confusion_from_counts(counts[(name, e)], classes)),
            roc=[(fpr[i], tpr[i]) for i in keep], seconds=seconds[name] / len(epsilons)))
    return rows
