"""Imports point one way: the lower layers (trace, trial, tasks, failures, metrics, engine)
never import the driver, the run or analysis, the pure metrics never import the engine, and
the lower layers hold no import cycle (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("study.trace", "study.trial", "study.tasks", "study.failures", "study.metrics",
         "study.engine")
UPPER = ("study.sweep", "study.run", "study.grid", "study.search", "study.workers",
         "study.records", "study.storage", "analysis")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("study", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolved to its longest module)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        targets = {resolve(n) for n in names} - {None, module}
        # A package's modules importing the package itself (its __init__) is no arrow up.
        graph[module] = {t for t in targets if not module.startswith(f"{t}.")}
    return graph


def _in(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(f"{layer}.") for layer in layers)


def test_the_lower_layers_never_import_the_upper_ones() -> None:
    graph = _graph()
    upward = sorted((m, d) for m, deps in graph.items() if _in(m, LOWER)
                    for d in deps if _in(d, UPPER))
    assert upward == []


@pytest.mark.parametrize(("module", "forbidden"), [
    ("study.metrics", ("study.engine",)),
    ("study.trace", LOWER[1:]),
    ("study.trial", ("study.failures", "study.engine", "study.metrics")),
    ("study.failures", ("study.engine", "study.metrics")),
])
def test_a_layer_imports_only_what_lies_below_it(module: str,
                                                 forbidden: tuple[str, ...]) -> None:
    graph = _graph()
    found = sorted((m, d) for m, deps in graph.items() if _in(m, (module,))
                   for d in deps if _in(d, forbidden) and not _in(d, (module,)))
    assert found == []


@pytest.mark.parametrize("layers", [LOWER, ("study",)], ids=["lower layers", "all of study"])
def test_no_import_cycle(layers: tuple[str, ...]) -> None:
    """Lazy imports count: a cycle through a function-level import is still a cycle (the
    sweep's driver, grid, search and edge expansions and plan stand in one order too)."""
    graph = {m: {d for d in deps if _in(d, layers)} for m, deps in _graph().items()
             if _in(m, layers)}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
