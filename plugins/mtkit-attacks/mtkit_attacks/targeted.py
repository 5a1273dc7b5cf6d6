"""Targeted segmentation attacks on mtkit's ε axis (images in gray values 0..255, ε the L∞ budget in gray values,
so the RMS of the perturbation, eq. 7, is at most ε and is measured by the evaluation).

- ``metzen_static`` / ``metzen_dynamic``: Metzen, Kumar, Brox, Fischer, "Universal Adversarial Perturbations
  Against Semantic Image Segmentation" (ICCV 2017). A targeted basic iterative method (their eq. 2, Kurakin et
  al.): x ← Clip_ε{x − α sign(∇_x J(f(x), y^target))}, descending the loss towards the target. *Static*: the
  target is a fixed segmentation (the model's prediction on a chosen image, as theirs, or a label file).
  *Dynamic*: hide class o; the target is the clean prediction with o's pixels filled from the nearest pixel of
  another class (their Sec. 4), and the loss weighs o's pixels I_o against the rest I_bg by ω (their eq. 4):
  J^ω = 1/|I| (ω Σ_{I_o} J_cls + (1 - ω) Σ_{I_bg} J_cls).
- ``metzen_static_uap`` / ``metzen_dynamic_uap``: their universal perturbation (eq. 3): ξ ← Clip_ε{ξ − α
  sign(Σ_k ∇J^ω(f(x_k + ξ), y_k^target))} over a training split, fingerprinted by the model and cached like
  ``uap``.
- ``dag``: Xie, Wang, Zhang, Zhou, Xie, Yuille, "Adversarial Examples for Semantic Segmentation and Object
  Detection" (ICCV 2017), Algorithm 1: each labelled pixel gets a target label other than its own (the label set
  randomly permuted, as theirs, per image); at every step
  only the pixels still predicted as their true label are active (T_m); r_m = Σ_{n ∈ T_m} ∇(f_{t_n} − f_{l_n}),
  the step γ · r_m / ‖r_m‖_∞; a pixel that reached its target (or any other label) leaves T_m, and an image with
  no active pixel stops. Projected onto mtkit's L∞ ε-ball (theirs is unbounded).
- ``gd_uap``: Mopuri, Ganeshan, Babu, "Generalizable Data-free Objective for Crafting Universal Adversarial
  Perturbations" (TPAMI 2018), the data-free objective: maximise Π_i ‖l_i(δ)‖₂ over the activations l_i of the
  network's convolutions for the perturbation alone (on a mid-gray image), i.e. minimise −Σ_i log ‖l_i(δ)‖₂, with
  Adam, δ clipped to the ε-ball. It needs no data and hooks every ``nn.Conv2d``, so it works for any model
  (mtkit's timm encoders, external networks).

Targeted attacks say what they aim at (``targets``), so the evaluation reports the share of pixels that took their
target and, for dynamic targets, the share of the hidden class removed and of the other pixels kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveInt

from mtkit.plugin_api import (
    IGNORE_INDEX,
    AttackContext,
    DatasetConfig,
    Field,
    MtkitError,
    Perturbation,
    PerturbationOptions,
    Targets,
    build_dataset,
    cache_dir,
    clip_image,
    config_hash,
    draw,
    pgd_iterations,
    project,
)

from . import UAPOptions, UniversalPerturbation, learn_uap, load_uap, model_fingerprint, save_uap


# ------------------------------------------------------------------------------------------------ the losses
def metzen_loss(logits: torch.Tensor, target: torch.Tensor, hidden_mask: torch.Tensor | None = None,
                omega: float = 0.5) -> torch.Tensor:
    """Metzen et al.'s J^ω per image (B,): 1/|I| (ω Σ_{I_o} J_cls + (1 - ω) Σ_{I_bg} J_cls), J_cls the cross-entropy
    towards the target label, I_o the pixels of ``hidden_mask`` (dynamic) and I_bg the others with a target,
    |I| the pixels with a target. Without a mask (static) every pixel weighs alike: the mean cross-entropy."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    has = target != IGNORE_INDEX
    count = has.flatten(1).sum(1).clamp_min(1)
    if hidden_mask is None:
        return ce.flatten(1).sum(1) / count
    w = torch.where(hidden_mask, omega, 1 - omega) * has
    return (w * ce).flatten(1).sum(1) / count


def dag_objective(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """DAG's objective per image (B,) and its active pixels (B, H, W): Σ_{n ∈ T} f_{t_n}(x) − f_{l_n}(x) over the
    pixels T still predicted as their true label (and with a target)."""
    active = (logits.argmax(1) == labels) & (targets != IGNORE_INDEX)
    safe_t, safe_l = targets.clamp(0, logits.shape[1] - 1), labels.clamp(0, logits.shape[1] - 1)
    margin = logits.gather(1, safe_t.unsqueeze(1)) - logits.gather(1, safe_l.unsqueeze(1))
    return (margin.squeeze(1) * active).flatten(1).sum(1), active


def fill_hidden(pred: torch.Tensor, hidden: int) -> torch.Tensor:
    """Metzen et al.'s dynamic target: ``pred`` (B, H, W) with the pixels of class ``hidden`` given the label of the
    nearest pixel of another class (Euclidean distance transform, scipy); an image that is all ``hidden`` stays."""
    from scipy import ndimage

    out = pred.clone()
    for b in range(pred.shape[0]):
        mask = (pred[b] == hidden).cpu().numpy()
        if mask.any() and not mask.all():
            idx = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
            p = pred[b].cpu().numpy()
            out[b] = torch.as_tensor(p[idx[0], idx[1]], device=pred.device)
    return out


def gd_uap_loss(activations: list[torch.Tensor]) -> torch.Tensor:
    """GD-UAP's data-free loss: −Σ_i log ‖l_i‖₂ over the activations (minimising it maximises Π_i ‖l_i‖₂)."""
    return -sum(torch.log(a.float().norm() + 1e-12) for a in activations)


# ------------------------------------------------------------------------------------------- Metzen et al.
class MetzenOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="α, the step in gray values")
    iterations: PositiveInt | None = Field(None, description="null: ceil(min(ε+4, 1.25ε)) (Kurakin, as Metzen)")


class StaticOptions(MetzenOptions):
    target_file: str | None = Field(None, description="the target segmentation: a label map (.npy of class ids, "
                                                      "or a .png of class ids), resized to the images (nearest)")
    target_dataset: DatasetConfig | None = Field(None, description="or: the model's prediction on one image of "
                                                                   "this dataset is the target (Metzen et al.)")
    target_index: int = Field(0, ge=0, description="which image of target_dataset")


class DynamicOptions(MetzenOptions):
    hidden_class: int = Field(11, ge=0, description="the class to hide (11: person in Cityscapes' trainIds)")
    omega: float = Field(0.9, ge=0, le=1, description="ω: weight of the hidden class's pixels against the rest "
                                                      "(eq. 4; Metzen et al. trade the two numbers off with it)")


class _Metzen(Perturbation):
    needs_gradient = True
    targeted = True

    def targets(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None) -> Targets:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, tg: Targets) -> torch.Tensor:
        return metzen_loss(logits, tg.labels)

    def direction(self, ctx: AttackContext, x: torch.Tensor, tg: Targets) -> torch.Tensor:
        """∇_x of Σ_images J^ω (each image its own gradient)."""
        return ctx.gradient(x, lambda logits: self.loss(logits, tg).sum())

    def sweep(self, ctx, x, y, epsilons):
        tg = self.targets(ctx, x, y)
        o = self.options
        out = {}
        for e in epsilons:
            adv = x.clone()
            for _ in range(o.iterations or pgd_iterations(e)):
                adv = project(adv - o.step * torch.sign(self.direction(ctx, adv, tg)), x, e)
            out[e] = adv
        return out


def _predict(ctx: AttackContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = ctx.model(x)
    return logits, logits.argmax(1)


class MetzenStatic(_Metzen):
    """Metzen et al.'s static target, per image: every image is pushed towards one fixed target segmentation (the
    model's prediction on options.target_index of options.target_dataset, or options.target_file)."""

    Options = StaticOptions

    def __init__(self, options: StaticOptions | None = None) -> None:
        if options is None or (options.target_file is None and options.target_dataset is None):
            raise MtkitError(f"{type(self).__name__}: give the target segmentation, options.target_dataset (with "
                             "target_index: the model's prediction on that image, as Metzen et al.) or "
                             "options.target_file (a .npy or .png label map)")
        super().__init__(options)
        self._targets: dict[tuple[int, int, int], torch.Tensor] = {}

    def static_target(self, ctx: AttackContext, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The target segmentation (H, W) at this image size, computed once per model and size."""
        key = (id(ctx.model), *size)
        if key not in self._targets:
            o = self.options
            if o.target_file:
                path = Path(o.target_file)
                if not path.is_file():
                    raise MtkitError(f"{type(self).__name__}: options.target_file {path} does not exist")
                if path.suffix == ".npy":
                    labels = torch.as_tensor(np.load(path)).long()
                else:
                    from PIL import Image

                    labels = torch.as_tensor(np.asarray(Image.open(path))).long()
                labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
            else:
                cfg = o.target_dataset.model_copy(update={"height": size[0], "width": size[1]})
                image = build_dataset(cfg)[o.target_index]["image"][None].to(device)
                labels = _predict(ctx, image)[1][0]
            self._targets[key] = labels.to(device)
        return self._targets[key]

    def targets(self, ctx, x, y):
        t = self.static_target(ctx, (x.shape[-2], x.shape[-1]), x.device)
        return Targets(t.expand(x.shape[0], -1, -1).clone(), "static")


class MetzenDynamic(_Metzen):
    """Metzen et al.'s dynamic target, per image: hide options.hidden_class (its pixels take the label of the
    nearest other pixel) and keep the rest of the prediction, weighing the two by ω."""

    Options = DynamicOptions

    def targets(self, ctx, x, y):
        pred = _predict(ctx, x)[1]
        return Targets(fill_hidden(pred, self.options.hidden_class), "dynamic", self.options.hidden_class, pred)

    def loss(self, logits, tg):
        return metzen_loss(logits, tg.labels, tg.reference == tg.hidden, self.options.omega)


# ----------------------------------------------------------------------------------- universal (Metzen et al.)
class StaticUAPOptions(StaticOptions, UAPOptions):
    pass


class DynamicUAPOptions(DynamicOptions, UAPOptions):
    pass


class _MetzenUAP(UniversalPerturbation):
    targeted = True
    per_image: type[_Metzen]

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.attack = self.per_image(options)

    def targets(self, ctx, x, y):
        return self.attack.targets(ctx, x, y)

    def learn(self, ctx, dataset, eps):
        def direction(ctx, x, x_xi, y):  # descend J^ω towards the clean images' targets (learn_uap ascends)
            return -self.attack.direction(ctx, x_xi, self.attack.targets(ctx, x, y))
        return learn_uap(ctx, dataset, eps, self.epochs, self.batch_size, self.options.step, self.images, direction)

    def extra_key(self):
        return self.options.model_dump(exclude={"folder"})


class MetzenStaticUAP(_MetzenUAP):
    """Metzen et al.'s universal perturbation towards a static target, learnt on options.dataset (eq. 3)."""

    Options = StaticUAPOptions
    per_image = MetzenStatic
    prefix = "metzen-static"


class MetzenDynamicUAP(_MetzenUAP):
    """Metzen et al.'s universal perturbation hiding options.hidden_class, learnt on options.dataset (eq. 3)."""

    Options = DynamicUAPOptions
    per_image = MetzenDynamic
    prefix = "metzen-dynamic"


# ------------------------------------------------------------------------------------------------------ DAG
class DAGOptions(PerturbationOptions):
    gamma: float = Field(0.5, gt=0, description="γ: the largest change of a pixel per step, in gray values "
                                                "(Xie et al. use 0.5)")
    iterations: PositiveInt = Field(50, description="the most steps; an image stops earlier when no pixel is "
                                                    "active (Xie et al. allow 200)")


class DAG(Perturbation):
    """Dense Adversary Generation (Xie et al. 2017): each labelled pixel pushed to a target label other than its
    own (a per-image random permutation of the classes without fixed points), only pixels still predicted as
    their label active, normalised steps of γ; within the ε-ball."""

    Options = DAGOptions
    needs_gradient = True
    targeted = True

    def targets(self, ctx, x, y):
        if y is None:
            raise MtkitError("dag needs ground-truth labels (each pixel's target differs from its label)")
        c = _predict(ctx, x)[0].shape[1]
        # Xie et al. permute the label set at random: here each image's own random cycle through the classes,
        # label → the next class of the cycle, so that no class keeps its label (a permutation without fixed
        # points) and every pixel of a class shares its target
        maps = []
        for g in ctx.image_generators(x.shape[0], "dag"):
            order = draw("rand", (c,), g).argsort()
            following = torch.empty(c, dtype=torch.long)
            following[order] = order.roll(-1)
            maps.append(following)
        cycle = torch.stack(maps).to(x.device)  # (B, C): class → target class
        safe = y.clamp(0, c - 1)
        t = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, cycle.gather(1, safe.flatten(1)).view_as(y))
        return Targets(t, "per_pixel")

    def sweep(self, ctx, x, y, epsilons):
        tg = self.targets(ctx, x, y)
        return {e: dag(ctx, x, y, tg.labels, e, self.options.gamma, self.options.iterations) for e in epsilons}


def dag(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, eps: float,
        gamma: float = 0.5, iterations: int = 50) -> torch.Tensor:
    """DAG (Algorithm 1 of Xie et al.) within the L∞ ε-ball: see ``DAG``. Returns the adversarial images."""
    adv = x.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        box: list[torch.Tensor] = []

        def objective(logits, box=box):
            value, active = dag_objective(logits, y, targets)
            box.append(active)
            return value.sum()
        r = ctx.gradient(adv, objective)
        done |= ~box[0].flatten(1).any(1)  # an image whose active set emptied has terminated (for good)
        if bool(done.all()):
            break
        norm = r.flatten(1).abs().amax(1).clamp_min(1e-20).view(-1, 1, 1, 1)
        adv = project(adv + torch.where(done.view(-1, 1, 1, 1), 0.0, gamma * r / norm), x, eps)
    return adv


# ---------------------------------------------------------------------------------------------------- GD-UAP
class GDUAPOptions(PerturbationOptions):
    iterations: PositiveInt = Field(200, description="Adam steps on δ")
    lr: float | None = Field(None, gt=0, description="Adam's learning rate in gray values; null: ε/10")
    folder: str | None = Field(None, description="where learnt perturbations are saved (default: the cache)")


def learn_gd_uap(model: torch.nn.Module, eps: float, shape: tuple[int, int, int], iterations: int = 200,
                 lr: float | None = None, seed: int = 0) -> torch.Tensor:
    """GD-UAP's data-free perturbation δ (C, H, W): starting uniform in [−ε, ε], Adam on ``gd_uap_loss`` of the
    network's convolution outputs for a mid-gray image plus δ (no data), δ clipped to [−ε, ε] after each step."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise MtkitError("gd_uap maximises the activations of the network's convolutions, and this one has none")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    delta = ((2 * torch.rand(shape, generator=g) - 1) * eps).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=lr or eps / 10)
    acts: list[torch.Tensor] = []
    hooks = [c.register_forward_hook(lambda m, i, o: acts.append(o)) for c in convs]
    try:
        for _ in range(iterations):
            acts.clear()
            with torch.enable_grad():
                model(clip_image(127.5 + delta)[None])
                loss = gd_uap_loss(acts)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
    finally:
        for h in hooks:
            h.remove()
    return delta.detach()


class GDUAP(Perturbation):
    """GD-UAP (Mopuri et al. 2018), data-free: a universal perturbation that maximises the network's
    convolution activations for the perturbation alone; learnt once per model, ε and size, saved, added."""

    Options = GDUAPOptions
    needs_gradient = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._fingerprints: dict[int, str] = {}
        self.files: list[Path] = []

    def perturbation_for(self, ctx: AttackContext, eps: float, shape: tuple[int, int, int]) -> torch.Tensor:
        fp = self._fingerprints.get(id(ctx.model)) or model_fingerprint(ctx.model)
        self._fingerprints[id(ctx.model)] = fp
        key = (fp, eps, *shape)
        if key not in self._cache:
            o = self.options
            folder = Path(o.folder) if o.folder else cache_dir() / "uap"
            meta: dict[str, Any] = {"iterations": o.iterations, "lr": o.lr, "shape": list(shape)}
            path = folder / f"gd-uap-{fp}-{config_hash(meta, eps)}.pt"
            if path.is_file():
                delta = load_uap(path, fp)
            else:
                delta = learn_gd_uap(ctx.model, eps, shape, o.iterations, o.lr, ctx.seed)
                save_uap(path, delta, eps, fp, meta)
            self.files.append(path)
            self._cache[key] = delta.to(next(ctx.model.parameters()).device)
        return self._cache[key]

    def sweep(self, ctx, x, y, epsilons):
        return {e: clip_image(x + self.perturbation_for(ctx, e, tuple(x.shape[1:]))) for e in epsilons}
