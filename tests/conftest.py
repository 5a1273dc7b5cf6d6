from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Generated data and class weights go to a per-session cache, never to the user's."""
    cache = tmp_path_factory.mktemp("mtkit-cache")
    old = os.environ.get("MTKIT_CACHE")
    os.environ["MTKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MTKIT_CACHE", None)
    else:
        os.environ["MTKIT_CACHE"] = old


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
        },
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "seg_batch_size": 2, "depth_batch_size": 2,
                  "log_every": 1},
        "models": [{"name": "single", "tasks": ["segmentation"]},
                   {"name": "multi", "tasks": ["segmentation", "depth"], "lambda": 0.1}],
        "robustness": {"epsilons": [1.0, 4.0], "batch_size": 4, "options": {"pgd": {"iterations": 2}}},
    }
    for key, value in over.items():
        node = recipe
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return recipe


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny segmenter trained for a few dozen steps on the synthetic city data, and its eval data."""
    data = tiny_recipe(**{"train.epochs": 1, "train.steps_per_epoch": 30, "train.lr": 1e-3, "train.batch_size": 8})
    data["data"]["segmentation"]["options"]["sequences"] = 4
    from mtkit.config import validate
    from mtkit.data.datasets import build_dataset
    from mtkit.evaluate import load_model
    from mtkit.train import train

    recipe = validate(data)
    run = tmp_path_factory.mktemp("trained")
    train(recipe, "single", run, progress=False)
    loaded = load_model(run / "last.pt")
    ds = build_dataset(recipe.data.eval["CS"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    return loaded, ds, batch["image"], batch["label"]
