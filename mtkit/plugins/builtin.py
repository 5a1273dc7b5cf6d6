"""mtkit's own entries, added through the same historic ``mtkit_register`` hook as third-party plugins.

Importing this module imports every module that declares entries with ``@register``; the hook adds those
declared in mtkit's own modules.
"""

from __future__ import annotations

from .. import perturbations  # noqa: F401  (their @register declarations)
from ..core.registry import BUILTIN, DECORATED, RegistryView, origin_of_module
from ..data import cityscapes, depth_gt, kitti  # noqa: F401
from ..data.synthetic import sets  # noqa: F401
from ..models import backbones, decoders  # noqa: F401
from ..ops import edge_consistency, losses  # noqa: F401
from .hookspecs import hookimpl


@hookimpl
def mtkit_register(registry: RegistryView) -> None:
    for kind, name, obj, options in DECORATED:
        if origin_of_module(getattr(obj, "__module__", "mtkit")) == BUILTIN:
            registry.add(kind, name, obj, options)
