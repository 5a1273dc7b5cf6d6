"""The plugin manager: built-ins and entry-point plugins register through the same historic ``mtkit_register``
hook, called through ``pm.hook``.

A plugin that fails to import or to register is recorded in ``failures`` with its name and error; the other
plugins and the CLI keep working.
"""

from __future__ import annotations

import inspect
import json
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..core.registry import BUILTIN, DECORATED, Registry, RegistryView, origin_of_module
from . import builtin as builtins
from . import hookspecs

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
    """A fresh plugin manager and registry: the registration hook is called historically (pluggy's
    ``historic=True``), so mtkit's built-ins, each entry-point plugin of group ``mtkit`` and any plugin registered
    later on the manager all add their entries through ``pm.hook.mtkit_register``. A plugin that fails to import
    or to register is recorded in ``failures``, unregistered, and its entries dropped."""
    pm = pluggy.PluginManager("mtkit")
    pm.add_hookspecs(hookspecs)
    registry = Registry(known_providers=dict(KNOWN_PROVIDERS))
    plugins = Plugins(pm, registry)
    view = RegistryView(registry)
    pm.hook.mtkit_register.call_historic(kwargs={"registry": view})
    candidates: list[tuple[str, str, object]] = [("builtin", BUILTIN, builtins)]
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            origin = _dist_origin(ep)
            if ep.name in {c[0] for c in candidates}:
                continue
            try:
                candidates.append((ep.name, origin, ep.load()))
            except Exception as exc:  # a broken plugin must not break the others
                plugins.failures.append(
                    PluginFailure(ep.name, origin, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    for name, origin, module in candidates:
        view.origin, view.provider = origin, name
        try:
            pm.register(module, name=name)  # runs the historic mtkit_register of this plugin now
        except Exception as exc:
            plugins.failures.append(
                PluginFailure(name, origin, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            registry.remove_provider(name)
            if pm.has_plugin(name):
                pm.unregister(name=name)
            if name == "builtin":
                raise
    view.origin, view.provider = None, ""
    _add_decorated(registry)
    registry.failed_plugins = [str(f) for f in plugins.failures]
    return plugins


def _add_decorated(registry: Registry) -> None:
    """``@register`` declarations outside mtkit's own modules (a notebook, a script) that no hook added."""
    for kind, name, obj, options in DECORATED:
        if (kind, name) not in registry:
            registry.add(kind, name, obj, origin=origin_of_module(getattr(obj, "__module__", "")), options=options)


_PLUGINS: Plugins | None = None


def get_plugins(reload: bool = False) -> Plugins:
    """The process-wide plugin manager and registry (built on first use)."""
    global _PLUGINS
    if _PLUGINS is None or reload:
        _PLUGINS = load_plugins()
    return _PLUGINS


def get_registry() -> Registry:
    """The process-wide registry, with any ``@register`` declared since it was built."""
    registry = get_plugins().registry
    _add_decorated(registry)
    return registry


def list_entries(kind: str | None = None) -> list[dict[str, str]]:
    """Registered entries (optionally of one kind) with their origin, one-line doc and options (name=default;
    a name alone is required)."""
    reg = get_registry()
    if kind is not None:
        reg.names(kind)  # validates the kind
    return [{"kind": e.kind, "name": e.name, "origin": e.origin, "doc": e.doc, "options": options_summary(e.options)}
            for e in reg if kind is None or e.kind == kind]


def entry_details(entry) -> dict[str, Any]:
    """One entry in full, for ``mtkit list NAME`` and ``--json``: kind, name, origin, the one-line summary, the
    whole description, and each option's name, type, default (None when required), requirement and
    description."""
    options = []
    model = entry.options
    fields = model.model_fields.items() if model is not None and hasattr(model, "model_fields") else []
    for name, spec in fields:
        default = None if spec.is_required() else spec.get_default(call_default_factory=True)
        options.append({"name": name, "type": _type_name(spec.annotation), "required": spec.is_required(),
                        "default": default if _is_json(default) else repr(default),
                        "description": spec.description or ""})
    out = {"kind": entry.kind, "name": entry.name, "origin": entry.origin, "summary": entry.doc,
           "description": inspect.getdoc(entry.obj) or "", "options": options}
    if entry.kind == "perturbation":  # what its ε is: an RMS (equal SNR) or a bound (``Perturbation.epsilon_meaning``)
        out["epsilon"] = getattr(entry.obj, "epsilon_meaning", "")
    return out


def _type_name(annotation: Any) -> str:
    """A type as a reader writes it: ``int | None``, not ``Optional[Annotated[int, Gt(gt=0)]]``."""
    import re

    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("pydantic.types.", "")
    while (m := re.search(r"Annotated\[([^\[\],]+(?:\[[^\]]*\])?), [^\[\]]*(?:\[[^\]]*\])?[^\[\]]*\]", text)):
        text = text[:m.start()] + m.group(1) + text[m.end():]
    while (m := re.search(r"Optional\[([^\[\]]+(?:\[[^\]]*\])?)\]", text)):
        text = text[:m.start()] + m.group(1) + " | None" + text[m.end():]
    return re.sub(r"\b(?:[a-z_]+\.)+([A-Z]\w*)", r"\1", text).replace("NoneType", "None")


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def options_summary(model) -> str:
    """An entry's typed options in one line: ``name=default`` each, a required option by its name alone."""
    if model is None or not hasattr(model, "model_fields"):
        return ""
    return ", ".join(name if field.is_required() else f"{name}={field.get_default(call_default_factory=True)!r}"
                     for name, field in model.model_fields.items())


def plugin_failures() -> list[str]:
    """One line per plugin that failed to import or to register."""
    return [str(f) for f in get_plugins().failures]
