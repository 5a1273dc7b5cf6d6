"""The documentation cannot drift: the strict docs build (mkdocs-material, the references generated from the code)
passes, every recipe key has a description, every name of the plugin API is in its reference, the README is
short."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from support import ROOT

from mtkit.core.schema import Recipe


def _hooks():
    spec = importlib.util.spec_from_file_location("mtkit_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for info in model.model_fields.values():
        for t in (info.annotation, *typing.get_args(info.annotation),
                  *(a for arg in typing.get_args(info.annotation) for a in typing.get_args(arg))):
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)


def test_every_recipe_key_has_a_description():
    seen: set = set()
    _models(Recipe, seen)
    assert len(seen) >= 12
    missing = [f"{m.__name__}.{n}" for m in seen for n, info in m.model_fields.items() if not info.description]
    assert not missing, f"schema fields without a description (a docstring under the field): {missing}"
    undocumented = [m.__name__ for m in seen if not (m.__doc__ or "").strip()]
    assert not undocumented, f"schema classes without a docstring: {undocumented}"


def test_the_recipe_reference_lists_every_key():
    page = _hooks().recipe_schema()
    seen: set = set()
    _models(Recipe, seen)
    for model in seen:
        for name, info in model.model_fields.items():
            assert f"| `{info.alias or name}` |" in page, f"{model.__name__}.{name} is not in the recipe reference"


def test_every_plugin_api_name_is_in_its_reference():
    import mtkit.plugin_api as api

    page = _hooks().exports("mtkit.plugin_api")
    for name in api.__all__:
        assert f"### `{name}`" in page, f"{name} of plugin_api.__all__ is missing from the plugin API reference"
    assert page.count("### ") == len(api.__all__)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: the manual belongs in docs/"


def test_the_strict_docs_build_passes(tmp_path):
    """``mkdocs build --strict``: a broken link, a reference to a missing object or a page outside the nav fails."""
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.fail("mkdocs is not installed in the test environment (it is a test extra)")
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for page in ("reference/cli", "reference/recipe", "reference/plugin-api", "reference/api", "reference/registry"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
