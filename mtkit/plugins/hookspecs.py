"""pluggy hook specifications of mtkit (project name ``mtkit``, entry-point group ``mtkit``), grouped by phase.

A plugin is a module, named by an entry point in the ``mtkit`` group of its distribution, that implements any of
these hooks with ``@hookimpl`` (``from mtkit.plugin_api import hookimpl``). Every hook is called through the
plugin manager (``pm.hook``); a plugin must not change global state when it is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ..core.registry import RegistryView

hookspec = pluggy.HookspecMarker("mtkit")
hookimpl = pluggy.HookimplMarker("mtkit")


# ---------------------------------------------------------------------------------------------- registration

@hookspec(historic=True)
def mtkit_register(registry: RegistryView) -> None:
    """Add entries to the registry: ``registry.add(kind, name, obj, options=Model)``, or the decorator
    ``@registry.register(kind, name)``.

    :param registry: the registry being built; ``kind`` is one of backbone, head, loss, perturbation, dataset, detector,
        task. Each entry records the plugin's distribution and version as its origin. ``options`` (or an
        ``Options`` attribute of a class) is a pydantic model of the entry's options, validated at recipe load.

    Historic: a plugin registered after the registry was built (``get_plugins().manager.register(module)``)
    is still called. An exception is reported as that plugin's failure, its entries are dropped, and the other
    plugins keep working.
    """


# ------------------------------------------------------------------------------------------------- training

@hookspec
def mtkit_after_epoch(run_dir: str, model_name: str, epoch: int, metrics: dict[str, float]) -> None:
    """Called on rank 0 after each training epoch.

    :param run_dir: the model's checkpoint folder.
    :param model_name: the recipe's name of the model.
    :param epoch: the epoch just finished (1-based).
    :param metrics: that epoch's record: ``val_miou`` and the mean of each training loss term.
    """


# ----------------------------------------------------------------------------------------------- evaluation

@hookspec
def mtkit_after_evaluation(run_dir: str, results: list[dict[str, Any]]) -> None:
    """Called after ``mtkit run`` wrote its results.

    :param run_dir: the run folder (``results.json``, ``report.md``, the plots).
    :param results: the robustness rows (``mtkit.core.results.ResultRow`` as dicts: model, seed, dataset,
        perturbation, level, ε requested and measured, mIoU, Q, ...).
    """
