"""Architecture checks that run with the suite (and so in CI): import-linter's contracts in pyproject.toml, ruff,
plugins that import only the public plugin API, and no function-level import of mtkit that would hide a cycle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from support import ROOT

PLUGIN_SOURCES = sorted((ROOT / "plugins").glob("*/mtkit_*/*.py"))
CORE_SOURCES = sorted((ROOT / "mtkit").rglob("*.py"))


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed in the test environment (it is a test extra)")
    return found


def test_import_contracts_hold():
    """Layers from the CLI down to the registry and the errors, no upward import and so no cycle."""
    out = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_is_clean():
    out = subprocess.run([_tool("ruff"), "check", "mtkit", "plugins", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]


def _mtkit_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of every import of mtkit in a file."""
    tree = ast.parse(path.read_text())
    found = []
    package = "mtkit." + ".".join(path.relative_to(ROOT / "mtkit").with_suffix("").parts[:-1]) \
        if path.is_relative_to(ROOT / "mtkit") else ""

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inner) for a in child.names if a.name.split(".")[0] == "mtkit")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rstrip(".").split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                if module.split(".")[0] == "mtkit":
                    found.append((module, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def test_shipped_plugins_import_only_the_plugin_api():
    assert PLUGIN_SOURCES, "no plugin sources found"
    for path in PLUGIN_SOURCES:
        for module, line, _ in _mtkit_imports(path):
            assert module == "mtkit.plugin_api", f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_the_plugin_contract_names_every_internal_module():
    """A new mtkit module is forbidden to plugins too: the contract's list covers every module but the API."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in config if c["name"].startswith("Plugins import only"))["forbidden_modules"]
    for path in CORE_SOURCES:
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "mtkit.plugin_api":
            continue
        covered = module in forbidden or ".".join(module.split(".")[:2]) + ".*" in forbidden
        assert covered, f"{module} is missing from the plugin contract in pyproject.toml"


def test_no_function_level_import_of_mtkit_outside_the_cli():
    """Imports inside functions would hide an import cycle; only the CLI defers them (fast start-up)."""
    for path in CORE_SOURCES:
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for module, line, inner in _mtkit_imports(path):
            assert not inner, f"{path.relative_to(ROOT)}:{line} imports {module} inside a function"


def _modules_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after ``code``."""
    import json

    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    """`mtkit --help` starts in a tenth of a second: importing the CLI (and running --help) loads neither torch
    nor timm nor torchvision; listing the registry and validating a recipe load torch but neither timm nor
    torchvision nor scikit-image (a second and more of imports, only when a model is built or data is
    augmented)."""
    heavy = {"torch", "timm", "torchvision", "segmentation_models_pytorch", "scipy", "skimage", "matplotlib"}
    assert not _modules_after("import mtkit.cli") & heavy
    assert not _modules_after("from mtkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")\
        & heavy
    paper = str(ROOT / "recipes" / "paper.yaml")
    registry = _modules_after(f"from mtkit.recipe import load_recipe\nload_recipe({paper!r})\n"
                              "from mtkit.plugins import list_entries\nlist_entries()")
    assert "torch" in registry and not registry & (heavy - {"torch"})
