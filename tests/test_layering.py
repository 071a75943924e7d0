"""The package's one-way order: every fnabench import, function-local ones included, points down the stack.

Layers, low to high (docs/architecture.md draws them):
``_errors``/``_extras``/``_io``/``_registry``/``_version`` → ``measure`` → ``variants`` → ``patching`` → ``data``
→ ``models`` → ``adapters`` → ``tasks`` → ``analysis`` → ``harness`` → ``cli`` → ``testing`` → the package root
(its public API).

A module may import its own layer and any layer below it. Imports of fnabench modules stay at the top of
a module; only a module that needs an optional host library when it is imported (``DEFERRED``) may be
imported inside a function, so that ``import fnabench`` works without that library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fnabench"

BOTTOM = ("_errors", "_extras", "_io", "_registry", "_version")
LAYERS = [*BOTTOM, "measure", "variants", "patching", "data", "models", "adapters", "tasks", "analysis", "harness",
          "cli", "testing", ""]
#: the bottom modules share one layer: they import only the standard library and each other
RANK = {name: (0 if name in BOTTOM else LAYERS.index(name) - len(BOTTOM) + 1) for name in LAYERS}

#: modules that import an optional host library at module level (mmcv/mmseg, lmms-eval, datasets): the
#: only fnabench modules another module may import inside a function
DEFERRED = {"fnabench.adapters.mmseg", "fnabench.adapters.lmms", "fnabench.tasks.lmms_tasks.utils"}

#: imports that point up; empty, and kept so
ALLOWED_UP: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path):
    """(imported fnabench module, line, inside a function) for every import statement of ``module``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def in_function(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            if target == "fnabench" or target.startswith("fnabench."):
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                yield target, node.lineno, in_function(node)


EDGES = [(m, t, line, local) for m, p in MODULES.items() for t, line, local in _imports(m, p)]


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LAYERS)


def test_no_import_points_up():
    up = [f"{m}:{line} imports {t} ({_layer(m) or 'root'} → {_layer(t) or 'root'})"
          for m, t, line, _ in EDGES if RANK[_layer(t)] > RANK[_layer(m)] and (m, t) not in ALLOWED_UP]
    assert not up, "imports that point up the stack:\n" + "\n".join(up)


def test_fnabench_imports_sit_at_the_top_of_modules():
    local = [f"{m}:{line} imports {t} inside a function" for m, t, line, is_local in EDGES
             if is_local and t not in DEFERRED]
    assert not local, "move these imports to the top of their module:\n" + "\n".join(local)


def test_the_allow_list_is_empty():
    assert not ALLOWED_UP


@pytest.mark.parametrize("module", sorted(DEFERRED))
def test_deferred_modules_exist(module):
    assert module in MODULES
