"""The import graph of src/ and plugins/ (imports inside functions included) has no cycle, and no module imports
another package's `_private` names: the core imports no backend, a backend no other backend and no Airflow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"goldsmith": ROOT / "src" / "goldsmith", "goldsmith.operators": ROOT / "plugins" / "operators"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import mod` imports a module; `from mod import name` a name
                found.append((f"{base}.{alias.name}", None) if f"{base}.{alias.name}" in MODULES else (base, alias.name))
    return found


GRAPH = {m: {target for target, _ in _imports(m, p) if target in MODULES and target != m} for m, p in MODULES.items()}


def _top(module: str) -> str:
    """The part of the house a module belongs to: goldsmith.local, goldsmith.azure, goldsmith.operators, or the
    module itself for the core's top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in PACKAGES else module


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_the_modules():
    assert {"goldsmith.core", "goldsmith.local.backend", "goldsmith.azure.backend", "goldsmith.operators.steps"} <= set(MODULES)
    assert "goldsmith.core" in GRAPH["goldsmith.operators.steps"]


def test_no_import_cycle():
    assert _cycles() == []


def test_no_private_name_of_another_package():
    offenders = [f"{m} imports {name} from {target}"
                 for m, p in MODULES.items() for target, name in _imports(m, p)
                 if name and name.startswith("_") and not name.startswith("__") and _top(target) != _top(m)]
    assert offenders == []


def test_the_core_imports_no_backend_and_no_airflow():
    core = ["goldsmith.core", "goldsmith.versions"]
    offenders = [f"{m} imports {target}" for m in core for target, _ in _imports(m, MODULES[m])
                 if _top(target) in ("goldsmith.local", "goldsmith.azure", "goldsmith.operators")
                 or target.split(".")[0] == "airflow"]
    assert offenders == []
