"""A universal adversarial perturbation: one ε-bounded perturbation for every image, learnt on a training split,
fingerprinted by the model and cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mtkit.plugin_api import (
    AttackContext,
    DatasetConfig,
    Field,
    MtkitError,
    Perturbation,
    PerturbationOptions,
    atomic_torch_save,
    build_dataset,
    cache_dir,
    clip_image,
    config_hash,
    fgsm_direction,
)


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
            grad = (ctx.input_gradient(clip_image(x + xi), y) if direction is None  # the batch's indices: the
                    else direction(replace(ctx, indices=order[i:i + batch_size]), x, clip_image(x + xi), y)).sum(0)
            xi = (xi + step * fgsm_direction(grad)).clamp(-eps, eps)
    assert xi is not None
    return xi


def save_uap(path: Path, xi: torch.Tensor, eps: float, fingerprint: str, meta: dict[str, Any]) -> Path:
    atomic_torch_save({"perturbation": xi.cpu(), "epsilon": eps, "model": fingerprint, "meta": meta}, path)
    return path


def load_uap(path: Path, fingerprint: str | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A saved perturbation (weights_only load); refuses one learnt on another model, or one that is not a
    finite (3, H, W) tensor of the images' ``size``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MtkitError(f"cannot read universal perturbation {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or "perturbation" not in data:
        raise MtkitError(f"{path} is not a universal perturbation file (no 'perturbation' entry)")
    if fingerprint is not None and data.get("model") != fingerprint:
        raise MtkitError(f"{path} was learnt on another model ({data.get('model')}, this one is {fingerprint}); "
                         "delete it or point options.folder elsewhere")
    xi = data["perturbation"]
    expected = f"(3, {size[0]}, {size[1]})" if size else "(3, H, W)"
    if not isinstance(xi, torch.Tensor) or xi.ndim != 3 or xi.shape[0] != 3 or not xi.is_floating_point() or (
            size is not None and tuple(xi.shape[1:]) != tuple(size)) or not bool(torch.isfinite(xi).all()):
        got = tuple(xi.shape) if isinstance(xi, torch.Tensor) else type(xi).__name__
        raise MtkitError(f"{path}: its perturbation is {got}"
                         f"{'' if not isinstance(xi, torch.Tensor) else f' {xi.dtype}'}, expected finite floats of "
                         f"shape {expected} (the images' size); delete it to learn it again")
    return xi


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
    epsilon_meaning = "one universal ξ in the L∞ ε-ball for every image: RMS ≤ ε, measured below"

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
            xi = load_uap(path, fp, size)
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
