"""The device stand-in: the ``meta`` device catches, on a CPU-only machine, the two GPU defects that the CPU suite
cannot see. A CPU tensor that meets a device tensor raises ("Tensor on device cpu is not on the expected device
meta"); a value read back (``.item()``, ``bool(t)``, ``nonzero``) raises; and every copy from the CPU onto the
device is counted, which on a GPU is a blocking host-to-device copy (PyTorch follows it with
``cudaStreamSynchronize``) that drains the launch queue.

Seams, each in the code and said where it is: autocast has no meta backend (``mtkit.core.precision.fp32`` is a
no-op there), and the optimizer is built non-fused on meta (``StepEngine.build``: fused Adam only on devices that
run it). Everything else runs the production code unchanged: the model, its losses and the batch live on meta,
with every warp of the depth loss batched as on a GPU (``scales_per_pass`` = all). Covered: one single-task and
one multi-task training step, one iteration of every gradient attack (FGSM, PGD, APGD, MI-FGSM, SegPGD, CosPGD,
O-PGD, Metzen static and dynamic, DAG) and the attack detector's measures; the noise draws are in
``tests/test_philox.py``."""

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
    Before the fix it found three copies in every multi-task step: the pose net's cross-product constant and its
    [0, 0, 0, 1] row, and the grid's (W - 1, H - 1) divisor; they are now copied once per device and size, by
    the first step (``ops.geometry.device_constant``), and the step after it copies nothing."""
    engine = _engine(model)
    seg, dep = _batch(model == 1)
    engine.train_step(seg, dep)  # the first step copies the geometry's small constants once (device_constant)
    with HostCopies() as spy:
        terms = engine.train_step(seg, dep)
    assert all(t.device == META for t in terms.values())
    assert spy.copies == []


ATTACKS = {"fgsm": {}, "pgd": {"iterations": 1, "restarts": 2, "random_start": True}, "apgd": {"iterations": 1},
           "mifgsm": {"iterations": 1},
           "segpgd": {"iterations": 1}, "cospgd": {"iterations": 1}, "opgd": {"iterations": 1},
           "metzen_static": {"iterations": 1}, "metzen_dynamic": {"iterations": 1}, "dag": {"iterations": 1}}


@pytest.fixture(scope="module")
def meta_model():
    from mtkit.recipe.build import build_model

    recipe = validate(tiny_recipe())
    torch.manual_seed(0)
    model = build_model(recipe.model, ("segmentation", "depth"), 0.1).eval().to(META)
    return model, model.segmenter().eval()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_attack_iteration_copies_nothing_from_the_host(name, meta_model, tmp_path):
    """One iteration of every gradient attack (the built-in ones and mtkit-attacks'), at two ε batched as the
    sweep batches them, on the stand-in device: nothing raises and nothing is copied from the CPU. The targets of
    Metzen's attacks are made before the iterations, once per batch (``Perturbation.targets_of``): the static
    target from its file once per model and size, the dynamic one by a Euclidean distance transform on the CPU
    (the one host step left, outside the iterations); here they are given on the device."""
    import numpy as np

    from mtkit.perturbations import AttackContext, Targets
    from mtkit.recipe.build import build_perturbation

    model, segmenter = meta_model
    options = dict(ATTACKS[name])
    if name == "metzen_static":
        np.save(tmp_path / "target.npy", np.zeros((32, 64), dtype=np.int64))
        options["target_file"] = str(tmp_path / "target.npy")
    pert = build_perturbation(name, options)
    x = torch.zeros(2, 3, 32, 64, device=META)
    y = torch.zeros(2, 32, 64, dtype=torch.long, device=META)
    ctx = AttackContext(segmenter, None, torch.Generator(), 0, [0, 1], None, 4, model)
    if name.startswith("metzen"):
        labels = torch.zeros(2, 32, 64, dtype=torch.long, device=META)
        hidden = pert.options.hidden_class if name == "metzen_dynamic" else None
        ctx.memo[("targets", id(pert))] = Targets(labels, "dynamic" if hidden else "static", hidden, labels.clone())
    with HostCopies() as spy:
        out = pert.sweep(ctx, x, y, [1.0, 4.0])
    assert sorted(out) == [1.0, 4.0] and out[4.0].device == META
    assert spy.copies == []


def test_the_detectors_measures_copy_nothing_from_the_host(meta_model):
    """The attack detector's edge-consistency measures (and the labels it predicts on the way) on the device."""
    from mtkit.recipe.build import build_detector

    model, _ = meta_model
    with HostCopies() as spy:
        measures, labels = build_detector("edge_consistency", {}).measures_and_prediction(
            model, torch.zeros(2, 3, 32, 64, device=META))
    assert measures.shape == (2, 3) and labels.device == META and spy.copies == []
