"""What a training checkpoint holds and how a trainer is restored from one: the weights, the loop's position
(epoch, step, step within the epoch), the best validation mIoU and the history, the recipe and spec it trained, and
for a resumable ``last.pt`` the optimizer, scheduler, loss-scaler and RNG states."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import checkpoint as ckpt
from ..core.errors import CheckpointError

if TYPE_CHECKING:
    from .trainer import Trainer

FORMAT = "mtkit-checkpoint-1"


def checkpoint_payload(tr: Trainer, resumable: bool = True) -> dict[str, Any]:
    """What a checkpoint of ``tr`` holds; ``resumable`` adds optimizer, scheduler and RNG states (last.pt), which
    the best weights (best.pt, for evaluation and deployment) do without: a third of the size with Adam."""
    e = tr.engine
    payload = {
        "format": FORMAT,
        "model": e.model.state_dict(),
        "epoch": tr.epoch, "step": tr.step, "step_in_epoch": tr.step_in_epoch,
        "best": tr.best if math.isfinite(tr.best) else None,
        "recipe": tr.recipe.to_dict(),
        "spec": tr.spec.model_dump(by_alias=True),
        "seed": tr.seed,
        "class_weights": e.weights,
        "class_weights_key": tr.weights_key,
        "history": tr.history,
    }
    if resumable:
        payload.update(optimizer=e.optimizer.state_dict(), scheduler=ckpt.scheduler_state(e.scheduler),
                       rng=ckpt.rng_state(), scaler=e.scaler.state_dict())
    return payload


def restore(tr: Trainer, path: Path) -> bool:
    """Continue ``tr`` from the resumable checkpoint at ``path``: weights, optimizer, schedule, scaler, the loop's
    position and the RNG states. A weights-only checkpoint (best.pt) is refused with the reason."""
    data = ckpt.load_checkpoint(path)
    if "optimizer" not in data or "rng" not in data:
        raise CheckpointError(f"{path} holds weights only (a best.pt-style checkpoint): it cannot be "
                              "resumed; resume needs the last.pt that training wrote")
    e = tr.engine
    e.model.load_state_dict(data["model"])
    e.optimizer.load_state_dict(data["optimizer"])
    ckpt.load_scheduler_state(e.scheduler, data["scheduler"])
    if data.get("scaler"):
        e.scaler.load_state_dict(data["scaler"])
    tr.epoch, tr.step, tr.step_in_epoch = data["epoch"], data["step"], data["step_in_epoch"]
    tr.best = -math.inf if data["best"] is None else data["best"]
    tr.history = list(data.get("history", []))
    ckpt.set_rng_state(data["rng"])
    return True
