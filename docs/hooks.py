"""mkdocs hooks: the reference pages are generated from the code at build time, so they cannot drift.

A page writes a marker line and the hook replaces it:

- ``<!-- mtkit:recipe-schema -->``: every key of the recipe schema (``mtkit.core.schema.Recipe``) with its type,
  default and description, section by section;
- ``<!-- mtkit:exports MODULE -->``: every name of ``MODULE.__all__`` (``mtkit.plugin_api``, ``mtkit.api``),
  rendered by mkdocstrings from the object it names;
- ``<!-- mtkit:registry -->``: the built-in registry entries by kind (what ``mtkit list`` shows);
- ``<!-- mtkit:layout -->``: the packages of ``mtkit`` and the first line of each module's docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent


def _type(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(?:[a-z_]+\.)+([A-Za-z_]\w*)", r"\1", text)  # typing.Literal, mtkit.core.schema.data.X
    return text.replace("NoneType", "None")


def _default(info) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()
        except TypeError:
            return "(computed)"
    elif info.default is PydanticUndefined:
        return "**required**"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`"


def recipe_schema() -> str:
    from mtkit.core.schema import Recipe
    from mtkit.recipe.load import model_in

    out, seen = [], set()

    def section(model: type[BaseModel], path: str) -> None:
        if (model, path) in seen:
            return
        seen.add((model, path))
        title = path or "top level"
        doc = inspect.cleandoc(model.__doc__ or "")
        out.extend([f"## `{title}`", "", f"*{model.__name__}*: {doc}" if doc else f"*{model.__name__}*", "",
                    "| key | type | default | description |", "|---|---|---|---|"])
        nested = []
        for name, info in model.model_fields.items():
            key = info.alias or name
            sub = model_in(info.annotation)
            desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | `{_type(info.annotation)}` | {_default(info)} | {desc} |")
            if sub is not None:
                inner = f"{path}.{key}" if path else key
                if "dict[" in str(info.annotation):
                    inner += ".<key>"
                elif "list[" in str(info.annotation):
                    inner += "[i]"
                nested.append((sub, inner))
        out.append("")
        for sub, inner in nested:
            section(sub, inner)

    section(Recipe, "")
    return "\n".join(out)


def exports(module_name: str) -> str:
    """Every name of ``module_name.__all__``, rendered by mkdocstrings from the object it names."""
    api = importlib.import_module(module_name)
    out = []
    for name in sorted(api.__all__, key=str.lower):
        obj = getattr(api, name)
        module = getattr(obj, "__module__", None) or ""
        out.append(f"### `{name}`\n")
        if module.startswith("mtkit") and (inspect.isclass(obj) or inspect.isfunction(obj)):
            out.append(f"::: {module}.{obj.__qualname__}\n    options:\n      show_root_heading: false\n")
        elif isinstance(obj, int | float | str):
            out.append(f"A constant: `{name} = {obj!r}`.\n")
        else:
            origin = getattr(obj, "__module__", type(obj).__module__).split(".")[0]
            out.append(f"Re-exported from {origin}: `{origin}.{name}`, documented by {origin} itself.\n")
    return "\n".join(out)


def registry() -> str:
    from mtkit.plugins.manager import list_entries

    out = ["| kind | name | origin | description |", "|---|---|---|---|"]
    for e in list_entries():
        kind, name, origin = e["kind"], e["name"], e["origin"]
        out.append(f"| {kind} | `{name}` | {origin} | {(e.get('doc') or '').replace('|', '/')} |")
    return "\n".join(out)


def layout() -> str:
    out = ["| module | what it holds |", "|---|---|"]
    for path in sorted((ROOT / "mtkit").rglob("*.py")):
        rel = path.relative_to(ROOT)
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.split("\n\n")[0].replace("\n", " ").replace("|", "/")
        out.append(f"| `{module}` | {first} |")
    return "\n".join(out)


MARKERS = {"<!-- mtkit:recipe-schema -->": recipe_schema, "<!-- mtkit:registry -->": registry,
           "<!-- mtkit:layout -->": layout}
EXPORTS = re.compile(r"<!-- mtkit:exports ([\w.]+) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return EXPORTS.sub(lambda m: exports(m.group(1)), markdown)
