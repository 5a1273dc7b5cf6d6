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


def test_the_plugin_contract_names_every_internal_package():
    """A new mtkit package or module is forbidden to plugins too: the contract by package covers everything but
    the plugin API, and the package face is forbidden on its own."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    by_package = next(c for c in config if c["name"].endswith("no internal package"))["forbidden_modules"]
    face = next(c for c in config if c["name"].endswith("not the package face"))["forbidden_modules"]
    assert face == ["mtkit"]
    for path in sorted((ROOT / "mtkit").iterdir()):
        if path.name in ("__init__.py", "plugin_api.py", "py.typed", "__pycache__"):
            continue
        module = f"mtkit.{path.stem}"
        assert module in by_package, f"{module} is missing from the plugin contract in pyproject.toml"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the mtkit modules (or package faces) it imports at module level; ``from a import b`` of a
    submodule b counts as an import of a.b (and of the face a, which Python runs first)."""
    modules = {_module_name(p) for p in CORE_SOURCES}
    graph: dict[str, set[str]] = {}
    for path in CORE_SOURCES:
        me = _module_name(path)
        edges = set()
        tree = ast.parse(path.read_text())
        package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        for node in tree.body:
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):  # every package face on the way runs too
                    name = ".".join(parts[:k])
                    if name in modules and name != me and not me.startswith(name + "."):
                        edges.add(name)
        graph[me] = edges
    return graph


def test_no_module_imports_its_own_package_face():
    """A module inside a package imports its siblings directly, never a name of the face it lives in
    (``from . import Name``, ``from mtkit.pkg import Name`` inside mtkit.pkg), which would hide a cycle behind the
    face (as mtkit-attacks' targeted attacks did)."""
    for path in [*CORE_SOURCES, *PLUGIN_SOURCES]:
        if path.name == "__init__.py":
            continue
        package = _module_name(path).rsplit(".", 1)[0] if path.is_relative_to(ROOT / "mtkit") else path.parent.name
        for node in ast.parse(path.read_text()).body:
            siblings = {q.stem for q in path.parent.iterdir() if q.suffix == ".py" or (q / "__init__.py").is_file()}
            face = isinstance(node, ast.ImportFrom) and (
                (node.level == 1 and node.module is None and any(a.name not in siblings for a in node.names))
                or (not node.level and node.module == package))
            assert not face, f"{path.relative_to(ROOT)}:{node.lineno} imports its own package face ({package})"


def test_no_import_cycle():
    """The module-level import graph of mtkit (package faces included) has no cycle."""
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_layout_stays_small():
    """The folder is the table of contents: at most 6 flat modules in mtkit/; no module over 300 lines in mtkit/
    or plugins/; no function over 100 lines and at most 3 over 80; no class over 200."""
    flat = sorted(p.name for p in (ROOT / "mtkit").glob("*.py"))
    assert len(flat) <= 6, flat
    long_functions = []
    for path in [*CORE_SOURCES, *PLUGIN_SOURCES]:
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert len(text.splitlines()) <= 300, f"{where} has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert size <= 100, f"{where}:{node.lineno} {node.name} has {size} lines"
                if size > 80:
                    long_functions.append(f"{where}:{node.name}")
            elif isinstance(node, ast.ClassDef):
                assert size <= 200, f"{where}:{node.lineno} class {node.name} has {size} lines"
    assert len(long_functions) <= 3, long_functions


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
    registry = _modules_after(f"from mtkit.recipe.load import load_recipe\nload_recipe({paper!r})\n"
                              "from mtkit.plugins.manager import list_entries\nlist_entries()")
    assert "torch" in registry and not registry & (heavy - {"torch"})


def test_no_package_face_shadows_one_of_its_modules():
    """A face that exports a function named like one of its modules (``render`` over ``render.py``) hides the
    module from ``from pkg import module`` and from monkeypatch paths: every face keeps its modules reachable."""
    import importlib

    faces = [p.parent for p in [*CORE_SOURCES, *PLUGIN_SOURCES] if p.name == "__init__.py"]
    for folder in faces:
        name = _module_name(folder / "__init__.py") if folder.is_relative_to(ROOT / "mtkit") else folder.name
        package = importlib.import_module(name)
        for child in folder.iterdir():
            stem = child.stem if child.suffix == ".py" else child.name if (child / "__init__.py").is_file() else None
            if stem in (None, "__init__"):
                continue
            value = getattr(package, stem, None)
            assert value is None or getattr(value, "__name__", "") == f"{name}.{stem}", (
                f"{name} exports a '{stem}' that is not its module {name}.{stem}")
