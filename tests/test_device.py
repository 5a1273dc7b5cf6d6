"""The GPU path: every perturbation on the device under test (the `device` fixture: the CPU, and CUDA where a GPU is
present), per-image random draws independent of the batch, the rank count and the device; the distributed set-up,
checkpoints, memory sizing and the math policy a GPU run depends on (CUDA simulated where the machine has none)."""

from __future__ import annotations

import copy

import pytest
import torch

from mtkit.core import checkpoint, precision, runtime
from mtkit.core.schema import ModelConfig
from mtkit.perturbations import AttackContext, draw, image_generator
from mtkit.recipe.build import build_model, build_perturbation

# every gradient attack with its random start on where it has one, iterations kept small
OPTIONS = {"pgd": {"iterations": 2, "random_start": True}, "apgd": {"iterations": 3, "random_start": True},
           "mifgsm": {"iterations": 2}, "segpgd": {"iterations": 2},
           "cospgd": {"iterations": 2, "random_start": True},
           "metzen_static": {"iterations": 2, "target_index": 1, "target_dataset": {
               "name": "synthetic", "split": "val", "options": {"domain": "city", "sequences": 2, "frames": 8}}},
           "metzen_dynamic": {"iterations": 2, "hidden_class": 0}, "dag": {"iterations": 3},
           "gd_uap": {"iterations": 3}, "opgd": {"iterations": 2}}
#: attacks whose steps follow the gradient's values, not its signs (DAG's γ·r/‖r‖∞): equal across batch sizes up to
#: the rounding of the convolutions, which differs with the batch size
CONTINUOUS = {"dag", "pgd_rms"}
RANDOM = ["gaussian", "salt_pepper", "pgd", "apgd", "cospgd", "corrupt_gaussian_noise", "corrupt_shot_noise"]
EPS = [1.0, 4.0]


def _perturbations() -> list[str]:
    """Every registered perturbation but the universal ones learnt over a dataset (tests/test_plugins.py,
    tests/test_targeted.py) and the corruptions other than two random ones (CPU code: the device path is the same
    for all)."""
    from mtkit.plugins.manager import get_registry

    names = get_registry().names("perturbation")
    return [n for n in names if n not in ("uap", "metzen_static_uap", "metzen_dynamic_uap")
            and (not n.startswith("corrupt_") or n in RANDOM)]


def _run(name: str, segmenter, weights, x, y, indices, device, seed: int = 0) -> dict[float, torch.Tensor]:
    pert = build_perturbation(name, OPTIONS.get(name))
    ctx = AttackContext(segmenter, None if weights is None else weights.to(device), torch.Generator().manual_seed(seed),
                        seed, indices)
    with torch.enable_grad() if pert.needs_gradient else torch.no_grad():
        out = pert.sweep(ctx, x.to(device), y.to(device), pert.levels(EPS))
    return {e: v.detach() for e, v in out.items()}


@pytest.fixture(scope="module")
def on_device(trained, device):
    loaded, _, x, y = trained
    return copy.deepcopy(loaded.segmenter).to(device).eval(), loaded.class_weights, x, y


def _needs_the_corruptions_stack(name: str) -> None:
    """The corruptions run imagecorruptions (OpenCV, scikit-image, pkg_resources): a GPU image without them skips
    those cases with the reason, instead of failing them."""
    if name.startswith("corrupt_"):
        for module in ("cv2", "skimage", "pkg_resources"):
            pytest.importorskip(module, reason=f"{name} needs {module} (imagecorruptions' stack), not installed here")


@pytest.mark.parametrize("name", _perturbations())
def test_every_perturbation_runs_on_the_device_and_does_not_depend_on_the_batch(name, on_device, device):
    """On the device: the result stays there, in [0, 255] and (ε levels) in the L∞ ball or at the requested RMS;
    a batch of 4 equals the same images in batches of 1 and 3 (random draws are per image); on a GPU, the noise
    types equal the CPU's exactly and the attacks nearly (cuDNN sums in another order)."""
    _needs_the_corruptions_stack(name)
    segmenter, weights, x, y = on_device
    whole = _run(name, segmenter, weights, x, y, [0, 1, 2, 3], device)
    parts = [_run(name, segmenter, weights, x[i], y[i], list(range(4))[i], device) for i in (slice(0, 1), slice(1, 4))]
    pert = build_perturbation(name, OPTIONS.get(name))
    for level, adv in whole.items():
        assert adv.device.type == device.type and adv.shape == x.shape
        assert float(adv.min()) >= 0 and float(adv.max()) <= 255
        if pert.level_kind == "epsilon" and pert.needs_gradient and name == "pgd_rms":  # the ball of RMS ε
            rms = (adv.cpu() - x).double().pow(2).flatten(1).mean(1).sqrt()
            assert float(rms.max()) <= level * (1 + 1e-4), (name, level, rms.tolist())
        elif pert.level_kind == "epsilon" and pert.needs_gradient:
            assert float((adv.cpu() - x).abs().max()) <= level + 1e-3
        split = torch.cat([p[level] for p in parts])
        if name in CONTINUOUS:  # unsigned steps carry the convolutions' batch-size rounding (1e-6 relative)
            assert torch.allclose(adv, split, atol=1e-3), (name, level, float((adv - split).abs().max()))
        elif device.type == "cpu" or not pert.needs_gradient:
            assert torch.equal(adv, split), (name, level)
        else:
            assert float((adv != split).float().mean()) < 0.01, (name, level)
    if device.type != "cpu":
        cpu = _run(name, segmenter.cpu(), weights, x, y, [0, 1, 2, 3], torch.device("cpu"))
        segmenter.to(device)
        for level, adv in whole.items():
            if pert.needs_gradient:
                assert float((adv.cpu() - cpu[level]).abs().gt(1e-3).float().mean()) < 0.02, (name, level)
            else:
                assert torch.allclose(adv.cpu(), cpu[level], atol=1e-4), (name, level)


@pytest.mark.parametrize("name", [n for n in RANDOM if not n.startswith("corrupt_")])
def test_random_perturbations_follow_the_evaluation_seed(name, trained):
    """Another evaluation seed gives other draws; the same seed the same (the per-image generators are seeded by
    (seed, image index, perturbation, ε))."""
    loaded, _, x, y = trained
    cpu = torch.device("cpu")
    a = _run(name, loaded.segmenter, loaded.class_weights, x, y, [0, 1, 2, 3], cpu, seed=0)
    b = _run(name, loaded.segmenter, loaded.class_weights, x, y, [0, 1, 2, 3], cpu, seed=0)
    c = _run(name, loaded.segmenter, loaded.class_weights, x, y, [0, 1, 2, 3], cpu, seed=1)
    assert all(torch.equal(a[e], b[e]) for e in a)
    assert not all(torch.equal(a[e], c[e]) for e in a)


def test_draw_uses_the_generator_where_it_lives_and_moves_the_numbers(device):
    """A CPU generator with a CUDA target is what crashed the first GPU run; ``draw`` gives the same numbers on
    every device, and ``image_noise`` each image its own."""
    g = image_generator(0, 5, "gaussian", 1.0)
    on_device = draw("randn", (3, 4, 5), g, device)
    assert on_device.device.type == device.type
    assert torch.equal(on_device.cpu(), torch.randn(3, 4, 5, generator=image_generator(0, 5, "gaussian", 1.0)))
    ctx = AttackContext(torch.nn.Identity(), None, torch.Generator(), 0, [7, 5])
    noise = ctx.image_noise(torch.zeros(2, 3, 4, 5, device=device), "randn", "gaussian", 1.0)
    assert noise.device.type == device.type  # drawn there (Philox-4x32-10 in tensor operations)
    alone = AttackContext(torch.nn.Identity(), None, torch.Generator(), 0, [5]).image_noise(
        torch.zeros(1, 3, 4, 5), "randn", "gaussian", 1.0)
    assert torch.allclose(noise[1].cpu(), alone[0], rtol=0, atol=1e-6)  # image 5's own stream, on any device


def test_pose_and_depth_stay_fp32_under_autocast_and_channels_last_survives_the_concatenation(device):
    """Under bf16 autocast the pose matrices, σ and the disparity are fp32; the encoder gets a channels_last batch
    although the depth images are a slice of the frames."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ("segmentation", "depth"), 0.1).to(device)
    model.to(memory_format=torch.channels_last)
    seen = []
    model.encoder.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    seg = (torch.rand(2, 3, 64, 96) * 255).to(device).contiguous(memory_format=torch.channels_last)
    frames = (torch.rand(2, 3, 3, 64, 96) * 255).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(seg, frames)
    assert seen == [True]
    assert out["seg_logits"].dtype == torch.bfloat16  # the networks themselves do run in bf16
    assert all(v.dtype == torch.float32 for v in out["disp"].values())
    assert all(v.dtype == torch.float32 for v in out["sigma"].values())
    assert all(v.dtype == torch.float32 for v in out["poses"].values())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert model.predict_depth(seg).dtype == torch.float32


# ------------------------------------------------------------------- distributed set-up, simulated CUDA
@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with ``n`` CUDA GPUs as far as mtkit's device logic can tell (no kernel runs)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


def test_every_rank_gets_its_own_gpu_and_the_backend_fits(fake_gpus, monkeypatch):
    fake_gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 2)  # no index: the local rank's GPU
    assert runtime.resolve_device("auto") == torch.device("cuda", 2)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)  # an index is taken as given
    assert runtime.backend_for(torch.device("cuda", 2)) == "nccl"
    assert runtime.backend_for(torch.device("cuda", 1)) == "gloo"  # not this rank's own GPU: ranks may share it
    assert runtime.backend_for(torch.device("cpu")) == "gloo"
    fake_gpus(1)  # two processes sharing one GPU (tools/gpu-check.sh on a one-GPU machine): gloo
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 0)
    assert runtime.backend_for(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv("MTKIT_DIST_BACKEND", "nccl")
    assert runtime.backend_for(torch.device("cuda", 0)) == "nccl"


def test_init_distributed_makes_the_rank_s_gpu_current(fake_gpus, monkeypatch):
    fake_gpus(2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    runtime.init_distributed(torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]


def test_collectives_reduce_where_the_backend_can(monkeypatch):
    """NCCL reduces only device tensors: a CPU count goes through this rank's GPU and comes back; gloo
    reduces on the CPU."""
    seen = []

    def fake_all_reduce(t, op=None):
        seen.append(t.device.type)
        t.mul_(2)  # two ranks with equal counts

    monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(runtime.dist, "get_backend", lambda: "gloo")
    counts = torch.arange(4)
    assert torch.equal(runtime.all_reduce_sum(counts, runtime.Dist(0, 2)), torch.arange(4) * 2)
    assert seen == ["cpu"]
    monkeypatch.setattr(runtime.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # stands in for the copy to cuda:0
    assert runtime.collective_device() == torch.device("cuda", 0)


def test_a_checkpoint_resumes_with_another_number_of_visible_gpus(fake_gpus, monkeypatch):
    """Only the process's own GPU's RNG state is saved; an older checkpoint with every GPU's state resumes on a
    machine that sees fewer."""
    fake_gpus(1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    saved = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved)
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_to.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("would need every GPU"))
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda_device"], saved) and "cuda" not in state
    checkpoint.set_rng_state(state)
    old = {**state, "cuda": [saved + 1, saved + 2, saved + 3, saved + 4]}  # written on a 4-GPU machine
    del old["cuda_device"]
    checkpoint.set_rng_state(old)
    assert torch.equal(set_to[0], saved) and torch.equal(set_to[1], saved + 1)


def test_free_gpu_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    """After training in the same process, the caching allocator keeps its blocks: they are free for the
    evaluation, so ``pass_images: auto`` counts them."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 << 30)
    assert runtime.available_memory(torch.device("cuda", 0)) == (10 + 48) << 30


def test_loader_workers_share_the_node_s_cores_between_ranks(monkeypatch):
    from mtkit.recipe.prepare import default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(None) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers(None) == 1
    assert default_workers(3) == 3  # data.num_workers as the recipe says


def _tf32_getters() -> dict[str, object]:
    """Every getter of the fp32 math policy, PyTorch's old and new: what inductor's autotuning, a library or a
    plugin may read (each must answer: on torch 2.13 a policy set through ``fp32_precision`` made the first three
    raise RuntimeError, "a mix of the legacy and new APIs")."""
    b = torch.backends
    return {"matmul.allow_tf32": b.cuda.matmul.allow_tf32, "cudnn.allow_tf32": b.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "matmul.fp32_precision": b.cuda.matmul.fp32_precision, "conv.fp32_precision": b.cudnn.conv.fp32_precision,
            "fp32_precision": b.fp32_precision, "cudnn.fp32_precision": b.cudnn.fp32_precision}


def _answers(getters: dict[str, object]) -> dict[str, object]:
    """What the getters mean: the flags and the matmul precision (``fp32_precision`` may read "none", inherit,
    before a policy was set and "ieee" after it was restored: the same math)."""
    return {k: v for k, v in getters.items() if "allow_tf32" in k or k == "float32_matmul_precision"}


def test_math_mode_sets_the_tf32_policy_and_restores_it():
    def policy():
        return precision.tf32_flags(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic

    before, getters = policy(), _answers(_tf32_getters())
    with precision.math_mode(tf32=True) as mode:
        got = _tf32_getters()  # every getter answers inside the policy
        assert got["matmul.allow_tf32"] and got["cudnn.allow_tf32"] and got["float32_matmul_precision"] == "high"
        assert got["matmul.fp32_precision"] == got["conv.fp32_precision"] == "tf32"
        assert precision.tf32_flags() == (True, True)
        assert torch.backends.cudnn.benchmark and mode == {"tf32": True, "cudnn_benchmark": True,
                                                            "deterministic": False}
    assert policy() == before and _answers(_tf32_getters()) == getters  # restored (what each getter means)
    with precision.math_mode(tf32=False, deterministic=True):
        got = _tf32_getters()
        assert not got["matmul.allow_tf32"] and not got["cudnn.allow_tf32"]
        assert got["float32_matmul_precision"] == "highest" and got["matmul.fp32_precision"] == "ieee"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    assert policy() == before and not torch.are_deterministic_algorithms_enabled()
    assert _answers(_tf32_getters()) == getters


def test_training_and_evaluation_run_under_their_own_policy(trained, tmp_path, monkeypatch):
    """The trainer's loop runs with TF32 allowed (train.tf32) and the evaluation without (robustness.tf32)."""
    from support import tiny_recipe

    from mtkit.evaluation.robustness import evaluate_checkpoint
    from mtkit.recipe.load import validate

    seen = []
    real = precision.math_mode

    def spy(tf32, deterministic=False):
        seen.append((tf32, deterministic))
        return real(tf32, deterministic)

    monkeypatch.setattr("mtkit.training.trainer.math_mode", spy)
    monkeypatch.setattr("mtkit.evaluation.robustness.math_mode", spy)
    loaded = trained[0]
    recipe = validate(tiny_recipe(**{"robustness.perturbations": ["gaussian"], "robustness.epsilons": [1.0]}))
    evaluate_checkpoint(loaded, recipe, ["CS"], 0)
    assert seen == [(False, False)]
    recipe = validate(tiny_recipe(**{"robustness.tf32": True, "train.deterministic": True,
                                     "robustness.perturbations": ["gaussian"], "robustness.epsilons": [1.0]}))
    evaluate_checkpoint(loaded, recipe, ["CS"], 0)
    from mtkit.training.trainer import train

    train(recipe, "single", tmp_path, progress=False)
    assert seen[1:] == [(True, False), (True, True)]


def test_the_other_ranks_wait_for_rank_0s_preparation_with_a_timeout_of_their_own(monkeypatch):
    """Under torchrun the other ranks wait while rank 0 prepares the data, on the process group's store with
    ``MTKIT_PREPARE_TIMEOUT`` (24 h by default), not at a collective bound by NCCL's 10 minutes: here rank 0 works
    longer than a short timeout allows and the waiting rank stops with the store's timeout, and with a longer one
    it finds rank 0's work done."""
    import threading
    import time

    from torch.distributed import HashStore

    store, done = HashStore(), []

    def rank0():
        runtime.after_rank0(runtime.Dist(0, 2, 0), "prepare", lambda: time.sleep(1.0) or done.append(0), store=store)

    threading.Thread(target=rank0).start()
    monkeypatch.setenv("MTKIT_PREPARE_TIMEOUT", "0.2")
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        runtime.after_rank0(runtime.Dist(1, 2, 0), "prepare", lambda: done.append(1), store=store)
    # the next wait (a key of its own) with a timeout that fits the work
    threading.Thread(target=rank0).start()
    monkeypatch.setenv("MTKIT_PREPARE_TIMEOUT", "30")
    t0 = time.perf_counter()
    assert runtime.after_rank0(runtime.Dist(1, 2, 0), "prepare", lambda: done.append(1) or "found", store=store) \
        == "found"
    assert time.perf_counter() - t0 > 0.5 and done[-2:] == [0, 1]
