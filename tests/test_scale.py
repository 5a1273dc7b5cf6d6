"""The paths a GPU run takes, proven on the CPU: bf16 / fp16 autocast, channels_last and torch.compile for training
and evaluation, attack gradients in fp32, the batched ε sweep, and evaluation sharded over 2 gloo ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from support import tiny_recipe

from mtkit.core.precision import Precision
from mtkit.evaluation.robustness import evaluate_checkpoint, load_model
from mtkit.evaluation.sweep import activation_bytes, pass_size, robustness_sweep
from mtkit.ops.philox import image_keys, random_words, uniform
from mtkit.perturbations import (
    AttackContext,
    clip_image,
    fgsm_direction,
    pgd_iterations,
    pgd_sweep,
    project,
)
from mtkit.recipe.build import build_perturbation
from mtkit.recipe.load import validate
from mtkit.training.state import checkpoint_payload
from mtkit.training.step import StepEngine
from mtkit.training.trainer import Trainer

# Tolerances, relative to fp32 eager on the CPU: loss |Δ|/loss, gradient ‖Δ‖/‖g‖ over all parameters.
LOSS_TOL = {"bf16": 2e-2, "fp16": 5e-3, "channels_last": 1e-5, "compile": 1e-4}
GRAD_TOL = {"bf16": 0.1, "fp16": 2e-2, "channels_last": 1e-4, "compile": 1e-3}
# mIoU (in [0, 1]) of a robustness sweep with FGSM and PGD, absolute
MIOU_TOL = {"bf16": 0.02, "channels_last": 1e-3, "compile": 1e-3}


def _trainer(tmp_path, device: torch.device | str = "cpu", **train) -> StepEngine:
    recipe = validate(tiny_recipe(device=str(device), **{f"train.{k}": v for k, v in train.items()}))
    tr = StepEngine(recipe, recipe.models[0])
    tr.build(None)
    return tr


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(n, 3, 32, 64, generator=g) * 255, "label": torch.randint(0, 19, (n, 32, 64),
                                                                                        generator=g)}


def _step(tr: StepEngine, batch) -> tuple[float, torch.Tensor]:
    loss = float(tr.train_step(batch, None)["seg"])
    grads = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None]).cpu()
    return loss, grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory, device):
    """The fp32 eager step on the device under test (CUDA: IEEE fp32, no TF32)."""
    from mtkit.core.precision import math_mode

    with math_mode(tf32=False):
        return _step(_trainer(tmp_path_factory.mktemp("fp32"), device, amp="off", channels_last=False), _batch())


@pytest.mark.parametrize("mode", ["bf16", "fp16", "channels_last"])
def test_a_training_step_in_each_precision_matches_fp32(mode, reference, tmp_path, device):
    from mtkit.core.precision import math_mode

    settings = {"bf16": dict(amp="bf16"), "fp16": dict(amp="fp16"), "channels_last": dict(channels_last=True)}[mode]
    tr = _trainer(tmp_path, device, **{"amp": "off", "channels_last": False, **settings})
    assert tr.precision.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    with math_mode(tf32=False):
        loss, grads = _step(tr, _batch())
    ref_loss, ref_grads = reference
    assert abs(loss - ref_loss) / ref_loss < LOSS_TOL[mode]
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < GRAD_TOL[mode]
    if mode == "fp16":
        trainer = Trainer(tr.recipe, tr.spec, tmp_path, progress=False)
        trainer.engine = tr
        assert tr.scaler.is_enabled() and "scaler" in checkpoint_payload(trainer)
    if mode == "channels_last":
        assert next(tr.model.encoder.parameters()).is_contiguous(memory_format=torch.channels_last)


def test_compiled_training_matches_eager_and_does_not_recompile_every_step(reference, tmp_path, device):
    """inductor (gcc on this machine; triton on a GPU): the first step compiles, the next two reuse the graphs."""
    from torch._dynamo.utils import counters

    from mtkit.core.precision import math_mode

    torch._dynamo.reset()
    tr = _trainer(tmp_path, device, amp="off", channels_last=False, compile=True)
    with math_mode(tf32=False):
        loss, grads = _step(tr, _batch())
    ref_loss, ref_grads = reference
    assert abs(loss - ref_loss) / ref_loss < LOSS_TOL["compile"]
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < GRAD_TOL["compile"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for _ in range(2):
        tr.train_step(_batch(), None)
    assert counters["stats"]["unique_graphs"] == graphs, "torch.compile recompiled on a later step"


def test_attack_gradients_are_fp32_under_autocast(trained):
    """Inside a bf16 autocast region the attack's input gradient equals the fp32 one exactly; the bf16 gradient
    itself flips the sign of small entries (why attacks do not take it)."""
    loaded, _, x, y = trained
    ctx = AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator())
    fp32 = ctx.input_gradient(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ctx.input_gradient(x, y)
        xx = x.clone().requires_grad_(True)
        ctx_loss = ctx.objective(loaded.segmenter(xx).float(), y)
    (bf16,) = torch.autograd.grad(ctx_loss, xx)
    assert torch.equal(inside, fp32)
    flipped = float((fgsm_direction(bf16) != fgsm_direction(fp32)).float().mean())
    assert flipped > 0.001, f"bf16 gradients flip {flipped:.2%} of the signs"


@pytest.fixture(scope="module")
def sweep_setup(trained):
    loaded, ds, _, _ = trained
    perts = {"fgsm": build_perturbation("fgsm"), "pgd": build_perturbation("pgd", {"iterations": {4.0: 3}}),
             "gaussian": build_perturbation("gaussian"), "salt_pepper": build_perturbation("salt_pepper")}
    return loaded, ds, perts


def _rows(sweep) -> list[tuple]:
    """Everything of a sweep's rows but the timing."""
    return [(sweep.clean.miou,)] + [(r.perturbation, r.level, r.miou, r.epsilon_measured,
                                     r.epsilon_measured_per_image.model_dump(), r.backward_passes_per_batch,
                                     r.per_class_iou) for r in sweep.rows]


@pytest.mark.parametrize("mode", ["bf16", "channels_last", "compile"])
def test_a_robustness_sweep_in_each_precision_matches_fp32(mode, sweep_setup, device):
    """FGSM and PGD under autocast / channels_last / torch.compile (aot_eager: the inductor build is proven by
    the training test) against fp32 eager on the same device: every row's mIoU within MIOU_TOL."""
    import copy

    loaded, ds, perts = sweep_setup
    segmenter = copy.deepcopy(loaded.segmenter).to(device)
    attacks = {k: perts[k] for k in ("fgsm", "pgd")}
    # one batch of the 4 images and one ε: every pass has the same shape, so a compiled model compiles once
    ref = robustness_sweep(segmenter, ds, attacks, [4.0], 19, loaded.class_weights, batch_size=4, device=device)
    precision = {"bf16": Precision(torch.bfloat16, device_type=device.type),
                 "channels_last": Precision(channels_last=True, device_type=device.type),
                 "compile": Precision(compile="aot_eager", device_type=device.type)}[mode]
    got = robustness_sweep(segmenter, ds, attacks, [4.0], 19, loaded.class_weights, batch_size=4,
                           precision=precision, device=device)
    assert abs(got.clean.miou - ref.clean.miou) < MIOU_TOL[mode]
    for a, b in zip(got.rows, ref.rows):
        assert (a.perturbation, a.level) == (b.perturbation, b.level)
        assert abs(a.miou - b.miou) < MIOU_TOL[mode], (a.perturbation, a.level, a.miou, b.miou)


def test_the_batched_sweep_equals_the_per_epsilon_sweep_exactly(sweep_setup):
    """pgd_sweep stacks the ε copies (each iterating to its own count, each image's random start its own draw) and
    equals the textbook PGD loop at each ε in turn element for element, in one pass or in passes of one copy; the
    sweep's rows do not depend on how many images a pass holds."""

    def per_epsilon(ctx, e):  # the per-ε loop written out: random start, then FGSM steps and projection
        # each image's uniform start from its own Philox stream (mtkit.ops.philox, checked against its known answers)
        start = torch.stack([uniform(random_words(image_keys(0, [i], "cpu", "random_start", "pgd", e, 0),
                                                  x[0].numel()))[0].view(x.shape[1:]) for i in range(x.shape[0])])
        x_adv = clip_image(x + (2 * start - 1) * e)
        for _ in range(pgd_iterations(e, {4.0: 3})):
            x_adv = project(x_adv + fgsm_direction(ctx.input_gradient(x_adv, y)), x, e)
        return x_adv

    loaded, ds, perts = sweep_setup
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    x, y = batch["image"], batch["label"]
    eps = [0.5, 2.0, 4.0]
    for pass_images in (None, 3):
        ctx = AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator().manual_seed(5),
                            pass_images=pass_images)
        batched = pgd_sweep(ctx, x, y, eps, iterations={4.0: 3}, random_start=True)
        one = AttackContext(loaded.segmenter, loaded.class_weights, torch.Generator().manual_seed(5))
        for e in eps:
            assert torch.equal(batched[e], per_epsilon(one, e)), e
    whole = robustness_sweep(loaded.segmenter, ds, perts, eps, 19, loaded.class_weights, batch_size=2)
    single = robustness_sweep(loaded.segmenter, ds, perts, eps, 19, loaded.class_weights, batch_size=2,
                              pass_images=1)
    assert _rows(whole) == _rows(single)


def test_automatic_sizes_fit_the_memory_and_change_no_number(sweep_setup, monkeypatch):
    """auto: half the free memory over the bytes autograd saves for one image; the rows equal a fixed batch's."""
    loaded, ds, perts = sweep_setup
    cpu = torch.device("cpu")
    per_image = activation_bytes(loaded.segmenter, (3, 32, 64), cpu)
    assert per_image > 3 * 32 * 64 * 4
    monkeypatch.setattr("mtkit.evaluation.sweep.available_memory", lambda device: 20 * per_image)
    assert pass_size(loaded.segmenter, (3, 32, 64), cpu) == 10
    # on a CPU no pass holds more than CPU_PASS_BYTES of activations, however much memory is free
    import mtkit.evaluation.sweep

    cap = mtkit.evaluation.sweep.CPU_PASS_BYTES
    monkeypatch.setattr("mtkit.evaluation.sweep.CPU_PASS_BYTES", 4 * per_image)
    assert pass_size(loaded.segmenter, (3, 32, 64), cpu) == 4
    monkeypatch.setattr("mtkit.evaluation.sweep.CPU_PASS_BYTES", cap)
    attacks = {k: perts[k] for k in ("fgsm", "pgd")}
    sizes = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr("mtkit.evaluation.sweep.DataLoader", lambda *a, **k: sizes.append(len(k["batch_sampler"][0]))
                        or real(*a, **k))
    auto = robustness_sweep(loaded.segmenter, ds, attacks, [1.0, 4.0], 19, loaded.class_weights,
                            batch_size="auto", pass_images="auto")
    fixed = robustness_sweep(loaded.segmenter, ds, attacks, [1.0, 4.0], 19, loaded.class_weights, batch_size=2)
    assert sizes == [4, 2]  # auto: 10 images per pass // 2 ε copies = 5 per batch (the set has 4)
    assert _rows(auto) == _rows(fixed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, checkpoint: str, recipe: dict, out: str) -> None:
    """One torchrun-style rank: join a gloo group, evaluate (sharded), rank 0 saves the rows."""
    import torch.distributed as dist

    from mtkit.recipe.prepare import prepared_dataset
    from mtkit.training.validate import confusion_on

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = validate(recipe)
        loaded = load_model(checkpoint)
        res = evaluate_checkpoint(loaded, r, ["CS"], 0)
        conf = confusion_on(loaded.segmenter, prepared_dataset(r, "data.eval.CS"), 19, 3, torch.device("cpu"))
        if rank == 0:
            torch.save({"rows": _result_rows(res), "conf": conf}, out)
    finally:
        dist.destroy_process_group()


def _result_rows(res) -> list[tuple]:
    return [(c.dataset, c.miou) for c in res.clean] + [
        (r.perturbation, r.level, r.miou, r.epsilon_measured, r.epsilon_measured_per_image.model_dump(),
         r.backward_passes_per_batch) for r in res.robustness]


def test_evaluation_sharded_over_two_gloo_ranks_equals_one_process(trained, tmp_path):
    """4 images in batches of 3: rank 0 takes images 0-2, rank 1 image 3 (no padding, nothing counted twice);
    clean mIoU, FGSM, PGD and Gaussian rows and the validation counts equal a single process's exactly."""
    loaded = trained[0]
    checkpoint = tmp_path / "model.pt"
    torch.save(loaded.checkpoint, checkpoint)
    recipe = tiny_recipe(**{"robustness.batch_size": 3, "robustness.perturbations": ["fgsm", "pgd", "gaussian"],
                            "robustness.epsilons": [1.0, 4.0]})
    from mtkit.recipe.prepare import prepared_dataset
    from mtkit.training.validate import confusion_on

    r = validate(recipe)
    single = _result_rows(evaluate_checkpoint(load_model(checkpoint), r, ["CS"], 0))
    conf = confusion_on(loaded.segmenter, prepared_dataset(r, "data.eval.CS"), 19, 3, torch.device("cpu"))
    out = tmp_path / "ranks.pt"
    mp.start_processes(_rank, args=(2, _free_port(), str(checkpoint), recipe, str(out)), nprocs=2,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert got["rows"] == single
    assert torch.equal(got["conf"], conf)
