"""Registries: one place that maps names to backbones, heads, losses, perturbations, datasets, tasks and model
factories (external segmentation networks for ``mtkit eval --model-factory NAME``).

The bottom layer: it imports nothing of mtkit but the error classes. Entries are declared with the
``@register(kind, name, options=Model)`` decorator (which only records them, like timm's ``register_model``) and
added to a ``Registry`` by the plugin manager (``mtkit.plugins.manager``): mtkit's own through the same historic
``mtkit_register`` hook as third-party plugins, each entry knowing where it came from. ``mtkit.recipe.build`` is the one
place where names become objects.

An entry may declare its options as a pydantic model (``options``): a recipe's options for it are validated
against that model when the recipe loads, with the same path-precise errors as every other key.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from .errors import MtkitError, did_you_mean

KINDS = ("backbone", "head", "loss", "perturbation", "dataset", "task", "model", "detector")

BUILTIN = "builtin"


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    origin: str = BUILTIN  # "builtin" or "<distribution> <version>"
    provider: str = ""  # plugin name as known to the plugin manager
    options: Any = None  # a pydantic model class of the entry's options (None: takes none)

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
    # plugins that failed to import or to register (one line each): their entries are missing
    failed_plugins: list[str] = field(default_factory=list)

    def add(self, kind: str, name: str, obj: Any, origin: str = BUILTIN, provider: str = "",
            options: Any = None) -> Any:
        self._check_kind(kind)
        existing = self.entries[kind].get(name)
        if existing is not None and existing.obj is not obj:
            raise MtkitError(
                f"{kind} '{name}' is registered twice: by {existing.origin} and by {origin}. "
                "Rename one of them or uninstall one plugin."
            )
        options = options if options is not None else getattr(obj, "Options", None)
        self.entries[kind][name] = Entry(kind, name, obj, origin, provider, options)
        return obj

    def remove_provider(self, provider: str) -> None:
        """Drop every entry a plugin added (its registration failed half-way: plugin isolation)."""
        for entries in self.entries.values():
            for name in [n for n, e in entries.items() if e.provider == provider]:
                del entries[name]

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
        msg += did_you_mean(name, known, cutoff=0.5)
        provider = next((dist for (k, pattern), dist in self.known_providers.items()
                         if k == kind and fnmatch.fnmatchcase(name, pattern)), None)
        if provider:
            msg += f". It is provided by the plugin package '{provider}': pip install {provider}"
        else:
            msg += f". Installed {kind}s: {', '.join(known) if known else '(none)'}"
        if self.failed_plugins:  # the entry may be one of theirs
            msg += ". Not loaded, so their entries are missing: " + "; ".join(self.failed_plugins)
        return msg


# Every ``@register`` decoration, in order: (kind, name, object, options). Recording only; the plugin manager adds
# them to its registry (mtkit's own through the built-ins' hook, others with the origin of their module).
DECORATED: list[tuple[str, str, Any, Any]] = []


def register(kind: str, name: str | None = None, options: Any = None) -> Callable[[Any], Any]:
    """Decorator: ``@register("loss", "my_loss")`` declares the object as an entry of ``kind``; ``options`` is the
    pydantic model of its options (a class may instead carry it as its ``Options`` attribute)."""
    if kind not in KINDS:
        raise MtkitError(f"unknown registry kind '{kind}'; the kinds are: {', '.join(KINDS)}")

    def deco(obj: Any) -> Any:
        DECORATED.append((kind, name or obj.__name__, obj, options))
        return obj

    return deco


def origin_of_module(module: str) -> str:
    """``builtin`` for mtkit's own modules, else ``<distribution> <version>`` (or the module name)."""
    top = module.split(".")[0]
    if top == "mtkit":
        return BUILTIN
    dists = metadata.packages_distributions().get(top, [])
    if dists:
        return f"{dists[0]} {metadata.version(dists[0])}"
    return f"{module} (not installed)"


class RegistryView:
    """What the ``mtkit_register`` hook receives: ``add`` and ``register`` record each entry with the origin of the
    plugin being registered (its distribution and version), or of the object's module for a plugin that a user
    registers by hand later."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.origin: str | None = None  # set by the plugin manager while it registers one plugin
        self.provider = ""

    def add(self, kind: str, name: str, obj: Any, options: Any = None) -> Any:
        origin = self.origin or origin_of_module(getattr(obj, "__module__", "mtkit"))
        return self._registry.add(kind, name, obj, origin=origin, provider=self.provider, options=options)

    def register(self, kind: str, name: str | None = None, options: Any = None) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            return self.add(kind, name or obj.__name__, obj, options)

        return deco
