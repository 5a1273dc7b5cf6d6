from __future__ import annotations

import os

import pytest
import torch
from support import tiny_recipe

torch.set_num_threads(2)
try:  # a test extra: a GPU image with no registry may lack it (tools/gpu-check.sh), and the GPU subset needs none
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    # the fuzzing draws the same examples on every run (seeded by each test's name) and keeps no example
    # database: a failure is reproducible from the suite alone
    settings.register_profile("mtkit", derandomize=True, database=None)
    settings.load_profile("mtkit")

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption("--device", choices=("all", *DEVICES), default=os.environ.get("MTKIT_TEST_DEVICE", "all"),
                     help="the devices the `device` fixture runs on: all (default: the CPU, and CUDA when a GPU is "
                          "present), cpu or cuda; also MTKIT_TEST_DEVICE. `-m gpu` selects the CUDA cases.")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the CUDA case of a test on the `device` fixture (pytest -m gpu "
                                       "--device cuda)")


def pytest_generate_tests(metafunc):
    """Every test that takes ``device`` runs once per chosen device; its CUDA case is marked ``gpu``."""
    if "device" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--device")
    params = [pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [], id=d)
              for d in DEVICES if chosen in ("all", d)]
    metafunc.parametrize("device", params, indirect=True, scope="module")


@pytest.fixture(scope="module")
def device(request) -> torch.device:
    """The device a test runs on: ``cpu`` always, ``cuda`` when a GPU is present (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (run the GPU subset on one: pytest -m gpu --device cuda)")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _registry_isolation():
    """Plugin isolation: a test leaves the process-wide registry as it found it. Entries a test adds (a plugin
    registered on the shared manager, a ``@register`` outside mtkit) or a registry it swaps in without restoring
    it fail the test; building the registry for the first time, or importing mtkit's own modules, does not."""
    from mtkit.core import registry
    from mtkit.plugins import manager as plugins

    start = len(registry.DECORATED)
    before = plugins._PLUGINS
    entries = None if before is None else {(e.kind, e.name) for e in before.registry}
    yield
    new = registry.DECORATED[start:]
    own = [d for d in new if registry.origin_of_module(getattr(d[2], "__module__", "")) == registry.BUILTIN]
    added = [(kind, name) for kind, name, *_ in new if (kind, name) not in {(d[0], d[1]) for d in own}]
    registry.DECORATED[start:] = own
    now = plugins._PLUGINS
    swapped = before is not None and now is not before
    leaked = set() if before is None or swapped else {(e.kind, e.name) for e in before.registry} - entries
    plugins._PLUGINS = before if swapped else now
    assert not added and not swapped and not leaked, \
        f"the test changed the global registry: declared {added}, swapped {swapped}, added {sorted(leaked)}"


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny segmenter trained for a few dozen steps on the synthetic city data, and its eval data."""
    data = tiny_recipe(**{"train.epochs": 1, "train.steps_per_epoch": 30, "train.lr": 1e-3, "train.batch_size": 8})
    data["data"]["segmentation"]["options"]["sequences"] = 4
    from mtkit.evaluation.robustness import load_model
    from mtkit.recipe.build import build_dataset
    from mtkit.recipe.load import validate
    from mtkit.training.trainer import train

    recipe = validate(data)
    run = tmp_path_factory.mktemp("trained")
    train(recipe, "single", run, progress=False)
    loaded = load_model(run / "last.pt")
    ds = build_dataset(recipe.data.eval["CS"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    return loaded, ds, batch["image"], batch["label"]
