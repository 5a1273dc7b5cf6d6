"""``metzen_static`` / ``metzen_dynamic``: Metzen, Kumar, Brox, Fischer, "Universal Adversarial Perturbations
Against Semantic Image Segmentation" (ICCV 2017). A targeted basic iterative method (their eq. 2, Kurakin et
al.): x ← Clip_ε{x − α sign(∇_x J(f(x), y^target))}, descending the loss towards the target. *Static*: the
target is a fixed segmentation (the model's prediction on a chosen image, as theirs, or a label file).
*Dynamic*: hide class o; the target is the clean prediction with o's pixels filled from the nearest pixel of
another class (their Sec. 4), and the loss weighs o's pixels I_o against the rest I_bg by ω (their eq. 4):
J^ω = 1/|I| (ω Σ_{I_o} J_cls + (1 - ω) Σ_{I_bg} J_cls), leaving out the pixels whose softmax probability of
their target already exceeds τ = 0.75 (their rule; option ``tau``), in the universal version too.

Beside TUBSRobustCheck's ``metzen.py`` / ``metzen_uap.py`` (the authors' group's implementation):
- its τ test compares the logits min-max normalised over the whole batch with τ (so a pixel's test depends on
  the other images); mtkit tests the softmax probability of the target, per pixel;
- its dynamic fill is a 4-neighbour propagation that wraps around the image edges; mtkit's is the paper's
  Euclidean nearest neighbour (scipy's distance transform);
- its universal version learns one periodic tile (512x512 by default) repeated over the image, one step per pass
  over the data; mtkit's learns a full-size ξ, one step per batch.

``metzen_static_uap`` / ``metzen_dynamic_uap``: their universal perturbation (eq. 3): ξ ← Clip_ε{ξ − α
sign(Σ_k ∇J^ω(f(x_k + ξ), y_k^target))} over a training split, fingerprinted by the model and cached like
``uap``.
"""

from __future__ import annotations

from pathlib import Path

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
    pgd_iterations,
    project,
)

from .common import predict
from .uap import UAPOptions, UniversalPerturbation, learn_uap


# ------------------------------------------------------------------------------------------------ the losses
def metzen_loss(logits: torch.Tensor, target: torch.Tensor, hidden_mask: torch.Tensor | None = None,
                omega: float = 0.5, tau: float | None = None) -> torch.Tensor:
    """Metzen et al.'s J^ω per image (B,): 1/|I| (ω Σ_{I_o} J_cls + (1 - ω) Σ_{I_bg} J_cls), J_cls the cross-entropy
    towards the target label, I_o the pixels of ``hidden_mask`` (dynamic) and I_bg the others with a target,
    |I| the pixels with a target. Without a mask (static) every pixel weighs alike: the mean cross-entropy.

    ``tau`` (their dynamic attack's rule, τ = 0.75): a pixel whose softmax probability of its target already
    exceeds τ is left out of the sums (J_cls = 0 there; |I| unchanged), so the steps go to the pixels not yet
    fooled. None: every pixel counts."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    has = target != IGNORE_INDEX
    count = has.flatten(1).sum(1).clamp_min(1)
    if tau is not None:
        p = F.softmax(logits.detach(), 1).gather(1, torch.where(has, target, 0).unsqueeze(1)).squeeze(1)
        ce = torch.where(p > tau, 0.0, ce)
    if hidden_mask is None:
        return ce.flatten(1).sum(1) / count
    w = torch.where(hidden_mask, omega, 1 - omega) * has
    return (w * ce).flatten(1).sum(1) / count


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
    tau: float | None = Field(0.75, gt=0, le=1, description="τ: pixels whose probability of their target already "
                                                            "exceeds it leave the loss (Metzen et al.: 0.75); "
                                                            "null: every pixel stays")


class _Metzen(Perturbation):
    needs_gradient = True
    epsilon_meaning = "L∞ bound ε: every element within ±ε, so RMS ≤ ε, measured below"
    targeted = True

    def targets(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor | None) -> Targets:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, tg: Targets) -> torch.Tensor:
        return metzen_loss(logits, tg.labels)

    def direction(self, ctx: AttackContext, x: torch.Tensor, tg: Targets) -> torch.Tensor:
        """∇_x of Σ_images J^ω (each image its own gradient)."""
        return ctx.gradient(x, lambda logits: self.loss(logits, tg).sum())

    def sweep(self, ctx, x, y, epsilons):
        tg = self.targets_of(ctx, x, y)
        o = self.options
        out = {}
        for e in epsilons:
            adv = x.clone()
            for _ in range(o.iterations or pgd_iterations(e)):
                adv = project(adv - o.step * torch.sign(self.direction(ctx, adv, tg)), x, e)
            out[e] = adv
        return out


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

    def static_target(self, ctx: AttackContext, x: torch.Tensor) -> torch.Tensor:
        """The target segmentation (H, W) at the images' size, computed once per model and size."""
        size, device = (x.shape[-2], x.shape[-1]), x.device
        key = (id(ctx.model), *size)
        if key not in self._targets:
            o = self.options
            if o.target_file:
                weights = ctx.class_weights
                classes = weights.numel() if weights is not None else predict(ctx, x[:1])[0].shape[1]
                labels = read_target_file(Path(o.target_file), classes, type(self).__name__)
                labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
            else:
                cfg = o.target_dataset.model_copy(update={"height": size[0], "width": size[1]})
                ds = build_dataset(cfg)
                if not 0 <= o.target_index < len(ds):
                    raise MtkitError(f"{type(self).__name__}: options.target_index {o.target_index} is not an image "
                                     f"of options.target_dataset ({len(ds)} images: 0..{len(ds) - 1})")
                image = ds[o.target_index]["image"][None].to(device)
                labels = predict(ctx, image)[1][0]
            self._targets[key] = labels.to(device)
        return self._targets[key]

    def targets(self, ctx, x, y):
        t = self.static_target(ctx, x)
        return Targets(t.expand(x.shape[0], -1, -1).clone(), "static")


def read_target_file(path: Path, classes: int, who: str) -> torch.Tensor:
    """A target segmentation file (``.npy`` without pickles, or a one-channel PNG) as (H, W) class ids, checked:
    two dimensions, finite whole numbers, each a class 0..classes-1; else one error naming the file and what was
    expected."""
    from PIL import Image, UnidentifiedImageError

    expected = f"a (H, W) map of class ids 0..{classes - 1} (trainIds), as .npy or a one-channel PNG"
    if not path.is_file():
        raise MtkitError(f"{who}: options.target_file {path} does not exist (expected {expected})")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                array = np.asarray(im)
    except (ValueError, OSError, EOFError, UnidentifiedImageError) as exc:
        raise MtkitError(f"{who}: cannot read options.target_file {path} ({type(exc).__name__}: {exc}); expected "
                         f"{expected}") from None
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MtkitError(f"{who}: options.target_file {path} holds {array.dtype} of shape {array.shape}; expected "
                         f"{expected}")
    if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise MtkitError(f"{who}: options.target_file {path} holds values that are not whole numbers (NaN, inf or "
                         f"fractions); expected {expected}")
    low, high = (array.min(), array.max()) if array.size else (0, -1)
    if array.size == 0 or low < 0 or high >= classes:
        raise MtkitError(f"{who}: options.target_file {path} holds ids {low}..{high}; expected {expected}")
    return torch.as_tensor(array.astype(np.int64))


class MetzenDynamic(_Metzen):
    """Metzen et al.'s dynamic target, per image: hide options.hidden_class (its pixels take the label of the
    nearest other pixel) and keep the rest of the prediction, weighing the two by ω."""

    Options = DynamicOptions

    def targets(self, ctx, x, y):
        pred = predict(ctx, x)[1]
        return Targets(fill_hidden(pred, self.options.hidden_class), "dynamic", self.options.hidden_class, pred)

    def loss(self, logits, tg):
        o = self.options
        return metzen_loss(logits, tg.labels, tg.reference == tg.hidden, o.omega, o.tau)


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
        # the clean images' targets, made once per image (the model does not change while ξ is learnt): the dynamic
        # fill (a distance transform on the CPU) runs once per image, not in every learning step
        cache: dict[int, Targets] = {}  # image index -> its targets (a batch of one)

        def direction(ctx, x, x_xi, y):  # descend J^ω towards the clean images' targets (learn_uap ascends)
            missing = [k for k, i in enumerate(ctx.indices) if i not in cache]
            if missing:
                tg = self.attack.targets(ctx, x[missing], None if y is None else y[missing])
                for j, k in enumerate(missing):
                    cache[ctx.indices[k]] = Targets(tg.labels[j:j + 1], tg.kind, tg.hidden,
                                                    None if tg.reference is None else tg.reference[j:j + 1])
            parts = [cache[i] for i in ctx.indices]
            reference = None if parts[0].reference is None else torch.cat([p.reference for p in parts])
            tg = Targets(torch.cat([p.labels for p in parts]), parts[0].kind, parts[0].hidden, reference)
            return -self.attack.direction(ctx, x_xi, tg)
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
