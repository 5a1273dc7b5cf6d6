"""Helpers shared by the tests (imported by name: ``from support import tiny_recipe``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(**over: Any) -> dict[str, Any]:
    """A miniature recipe on the synthetic data: 32x64 images, a few steps."""
    size = {"height": 32, "width": 64}
    syn = {"sequences": 2, "frames": 8}
    recipe = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "model": {"backbone": "resnet18"},
        "data": {
            "segmentation": {"name": "synthetic", "split": "train", **size, "options": {"domain": "city", **syn}},
            "segmentation_val": {"name": "synthetic", "split": "val", **size, "limit": 4,
                                 "options": {"domain": "city", **syn}},
            "depth": {"name": "synthetic_video", "split": "train", **size, "options": {"domain": "drive", **syn}},
            "eval": {"CS": {"name": "synthetic", "split": "val", **size, "limit": 4,
                            "options": {"domain": "city", **syn}},
                     "K": {"name": "synthetic", "split": "test", **size, "limit": 4,
                           "options": {"domain": "drive", **syn}}},
            "depth_eval": {"Eigen": {"name": "synthetic_depth", "split": "test", **size, "limit": 4,
                                     "options": {"domain": "drive", **syn}}},
            "num_workers": 0,
        },
        "train": {"epochs": 1, "steps_per_epoch": 2, "lr_drop_epochs": [], "batch_size": 4, "seg_batch_size": 2,
                  "depth_batch_size": 2,
                  "log_every": 1},
        "models": [{"name": "single", "tasks": ["segmentation"]},
                   {"name": "multi", "tasks": ["segmentation", "depth"], "lambda": 0.1}],
        "robustness": {"epsilons": [1.0, 4.0], "batch_size": 4, "options": {"pgd": {"iterations": 2}},
                       "sanity": {"iterations": 3}},
    }
    for key, value in over.items():
        node = recipe
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return recipe


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``mtkit ARGS`` in this process through the CLI's own ``main`` (its error handling included): exit code,
    stdout and stderr. A fresh ``python -m mtkit`` costs seconds of imports; the tests that need a process of its
    own (the entry point, a SIGKILL, torchrun, plugins found on a changed path) start one."""
    import pytest

    from mtkit import cli

    with pytest.raises(SystemExit) as done:
        cli.main([*args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def with_plugins_on_path(site: Path, monkeypatch) -> None:
    """Plugin distributions under ``site`` found through their entry points by this process's next registry, as a
    fresh ``PYTHONPATH=site mtkit …`` would find them (undone after the test), and a console wide enough that
    table rows do not wrap."""
    from mtkit import cli
    from mtkit.plugins import manager as plugins

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_PLUGINS", None)
    monkeypatch.setattr(cli.console, "width", 200)


class OnePixelSegmenter:
    """A segmenter with a 1x1 output on gray values (a small conv net with global pooling), so that its
    segmentation loss is a classification loss and classification attacks (AutoAttack, torchattacks) are
    independent references for mtkit's; ``dtype`` float64 for trajectory comparisons."""

    def __new__(cls, classes: int = 4, hidden: int = 8, seed: int = 2, dtype=None):
        import torch

        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, hidden, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Conv2d(hidden, classes, 1))

        class Segmenter(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x.to(next(self.net.parameters()).dtype) / 255.0)

        model = Segmenter().eval()
        return model.to(dtype) if dtype is not None else model


def poison_segmentation_loss(monkeypatch, at_call: int) -> dict[str, int]:
    """Make the weighted cross-entropy NaN at its ``at_call``-th call (1-based); returns the call counter."""
    from mtkit.ops.losses import WeightedCrossEntropy

    real = WeightedCrossEntropy.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kw):
        calls["n"] += 1
        loss = real(self, *args, **kw)
        return loss * float("nan") if calls["n"] == at_call else loss

    monkeypatch.setattr(WeightedCrossEntropy, "forward", poisoned)
    return calls


def multitask_batch(seed: int = 0):
    """A fixed random batch of one multi-task step at 32x64: (segmentation batch of 2, video batch of 2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seg = {"image": torch.rand(2, 3, 32, 64, generator=g) * 255,
           "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    frames = torch.rand(2, 3, 3, 32, 64, generator=g) * 255
    k = torch.eye(4).repeat(2, 1, 1)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = 37.0, 61.0, 32.0, 16.0
    return seg, {"frames": frames, "frames_raw": frames, "K": k}


_FAKE_SLURM = r'''
import os, pathlib, re, subprocess, sys, time

state = pathlib.Path(os.environ["FAKE_SLURM_STATE"])
state.mkdir(parents=True, exist_ok=True)
tool = pathlib.Path(sys.argv[0]).name
if tool == "sbatch":  # record the array's tasks as PENDING, run them one after the other in the background
    script = pathlib.Path(sys.argv[-1])
    counter = state / "next"
    jid = int(counter.read_text()) if counter.exists() else 4242
    counter.write_text(str(jid + 1))
    m = re.search(r"#SBATCH --array=0-(\d+)", script.read_text())
    ids = [f"{jid}_{i}" for i in range(int(m.group(1)) + 1)] if m else [str(jid)]
    for i in ids:
        (state / i).write_text("PENDING")
    (state / "submissions").open("a").write(f"{jid} {len(ids)}\n")
    subprocess.Popen([sys.executable, sys.argv[0].replace("sbatch", "srun"), "--fake-run", str(script), *ids],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {jid}")
elif tool == "srun" and sys.argv[1] == "--fake-run":  # the node: each task with SLURM's variables
    time.sleep(0.5)  # submitit names the pickles after the id it reads from sbatch's answer
    script, ids = sys.argv[2], sys.argv[3:]
    for n, i in enumerate(ids):
        array, _, task = i.partition("_")
        (state / i).write_text("RUNNING")
        env = {**os.environ, "SLURM_JOB_ID": str(int(array) + 1 + n), "SLURM_ARRAY_JOB_ID": array,
               "SLURM_ARRAY_TASK_ID": task or "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
               "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost"}
        code = subprocess.call(["bash", script], env=env)
        (state / i).write_text("COMPLETED" if code == 0 else "FAILED")
elif tool == "srun":  # srun --unbuffered --output PATTERN COMMAND...
    args = sys.argv[1:]
    out = args[args.index("--output") + 1]
    command = args[args.index("--output") + 2:]
    env = os.environ
    for key, value in (("%A", env["SLURM_ARRAY_JOB_ID"]), ("%a", env["SLURM_ARRAY_TASK_ID"]), ("%t", "0"),
                       ("%j", env["SLURM_JOB_ID"])):
        out = out.replace(key, value)
    with open(out, "a") as fh:
        sys.exit(subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT))
elif tool == "sacct":  # sacct -o JobID,State,NodeList --parsable2 -j ID,...
    wanted = sys.argv[sys.argv.index("-j") + 1].split(",")
    print("JobID|State|NodeList")
    for f in sorted(state.iterdir()):
        if any(f.name == w or f.name.startswith(w + "_") for w in wanted):
            print(f"{f.name}|{f.read_text()}|localhost")
'''


def fake_slurm(folder: Path, monkeypatch) -> Path:
    """SLURM's sbatch, srun and sacct on PATH, as far as submitit uses them, on this machine: sbatch runs the job
    array's tasks one after the other in the background, with SLURM's variables, through the real submission
    script submitit wrote; sacct reports their states. Returns the folder of the states (``submissions`` lists
    each sbatch call)."""
    import sys

    bin_dir, state = folder / "bin", folder / "state"
    bin_dir.mkdir(parents=True)
    for tool in ("sbatch", "srun", "sacct"):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{_FAKE_SLURM}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    return state
