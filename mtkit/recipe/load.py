"""Recipes: YAML files validated into typed config objects (``mtkit.core.schema``) before anything runs.

A recipe may ``extends: other.yaml`` (path relative to the recipe; mappings merge key by key, lists and scalars
are replaced) and the CLI may override any key with ``-o dotted.key=value`` (the value is parsed as YAML).
Validation errors name the file, the dotted key path and what was expected, with suggestions for misspellings,
including the options of registry entries (datasets, perturbations), which their entries declare.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..core.errors import RecipeError, did_you_mean, value_problem
from ..core.schema import Recipe
from ..models.tasks import BUILTIN_TASKS
from ..plugins.manager import get_registry
from .build import options_for


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file: give a .yaml recipe, e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded): save the recipe as UTF-8"
                          ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


MAX_EXTENDS = 32  # recipes that extend recipes: far more than any real chain, far less than Python's recursion


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's merged mapping (``extends`` resolved, at most ``MAX_EXTENDS`` deep), before validation."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if len(_seen) >= MAX_EXTENDS:
        raise RecipeError(f"{_seen[0]}: its 'extends' chain is more than {MAX_EXTENDS} recipes deep (at {path}): "
                          "merge some of them into one")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: key 'extends' expected a file name (string), got {parent!r}")
    if not (path.parent / parent).exists():
        raise RecipeError(f"{path}: extends '{parent}', which is not there ({(path.parent / parent).resolve()}); "
                          "'extends' is relative to the recipe's folder")
    base = load_raw(path.parent / parent, (*_seen, path))
    return _deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like dotted.key=value, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override '{text}': empty key path")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError):  # not YAML (or a date YAML cannot build): the text itself
        parsed = value
    # YAML reads "1e-4" as a string: accept float-looking strings as floats
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            pass
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, k, keys[: i + 1], text)]
                continue
            _mapping(node, keys[:i], k, text)
            if k not in node or not isinstance(node[k], dict | list):
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, keys, text)] = value
        else:
            _mapping(node, keys[:-1], last, text)
            node[last] = value
    return data


def _mapping(node: Any, path: list[str], key: str, text: str) -> None:
    """An override may only descend through mappings and lists: a value (a number, a string) has no keys."""
    if not isinstance(node, dict):
        raise RecipeError(f"override '{text}': '{'.'.join(path)}' is the value {node!r}, not a mapping, so it has no "
                          f"key '{key}'")


def _list_index(node: list, k: str, path: list[str], text: str) -> int:
    if not k.lstrip("-").isdigit() or not -len(node) <= int(k) < len(node):
        raise RecipeError(f"override '{text}': '{'.'.join(path)}' needs a list index below {len(node)}")
    return int(k)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names (with aliases) of the model at ``loc`` for suggestions; list indices and the keys of a mapping
    of models (``data.eval.<key>``) are stepped over."""
    cls: Any = model
    skip = False
    for part in loc:
        if skip or isinstance(part, int) or cls is None:
            skip = False
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        fields = cls.model_fields
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return []
        skip = typing.get_origin(field.annotation) is dict
        cls = model_in(field.annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f.alias or n for n, f in cls.model_fields.items() if n != "source"]
    return []


def model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _fields_at(Recipe, loc[:-1])
            lines.append(f"unknown key '{path}'{did_you_mean(str(loc[-1]), known)} (allowed here: {', '.join(known)})")
        elif kind == "missing":
            lines.append(f"missing required key '{path}'")
        else:
            lines.append(value_problem(path, err))
    head = f"{source}: invalid recipe: "
    return head + lines[0] if len(lines) == 1 else head + "; ".join(lines)


def validate(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """The recipe's schema, then the names and options it gives registry entries."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    try:
        check_entries(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: invalid recipe: {exc}") from None
    recipe.source = source
    return recipe


def check_entries(recipe: Recipe) -> None:
    """Every registry name the recipe uses exists, and every entry's options validate against its model."""
    registry = get_registry()
    for where, cfg in recipe.datasets(used_only=False).items():
        options_for(_entry(registry, "dataset", cfg.name, f"{where}.name"), cfg.options, f"{where}.options")
    rob = recipe.robustness
    for name in rob.perturbations:
        _entry(registry, "perturbation", name, "robustness.perturbations")
    for name, opts in rob.options.items():
        options_for(_entry(registry, "perturbation", name, f"robustness.options.{name}"), opts,
                    f"robustness.options.{name}")
    det = recipe.detection
    options_for(_entry(registry, "detector", det.detector, "detection.detector"), det.options, "detection.options")
    for name in det.perturbations or ():
        _entry(registry, "perturbation", name, "detection.perturbations")
    for key in ("segmentation", "depth"):
        _entry(registry, "loss", getattr(recipe.loss, key), f"loss.{key}")
    for key in ("head", "depth_head"):
        _entry(registry, "head", getattr(recipe.model, key), f"model.{key}")
    for i, spec in enumerate(recipe.models):
        for task in spec.tasks:
            if task not in BUILTIN_TASKS:
                _entry(registry, "task", task, f"models.{i}.tasks")


def _entry(registry, kind: str, name: str, where: str):
    try:
        return registry.entry(kind, name)
    except RecipeError:
        raise
    except Exception as exc:  # UnknownEntryError: the registry's message with suggestions
        raise RecipeError(f"key '{where}': {exc}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge (``extends``), override (``-o``) and validate a recipe file."""
    data = apply_overrides(load_raw(path), list(overrides))
    return validate(data, str(path))
