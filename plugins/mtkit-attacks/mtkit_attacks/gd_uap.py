"""``gd_uap``: Mopuri, Ganeshan, Babu, "Generalizable Data-free Objective for Crafting Universal Adversarial
Perturbations" (TPAMI 2018), the data-free objective: maximise Π_i ‖l_i(δ)‖₂ over the activations l_i of the
network's convolutions for the perturbation alone (on a mid-gray image), i.e. minimise −Σ_i log ‖l_i(δ)‖₂, with
Adam, δ clipped to the ε-ball. It needs no data and hooks every ``nn.Conv2d``, so it works for any model
(mtkit's timm encoders, external networks).

Beside the authors' ``val-iisc/GD-UAP`` training loop: they hook the ReLU outputs, mtkit the convolutions (a
timm or external model need not use ``nn.ReLU`` modules); their step is Adam with learning rate 0.1 at
ξ = 10, and they rescale δ when the objective saturates, which mtkit does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import PositiveInt

from mtkit.plugin_api import (
    AttackContext,
    Field,
    MtkitError,
    Perturbation,
    PerturbationOptions,
    cache_dir,
    clip_image,
    config_hash,
)

from .uap import load_uap, model_fingerprint, save_uap


def gd_uap_loss(activations: list[torch.Tensor]) -> torch.Tensor:
    """GD-UAP's data-free loss: −Σ_i log ‖l_i‖₂ over the activations (minimising it maximises Π_i ‖l_i‖₂)."""
    return -sum(torch.log(a.float().norm() + 1e-12) for a in activations)


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
    epsilon_meaning = "one universal ξ in the L∞ ε-ball for every image: RMS ≤ ε, measured below"

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
