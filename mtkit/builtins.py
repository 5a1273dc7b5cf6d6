"""mtkit's own entries, registered through the same ``mtkit_register`` hook as third-party plugins."""

from __future__ import annotations

from .hookspecs import hookimpl
from .registry import BUILTIN, DECORATED, register


@register("task", "segmentation")
class SegmentationTask:
    """Supervised semantic segmentation with the weighted cross-entropy of eq. 1."""


@register("task", "depth")
class DepthTask:
    """Self-supervised monocular depth from video (eq. 2-4) with a pose network."""


@hookimpl
def mtkit_register(registry) -> None:
    # importing the modules runs their @register decorators
    from . import losses, metrics, perturbations  # noqa: F401
    from .data import datasets  # noqa: F401
    from .models import backbones, decoders  # noqa: F401
    from .registry import origin_of_module

    for kind, name, obj in DECORATED:
        if origin_of_module(getattr(obj, "__module__", "mtkit")) == BUILTIN:
            registry.add(kind, name, obj)
