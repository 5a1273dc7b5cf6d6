"""mtkit-attacks: MI-FGSM, SegPGD, CosPGD, a universal adversarial perturbation, and the targeted segmentation
attacks of ``mtkit_attacks.targeted`` (Metzen et al.'s static and dynamic targets, per image and universal; DAG;
data-free GD-UAP) as mtkit perturbations.

Every attack follows mtkit's convention: images in gray values 0..255, strength ε in gray values (the L∞ budget of
the projection, so the RMS of the perturbation, eq. 7, is at most ε and is measured and recorded by the
evaluation), the result clipped to [0, 255]. Gradients go through ``AttackContext.gradient`` so the evaluation
counts backward passes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mtkit.plugin_api import (
    IGNORE_INDEX,
    AttackContext,
    DatasetConfig,
    Field,
    MtkitError,
    Perturbation,
    PerturbationOptions,
    RegistryView,
    atomic_torch_save,
    build_dataset,
    cache_dir,
    clip_image,
    config_hash,
    fgsm_direction,
    hookimpl,
    pgd_iterations,
    project,
)

__version__ = "0.1.0"


def _labels_required(y: torch.Tensor | None, name: str) -> torch.Tensor:
    if y is None:
        raise MtkitError(f"{name} needs ground-truth labels; this evaluation dataset gives none")
    return y


# --------------------------------------------------------------------------------------------------- MI-FGSM

def mifgsm(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, iterations: int = 10,
           decay: float = 1.0) -> torch.Tensor:
    """MI-FGSM (Dong et al., CVPR 2018): g ← μ·g + ∇/‖∇‖₁ (per image), x ← Π_ε(x + α·sign(g)), α = ε/T."""
    alpha = eps / iterations
    g = torch.zeros_like(x)
    x_adv = x.clone()
    for _ in range(iterations):
        grad = ctx.input_gradient(x_adv, y)
        g = decay * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        x_adv = project(x_adv + alpha * fgsm_direction(g), x, eps)
    return x_adv


class MIFGSMOptions(PerturbationOptions):
    iterations: int = Field(10, ge=1)
    decay: float = Field(1.0, ge=0)


class MIFGSM(Perturbation):
    """MI-FGSM (Dong et al. 2018): momentum iterative FGSM; options iterations (10), decay (1.0)."""

    Options = MIFGSMOptions
    needs_gradient = True
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = _labels_required(y, "mifgsm")
        return {e: mifgsm(ctx, x, y, e, self.options.iterations, self.options.decay) for e in epsilons}


# ---------------------------------------------------------------------------------------------------- SegPGD

def segpgd_loss(logits: torch.Tensor, y: torch.Tensor, lam: float, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """SegPGD's loss (Gu et al., ECCV 2022, eq. 5): (1-λ)/|I|·Σ_{correct} L_i + λ/|I|·Σ_{wrong} L_i.

    L_i is the (class-weighted, as eq. 1 of Klingner et al.) cross-entropy of pixel i; void pixels are left out.
    """
    per_pixel = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE_INDEX, reduction="none")
    valid = y != IGNORE_INDEX
    correct = (logits.argmax(1) == y) & valid
    wrong = ~correct & valid
    n = valid.sum().clamp_min(1)  # masks as factors, not indices: nothing read back from a GPU
    return ((1 - lam) * (per_pixel * correct).sum() + lam * (per_pixel * wrong).sum()) / n


def segpgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
           iterations: int | None = None) -> torch.Tensor:
    """SegPGD: PGD steps on ``segpgd_loss`` with λ_t = (t-1)/(2T), t = 1..T, L∞ projection and clipping."""
    iterations = pgd_iterations(eps) if iterations is None else iterations
    x_adv = x.clone()
    for t in range(iterations):
        lam = t / (2 * iterations)
        grad = ctx.gradient(x_adv, lambda logits, lam=lam: segpgd_loss(logits, y, lam, ctx.class_weights))
        x_adv = project(x_adv + step * fgsm_direction(grad), x, eps)
    return x_adv


class SegPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: int | None = Field(None, ge=1, description="null: ceil(min(ε+4, 1.25ε))")


class SegPGD(Perturbation):
    """SegPGD (Gu et al. 2022): PGD re-weighting correct/wrong pixels; options step (1), iterations."""

    Options = SegPGDOptions
    needs_gradient = True
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = _labels_required(y, "segpgd")
        return {e: segpgd(ctx, x, y, e, self.options.step, self.options.iterations) for e in epsilons}


# ---------------------------------------------------------------------------------------------------- CosPGD

def cospgd_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """CosPGD's loss (Agnihotri, Jung and Keuper, ICML 2024, Algorithm 1): each pixel's cross-entropy L_i scaled
    by the cosine similarity between its softmax prediction and its one-hot label, a constant of the step (no
    gradient flows through it), so pixels the model still gets right weigh most, and pixels already fooled
    little; summed over the labelled pixels over their count.

    L_i is the (class-weighted, as eq. 1 of Klingner et al.) cross-entropy; void pixels are left out.
    """
    per_pixel = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE_INDEX, reduction="none")
    valid = y != IGNORE_INDEX
    target = F.one_hot(torch.where(valid, y, 0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    scale = F.cosine_similarity(logits.softmax(1), target, dim=1).detach()
    return (scale * per_pixel)[valid].sum() / valid.sum().clamp_min(1)


def cospgd(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float, step: float = 1.0,
           iterations: int | None = None, random_start: bool = True) -> torch.Tensor:
    """CosPGD: from a uniform random start in the L∞ ε-ball (each image's own draw, ``ctx.image_noise``: the
    same whatever the batch, the ranks or the device), signed steps of ``step`` gray values on ``cospgd_loss``,
    each projected onto the ε-ball and [0, 255]; Kurakin's iteration count by default."""
    iterations = pgd_iterations(eps) if iterations is None else iterations
    x_adv = x.clone()
    if random_start:
        x_adv = clip_image(x + (2 * ctx.image_noise(x, "rand", "cospgd", eps) - 1) * eps)
    for _ in range(iterations):
        grad = ctx.gradient(x_adv, lambda logits: cospgd_loss(logits, y, ctx.class_weights))
        x_adv = project(x_adv + step * torch.sign(grad), x, eps)
    return x_adv


class CosPGDOptions(PerturbationOptions):
    step: float = Field(1.0, gt=0, description="step size in gray values")
    iterations: int | None = Field(None, ge=1, description="null: ceil(min(ε+4, 1.25ε))")
    random_start: bool = Field(True, description="start at a uniform random point of the ε-ball (the paper's)")


class CosPGD(Perturbation):
    """CosPGD (Agnihotri et al. 2024): PGD on the pixel-wise cross-entropy scaled by the cosine similarity of the
    prediction to the label; options step (1), iterations, random_start (true)."""

    Options = CosPGDOptions
    needs_gradient = True
    iterative = True

    def sweep(self, ctx, x, y, epsilons):
        y = _labels_required(y, "cospgd")
        o = self.options
        return {e: cospgd(ctx, x, y, e, o.step, o.iterations, o.random_start) for e in epsilons}


# ------------------------------------------------------------------------------- universal perturbation

def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: a saved perturbation is only reused for the model it was learnt on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def learn_uap(ctx: AttackContext, dataset, eps: float, epochs: int = 5, batch_size: int = 8,
              step: float | None = None, images: int | None = None, direction=None) -> torch.Tensor:
    """A universal adversarial perturbation ξ (3, H, W) for segmentation (Metzen et al., ICCV 2017 style).

    Maximises the mean J^ce (eq. 1) of the images x + ξ over the training set: each batch takes a signed gradient
    step on ξ (size ``step``, default ε/10), ξ is projected onto the L∞ ε-ball, x + ξ is clipped to [0, 255].
    ``direction(ctx, x, x + ξ, y)`` replaces the step's direction (per image; summed over the batch): a targeted
    universal perturbation descends its own loss towards targets made from the clean images
    (``mtkit_attacks.targeted``).
    """
    step = eps / 10 if step is None else step
    n = len(dataset) if images is None else min(images, len(dataset))
    if n == 0:
        raise MtkitError("uap: the training dataset is empty")
    xi: torch.Tensor | None = None
    device = next(ctx.model.parameters()).device
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=ctx.generator)[:n].tolist()
        for i in range(0, n, batch_size):
            batch = [dataset[j] for j in order[i:i + batch_size]]
            x = torch.stack([b["image"] for b in batch]).to(device)
            y = torch.stack([b["label"] for b in batch]).to(device)
            if xi is None:
                xi = torch.zeros(x.shape[1:], device=device)
            grad = (ctx.input_gradient(clip_image(x + xi), y) if direction is None
                    else direction(ctx, x, clip_image(x + xi), y)).sum(0)
            xi = (xi + step * fgsm_direction(grad)).clamp(-eps, eps)
    assert xi is not None
    return xi


def save_uap(path: Path, xi: torch.Tensor, eps: float, fingerprint: str, meta: dict[str, Any]) -> Path:
    atomic_torch_save({"perturbation": xi.cpu(), "epsilon": eps, "model": fingerprint, "meta": meta}, path)
    return path


def load_uap(path: Path, fingerprint: str | None = None) -> torch.Tensor:
    """A saved perturbation (weights_only load); refuses one learnt on another model."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MtkitError(f"cannot read universal perturbation {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or "perturbation" not in data:
        raise MtkitError(f"{path} is not a universal perturbation file (no 'perturbation' entry)")
    if fingerprint is not None and data.get("model") != fingerprint:
        raise MtkitError(f"{path} was learnt on another model ({data.get('model')}, this one is {fingerprint}); "
                         "delete it or point options.folder elsewhere")
    return data["perturbation"]


class UAPOptions(PerturbationOptions):
    dataset: DatasetConfig = Field(description="the training images to learn the perturbation on, e.g. "
                                               "{name: synthetic, split: train, options: {domain: city}}")
    epochs: int = Field(5, ge=1)
    images: int | None = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    step: float | None = Field(None, gt=0, description="null: ε/10")
    folder: str | None = Field(None, description="where learnt perturbations are saved (default: the cache)")


class UniversalPerturbation(Perturbation):
    """Universal adversarial perturbation (Metzen et al. 2017 style): learnt over options.dataset, saved, added."""

    Options = UAPOptions
    needs_gradient = True

    def __init__(self, options: UAPOptions | None = None) -> None:
        if options is None:
            raise MtkitError("uap needs robustness.options.uap.dataset: the training images to learn the "
                             "perturbation on, e.g. {name: synthetic, split: train, options: {domain: city}}")
        super().__init__(options)
        o = options
        self.dataset_cfg = o.dataset
        self.epochs, self.images, self.batch_size, self.step = o.epochs, o.images, o.batch_size, o.step
        self.folder = Path(o.folder) if o.folder else None
        self._cache: dict[tuple[str, float, int, int], torch.Tensor] = {}
        self._fingerprints: dict[int, str] = {}
        self.files: list[Path] = []

    #: the file name's prefix of the saved perturbations
    prefix = "uap"

    def _folder(self) -> Path:
        return self.folder or cache_dir() / "uap"

    def extra_key(self) -> Any:
        """What else the saved perturbation depends on (a targeted one: its target)."""
        return None

    def learn(self, ctx: AttackContext, dataset, eps: float) -> torch.Tensor:
        return learn_uap(ctx, dataset, eps, self.epochs, self.batch_size, self.step, self.images)

    def perturbation_for(self, ctx: AttackContext, eps: float, size: tuple[int, int]) -> torch.Tensor:
        """The perturbation for this model, ε and image size: from memory, from its file, or learnt and saved."""
        fp = self._fingerprints.get(id(ctx.model)) or model_fingerprint(ctx.model)
        self._fingerprints[id(ctx.model)] = fp
        key = (fp, eps, *size)
        if key in self._cache:
            return self._cache[key]
        cfg = self.dataset_cfg.model_copy(update={"height": size[0], "width": size[1]})
        meta = {"dataset": cfg.model_dump(), "epochs": self.epochs, "images": self.images,
                "batch_size": self.batch_size, "step": self.step}
        path = self._folder() / f"{self.prefix}-{fp}-{config_hash(meta, eps, self.extra_key())}.pt"
        if path.is_file():
            xi = load_uap(path, fp)
        else:
            xi = self.learn(ctx, build_dataset(cfg), eps)
            save_uap(path, xi, eps, fp, meta)
        self.files.append(path)
        device = next(ctx.model.parameters()).device
        self._cache[key] = xi.to(device)
        return self._cache[key]

    def sweep(self, ctx, x, y, epsilons):
        size = (x.shape[-2], x.shape[-1])
        return {e: clip_image(x + self.perturbation_for(ctx, e, size)) for e in epsilons}


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    from .targeted import DAG, GDUAP, MetzenDynamic, MetzenDynamicUAP, MetzenStatic, MetzenStaticUAP

    registry.add("perturbation", "mifgsm", MIFGSM)
    registry.add("perturbation", "segpgd", SegPGD)
    registry.add("perturbation", "cospgd", CosPGD)
    registry.add("perturbation", "uap", UniversalPerturbation)
    registry.add("perturbation", "metzen_static", MetzenStatic)
    registry.add("perturbation", "metzen_dynamic", MetzenDynamic)
    registry.add("perturbation", "metzen_static_uap", MetzenStaticUAP)
    registry.add("perturbation", "metzen_dynamic_uap", MetzenDynamicUAP)
    registry.add("perturbation", "dag", DAG)
    registry.add("perturbation", "gd_uap", GDUAP)
