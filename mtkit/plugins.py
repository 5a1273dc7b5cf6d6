"""The plugin manager: built-ins and entry-point plugins register through the same ``mtkit_register`` hook.

A plugin that fails to import or to register is recorded in ``failures`` with its name and error; the other
plugins and the CLI keep working.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .registry import _LIVE, BUILTIN, DECORATED, Registry, RegistryView, origin_of_module

ENTRY_POINT_GROUP = "mtkit"

# Entries of plugins that users often ask for (name patterns, fnmatch); named in the error when such a plugin is
# not installed.
KNOWN_PROVIDERS = {
    ("perturbation", "mifgsm"): "mtkit-attacks",
    ("perturbation", "segpgd"): "mtkit-attacks",
    ("perturbation", "uap"): "mtkit-attacks",
    ("perturbation", "corrupt_*"): "mtkit-corruptions",
    ("task", "edges"): "mtkit-edges",
}


@dataclass
class PluginFailure:
    name: str
    origin: str
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"plugin '{self.name}' ({self.origin}) failed: {self.error}"


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registry: Registry
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook


def _dist_origin(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return f"{dist.metadata['Name']} {dist.version}"
    return ep.value


def load_plugins(entry_points: bool = True) -> Plugins:
    """Build a fresh plugin manager and registry: built-ins first, then each entry point of group ``mtkit``."""
    from . import builtins

    pm = pluggy.PluginManager("mtkit")
    pm.add_hookspecs(hookspecs)
    registry = Registry(known_providers=dict(KNOWN_PROVIDERS))
    plugins = Plugins(pm, registry)
    origins: dict[str, str] = {"builtin": BUILTIN}
    pm.register(builtins, name="builtin")
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            origin = _dist_origin(ep)
            if pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the others
                plugins.failures.append(
                    PluginFailure(ep.name, origin, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                )
                continue
            origins[ep.name] = origin
    for impl in reversed(pm.hook.mtkit_register.get_hookimpls()):  # built-ins first
        name = impl.plugin_name
        view = RegistryView(registry, origins.get(name, name), name)
        try:
            impl.function(registry=view)
        except Exception as exc:
            plugins.failures.append(
                PluginFailure(name, origins.get(name, name), f"{type(exc).__name__}: {exc}", traceback.format_exc())
            )
            if name != "builtin":
                pm.unregister(name=name)
    for kind, name, obj in DECORATED:  # decorator registrations outside mtkit (notebooks, plugins)
        if (kind, name) not in registry:
            registry.add(kind, name, obj, origin=origin_of_module(obj.__module__))
    _LIVE.clear()
    _LIVE.append(registry)
    return plugins


_PLUGINS: Plugins | None = None


def get_plugins(reload: bool = False) -> Plugins:
    """The process-wide plugin manager and registry (built on first use)."""
    global _PLUGINS
    if _PLUGINS is None or reload:
        _PLUGINS = load_plugins()
    return _PLUGINS


def get_registry() -> Registry:
    return get_plugins().registry


def lookup(kind: str, name: str):
    """The object registered as ``name`` of ``kind`` (clear error with suggestions when unknown)."""
    return get_registry().get(kind, name)
