"""Registries: one place that maps names to backbones, heads, losses, perturbations, datasets, tasks, metrics.

Entries are added with the ``@register(kind, name)`` decorator (built-ins, inside ``mtkit.builtins``) or by a
plugin's ``mtkit_register`` hook; both end up here, each entry knowing where it came from.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import MtkitError

KINDS = ("backbone", "head", "loss", "perturbation", "dataset", "task", "metric")

BUILTIN = "builtin"


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    origin: str = BUILTIN  # "builtin" or "<distribution> <version>"
    provider: str = ""  # plugin name as known to the plugin manager

    @property
    def doc(self) -> str:
        text = inspect.getdoc(self.obj) or ""
        return text.strip().splitlines()[0] if text.strip() else ""


class UnknownEntryError(MtkitError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Registry:
    """Name → entry maps, one per kind."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    # names that a known but uninstalled plugin would provide: (kind, name pattern) -> distribution
    known_providers: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, kind: str, name: str, obj: Any, origin: str = BUILTIN, provider: str = "") -> Any:
        self._check_kind(kind)
        existing = self.entries[kind].get(name)
        if existing is not None and existing.obj is not obj:
            raise MtkitError(
                f"{kind} '{name}' is registered twice: by {existing.origin} and by {origin}. "
                "Rename one of them or uninstall one plugin."
            )
        self.entries[kind][name] = Entry(kind, name, obj, origin, provider)
        return obj

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).obj

    def entry(self, kind: str, name: str) -> Entry:
        self._check_kind(kind)
        try:
            return self.entries[kind][name]
        except KeyError:
            raise UnknownEntryError(self._unknown_message(kind, name)) from None

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self.entries[kind])

    def __iter__(self) -> Iterator[Entry]:
        for kind in KINDS:
            for name in sorted(self.entries[kind]):
                yield self.entries[kind][name]

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self.entries.get(kind, {})

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise MtkitError(f"unknown registry kind '{kind}'; the kinds are: {', '.join(KINDS)}")

    def _unknown_message(self, kind: str, name: str) -> str:
        known = self.names(kind)
        msg = f"unknown {kind} '{name}'"
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        provider = next((dist for (k, pattern), dist in self.known_providers.items()
                         if k == kind and fnmatch.fnmatchcase(name, pattern)), None)
        if provider:
            msg += f" It is provided by the plugin package '{provider}': pip install {provider}"
        else:
            msg += f" Installed {kind}s: {', '.join(known) if known else '(none)'}"
        return msg


# Every ``@register`` decoration, in order. The built-ins' hook adds those from ``mtkit.*`` modules; the plugin
# manager adds the rest (plugins or notebook code using the decorator) with the origin of their module.
DECORATED: list[tuple[str, str, Any]] = []
_LIVE: list[Registry] = []  # registries already built: late decorations (a notebook) go there too


def register(kind: str, name: str | None = None) -> Callable[[Any], Any]:
    """Decorator: ``@register("loss", "my_loss")`` adds the object to the registry of ``kind``."""
    if kind not in KINDS:
        raise MtkitError(f"unknown registry kind '{kind}'; the kinds are: {', '.join(KINDS)}")

    def deco(obj: Any) -> Any:
        key = name or obj.__name__
        DECORATED.append((kind, key, obj))
        for reg in _LIVE:
            reg.add(kind, key, obj, origin=origin_of_module(obj.__module__))
        return obj

    return deco


def origin_of_module(module: str) -> str:
    """``builtin`` for mtkit's own modules, else ``<distribution> <version>`` (or the module name)."""
    from importlib import metadata

    top = module.split(".")[0]
    if top == "mtkit":
        return BUILTIN
    dists = metadata.packages_distributions().get(top, [])
    if dists:
        return f"{dists[0]} {metadata.version(dists[0])}"
    return f"{module} (not installed)"


class RegistryView:
    """What a plugin's ``mtkit_register`` hook receives: ``add`` records the plugin's origin."""

    def __init__(self, registry: Registry, origin: str, provider: str) -> None:
        self._registry = registry
        self._origin = origin
        self._provider = provider

    def add(self, kind: str, name: str, obj: Any) -> Any:
        return self._registry.add(kind, name, obj, origin=self._origin, provider=self._provider)

    def register(self, kind: str, name: str | None = None) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            return self.add(kind, name or obj.__name__, obj)

        return deco
