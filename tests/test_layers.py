"""The folders are the architecture: the pure core imports no I/O, no layer imports one above it,
and no module imports itself in a circle (function-level imports count; `TYPE_CHECKING` ones don't).
"""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"

# Lower numbers sit lower: a module may import its own layer and any below it.
LAYERS = {
    "errors": 0,
    "core": 0,
    "clock": 1,
    "notify": 1,
    "config": 1,
    "process": 2,
    "state": 2,
    "code": 2,
    "data": 2,
    "client": 3,
    "control": 3,
    "daemon": 4,
    "cli": 5,
    "demo": 5,
    "__main__": 6,
}

# What the pure core may use: data types and arithmetic, nothing that reads a clock, a file, a
# process or a socket, and no logging (the runtime logs transitions).
CORE_STDLIB = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "itertools",
    "math",
    "random",
    "re",
    # the backoff formula is built of its wait strategies: arithmetic, no clock, no I/O (read)
    "tenacity",
    "typing",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every module `path` imports at run time, anywhere in the file (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            found.add(base)
            # `from supervisor.core import swaps` imports the module supervisor.core.swaps
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _own_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


MODULES = _own_modules()


def _graph() -> dict[str, set[str]]:
    return {
        name: {imported for imported in _imports(path) if imported in MODULES and imported != name}
        for name, path in MODULES.items()
    }


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: __version__
    return LAYERS[parts[1]]


def test_every_module_sits_in_a_known_layer() -> None:
    unknown = sorted(m for m in MODULES if m != "supervisor" and m.split(".")[1] not in LAYERS)
    assert not unknown, f"place these in a layer of LAYERS: {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("supervisor.core")))
def test_the_core_imports_no_io(module: str) -> None:
    allowed_own = ("supervisor.core", "supervisor.errors")
    bad = sorted(
        name
        for name in _imports(MODULES[module])
        if not name.startswith(allowed_own)
        and name.split(".")[0] not in CORE_STDLIB
        and name != "supervisor"
    )
    assert not bad, f"{module} imports {bad}: the core takes the time and facts as events"


def test_no_layer_imports_one_above_it() -> None:
    upward = sorted(
        f"{importer} -> {imported}"
        for importer, targets in _graph().items()
        for imported in targets
        if importer != "supervisor" and _layer(imported) > _layer(importer)
    )
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package importing its own submodules (re-exports) is not a cycle of the design.
    cycles = [
        c for c in cycles if not any(b.startswith(a + ".") for a, b in itertools.pairwise(c))
    ]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
