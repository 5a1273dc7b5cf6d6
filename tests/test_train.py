from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from support import poison_segmentation_loss, tiny_recipe

from mtkit.core.checkpoint import load_checkpoint
from mtkit.core.errors import CheckpointError, TrainingDiverged
from mtkit.recipe.load import validate
from mtkit.training.step import StepEngine
from mtkit.training.trainer import train


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = tiny_recipe(**{"train.epochs": 2, "train.steps_per_epoch": 3, "train.checkpoint_every": 1,
                          "model.backbone": "resnet10t", "model.pose_backbone": "resnet10t"})  # small checkpoints
    recipe = _write(tmp_path, data)
    train(validate(data), "multi", tmp_path / "full", progress=False)  # uninterrupted, in this process
    run = tmp_path / "killed"
    # the killed process at the thread count of this one (2, tests/conftest.py): bit for bit needs the same
    # reduction order in every kernel
    assert torch.get_num_threads() == 2
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "train", str(recipe), "--model", "multi", "--out",
                             str(run), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if (run / "last.pt").is_file():
            try:
                step = load_checkpoint(run / "last.pt")["step"]
            except CheckpointError:
                step = 0
            if step >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(run / "last.pt")["step"]
    assert 2 <= killed_at < 6
    train(validate(data), "multi", run, resume=True, progress=False)  # `mtkit train --resume`, in this process
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:  # bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["val_miou"] == rb["val_miou"]
        # an epoch's mean training loss covers the steps this process ran: an epoch cut by the kill and resumed
        # averages its resumed steps only (3 steps per epoch)
        if ra["epoch"] == 1 and killed_at < 3:
            continue
        assert (ra["train_seg"], ra["train_depth"]) == (rb["train_seg"], rb["train_depth"])


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    recipe = validate(tiny_recipe(**{"train.steps_per_epoch": 5, "train.checkpoint_every": 1}))
    poison_segmentation_loss(monkeypatch, at_call=3)
    with pytest.raises(TrainingDiverged, match=r"loss term 'seg' is nan at step 3 .*last good checkpoint is kept"):
        train(recipe, "multi", tmp_path / "run", progress=False)
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_checkpoint_refuses_pickle_payload(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": {}, "x": Evil()}, fh)
    with pytest.raises(CheckpointError, match="carries code"):
        load_checkpoint(path)
    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="carries code"):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_batch_composition_and_gradient_scaling_are_wired(tmp_path, monkeypatch):
    data = tiny_recipe(**{"train.steps_per_epoch": 1})
    for key in ("batch_size", "seg_batch_size", "depth_batch_size"):
        del data["train"][key]  # the paper's defaults: 12 single-task, 6 + 6 multi-task
    data["data"]["segmentation"]["options"]["sequences"] = 4
    data["data"]["depth"]["options"]["sequences"] = 4
    recipe = validate(data)
    seen = []
    real_step = StepEngine.train_step

    def spy(self, seg, dep):
        seen.append((self.spec.name, seg["image"].shape[0], None if dep is None else dep["frames"].shape[0]))
        return real_step(self, seg, dep)

    scales = []
    import mtkit.models.multitask as mt

    real_scale = mt.scale_features
    monkeypatch.setattr(mt, "scale_features", lambda f, s: scales.append((len(f), s)) or real_scale(f, s))
    monkeypatch.setattr(StepEngine, "train_step", spy)
    train(recipe, "single", tmp_path / "s", progress=False)
    train(recipe, "multi", tmp_path / "m", progress=False)
    assert seen == [("single", 12, None), ("multi", 6, 6)]
    # eq. 5 on every encoder→decoder connection: 5 feature maps scaled by λ (seg) and 1-λ (depth)
    assert scales == [(5, 0.1), (5, pytest.approx(0.9))]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_across_two_nodes_matches_one_process(tmp_path):
    """``torchrun --nnodes 2`` (two torchrun agents on localhost meeting at a c10d rendezvous, as ``srun torchrun``
    starts them on two nodes; gloo, one process each) runs ``mtkit run`` as one process at the same global batch:
    the same training losses and weights (to the all-reduce's float order), and evaluation rows (sharded over the
    two nodes) equal to the last bit to one process's evaluation of the same checkpoint."""
    import shutil

    from mtkit.core.results import RunResults
    from mtkit.pipeline.runner import run

    data = tiny_recipe(**{"train.epochs": 1, "train.steps_per_epoch": 3, "train.seg_batch_size": 4,
                          "train.depth_batch_size": 2, "robustness.datasets": ["CS"],
                          "robustness.sanity.enabled": False})
    data["models"] = data["models"][1:]  # multi: both tasks, both batches split over the nodes
    data["data"]["depth_eval"] = {}
    data["model"]["backbone_kwargs"] = {"norm_layer": "groupnorm"}  # no batch statistics: exact comparison
    data["data"]["augment"] = {"hflip": False, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    recipe = _write(tmp_path, data)
    one = run(validate(data), progress=False, run_dir=tmp_path / "one", log=lambda m: None)  # this process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-id", "mtkit-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "mtkit", "run", str(recipe), "--out",
                               str(tmp_path / "two"), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    two = RunResults.read(tmp_path / "two" / "results.json")
    (a_hist,), (b_hist,) = one.results.training[0]["history"], two.training[0]["history"]
    assert one.results.training[0]["steps"] == two.training[0]["steps"] == 3
    for key in ("train_seg", "train_depth", "train_photometric"):
        assert a_hist[key] == pytest.approx(b_hist[key], rel=1e-4), key
    a = load_checkpoint(next((tmp_path / "one" / "train").glob("*/last.pt")))
    b = load_checkpoint(next((tmp_path / "two" / "train").glob("*/last.pt")))
    diffs = {k: (a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]
             if a["model"][k].is_floating_point()}
    # Adam divides by √v: float differences of the gradient all-reduce order grow to ~1e-4 on the tiny pose weights
    assert max(diffs.values()) < 3e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert a["model"]["seg_head.out.0.conv.weight"].abs().sum() > 0
    # the two nodes' checkpoint evaluated by one process: every row equal to the sharded evaluation's
    shutil.copytree(tmp_path / "two" / "train", tmp_path / "three" / "train")
    three = run(validate(data), progress=False, run_dir=tmp_path / "three", log=lambda m: None)
    assert three.stages_run and all(s.startswith("evaluate") for s in three.stages_run)
    assert [r.model_copy(update={"seconds_sweep": 0.0}) for r in three.results.robustness] == [
        r.model_copy(update={"seconds_sweep": 0.0}) for r in two.robustness]
    assert three.results.clean == two.clean


def test_tensorboard_gets_every_loss_term_the_learning_rate_speed_and_validation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = validate(tiny_recipe(**{"train.tensorboard": True, "train.steps_per_epoch": 2, "train.epochs": 2}))
    train(recipe, "multi", tmp_path, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/seg", "step/depth", "step/photometric", "step/smoothness", "step/lr", "step/images_per_s",
            "epoch/val_miou", "epoch/train_seg", "epoch/train_depth"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_miou")] == [2, 4]
    jsonl = [__import__("json").loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("step/seg")] == pytest.approx([r["seg"] for r in jsonl
                                                                          if r["type"] == "step"])
