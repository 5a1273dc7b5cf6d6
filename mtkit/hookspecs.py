"""pluggy hook specifications of mtkit (project name ``mtkit``, entry-point group ``mtkit``).

A plugin is a module (named by an entry point in the ``mtkit`` group of its distribution) that implements any
of these hooks with ``@mtkit.hookimpl``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mtkit")
hookimpl = pluggy.HookimplMarker("mtkit")


@hookspec
def mtkit_register(registry: Any) -> None:
    """Add entries: ``registry.add(kind, name, obj)`` with kind one of backbone, head, loss, perturbation,
    dataset, task, metric. The registry records the plugin's distribution and version as the origin."""


@hookspec
def mtkit_after_epoch(run_dir: str, model_name: str, epoch: int, metrics: dict[str, float]) -> None:
    """Called on rank 0 after each training epoch with that epoch's metrics."""


@hookspec
def mtkit_after_evaluation(run_dir: str, results: list[dict[str, Any]]) -> None:
    """Called after a robustness evaluation with its result rows."""
