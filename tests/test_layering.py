"""The package's shape: no import cycle inside partita/runtime, and no private name imported across modules.

Read from the source with `ast` (every import statement, also those inside functions), so the
check needs no import of torch or zmq and sees imports that only run later.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "partita"


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from X import name` and ("X", "") of every `import X` in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
    return out


def _runtime_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of partita/runtime, its subpackages' too (a package is its __init__)."""
    modules = {}
    for path in (PACKAGE / "runtime").rglob("*.py"):
        parts = [part for part in path.relative_to(PACKAGE / "runtime").with_suffix("").parts if part != "__init__"]
        if parts:
            modules["partita.runtime." + ".".join(parts)] = path
    return modules


def _runtime_graph() -> dict[str, set[str]]:
    modules = _runtime_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, name in _imports(path):
            for candidate in (target, f"{target}.{name}"):
                if candidate in modules and candidate != module:
                    graph[module].add(candidate)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_runtime_has_no_import_cycle():
    assert _cycle(_runtime_graph()) is None


def test_the_cycle_check_sees_the_protocol_package_and_its_modules():
    graph = _runtime_graph()
    assert "partita.runtime.protocol.base" in graph["partita.runtime.protocol.commands"]
    assert "partita.runtime.protocol" in graph["partita.runtime.worker"]


def test_transitions_are_planned_without_sockets():
    """`plan_transition` is pure (docs/runtime.md): the module that plans transitions imports no zmq."""
    assert not [m for m, _ in _imports(PACKAGE / "runtime" / "transition.py") if m.split(".")[0] == "zmq"]


def test_the_cycle_check_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{path.relative_to(PACKAGE.parent)}: from {module} import {name}"
        for path in PACKAGE.rglob("*.py")
        for module, name in _imports(path)
        if module.startswith("partita") and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []
