"""The device stand-in: the ``meta`` device catches, on a CPU-only machine, the two GPU defects that the CPU suite
cannot see. A CPU tensor that meets a device tensor raises ("Tensor on device cpu is not on the expected device
meta"); a value read back (``.item()``, ``bool(t)``, ``nonzero``) raises; and every copy from the CPU onto the
device is counted, which on a GPU is a blocking host-to-device copy (PyTorch follows it with
``cudaStreamSynchronize``) that drains the launch queue.

Seams, each in the code and said where it is: autocast has no meta backend (``mtkit.core.runtime.fp32`` is a
no-op there), and the optimizer is built non-fused on meta (``StepEngine.build``: fused Adam only on devices that
run it). Everything else runs the production code unchanged: the model, its losses and the batch live on meta,
with every warp of the depth loss batched as on a GPU (``scales_per_pass`` = all)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from support import tiny_recipe
from torch.utils._python_dispatch import TorchDispatchMode

import mtkit
from mtkit.recipe.load import validate
from mtkit.training.step import StepEngine

META = torch.device("meta")
PACKAGES = (str(Path(mtkit.__file__).parent), "mtkit_attacks", "mtkit_corruptions", "mtkit_edges")
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.lift_fresh_copy.default}


def _caller() -> str:
    """Where in mtkit (or a shipped plugin) the current operation was called from."""
    frames = [f for f in traceback.extract_stack() if any(p in f.filename for p in PACKAGES)]
    return f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"


class HostCopies(TorchDispatchMode):
    """Records every copy of a CPU tensor of more than one element onto the meta device, with where in mtkit it was
    made (0-dim CPU tensors are scalars: a GPU kernel takes them as arguments). ``torch.tensor(data, device=...)``
    and ``torch.as_tensor`` copy inside their constructor, where no dispatch mode sees it: they are watched
    directly while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __enter__(self):
        self._patch = pytest.MonkeyPatch()
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)

            def watched(data, *args, real=real, name=name, **kwargs):
                out = real(data, *args, **kwargs)
                if isinstance(out, torch.Tensor) and out.device == META and out.dim() > 0:
                    self.copies.append(f"torch.{name} at {_caller()}")
                return out
            self._patch.setattr(torch, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in COPIES and isinstance(out, torch.Tensor) and out.device == META:
            sources = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(s.device.type == "cpu" and s.dim() > 0 for s in sources):
                self.copies.append(f"{func} at {_caller()}")
        return out


def _engine(model: int) -> StepEngine:
    recipe = validate(tiny_recipe(**{"train.amp": "off", "train.channels_last": False}))
    engine = StepEngine(recipe, recipe.models[model])
    engine.device = META
    engine.build(torch.ones(19))
    if engine.depth_loss is not None:
        engine.depth_loss.scales_per_pass = engine.depth_loss.num_scales  # every warp in one batch, as on a GPU
    return engine


def _batch(multitask: bool) -> tuple[dict, dict | None]:
    seg = {"image": torch.zeros(2, 3, 32, 64, device=META), "label": torch.zeros(2, 32, 64, dtype=torch.long,
                                                                                 device=META)}
    if not multitask:
        return seg, None
    k = torch.zeros(2, 4, 4, device=META)
    return seg, {"frames": torch.zeros(2, 3, 3, 32, 64, device=META), "frames_raw": torch.zeros(2, 3, 3, 32, 64,
                                                                                               device=META), "K": k}


@pytest.mark.parametrize("model", [0, 1], ids=["single-task", "multi-task"])
def test_a_training_step_copies_nothing_from_the_host(model):
    """One optimisation step (forward, eq. 1 + eq. 4 with eq. 5's scaling, backward, Adam) on the stand-in device:
    nothing raises (no CPU tensor meets a device tensor, nothing is read back) and nothing is copied from the CPU.
    Before the fix it found three copies per multi-task step: the pose net's cross-product constant and its
    [0, 0, 0, 1] row, and the grid's (W - 1, H - 1) divisor."""
    engine = _engine(model)
    seg, dep = _batch(model == 1)
    with HostCopies() as spy:
        terms = engine.train_step(seg, dep)
    assert all(t.device == META for t in terms.values())
    assert spy.copies == []
