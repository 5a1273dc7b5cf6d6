"""mtkit's own entries, added through the same historic ``mtkit_register`` hook as third-party plugins.

Importing this module imports every module that declares entries with ``@register``; the hook adds those
declared in mtkit's own modules.
"""

from __future__ import annotations

from . import detection, losses, perturbations  # noqa: F401  (their @register declarations)
from .data import cityscapes, depth_gt, kitti, synthetic_sets  # noqa: F401
from .hookspecs import hookimpl
from .models import backbones, decoders  # noqa: F401
from .registry import BUILTIN, DECORATED, RegistryView, origin_of_module


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    for kind, name, obj, options in DECORATED:
        if origin_of_module(getattr(obj, "__module__", "mtkit")) == BUILTIN:
            registry.add(kind, name, obj, options)
