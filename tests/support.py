"""Helpers shared by the tests (imported by name: ``from support import tiny_recipe``)."""

from __future__ import annotations

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
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "seg_batch_size": 2, "depth_batch_size": 2,
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
    from mtkit import cli, plugins

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_PLUGINS", None)
    monkeypatch.setattr(cli.console, "width", 200)
