"""The package's import graph has no cycle, deferred (function-level) imports included.

Imports under `if TYPE_CHECKING:` never run, so they are left out; so is the implicit import of a
package's __init__ by its submodules (a package listing its submodules is no cycle). A package that
discovers its submodules (`pkgutil.iter_modules(__path__)`, as edgekd.stages does) imports each.
"""

import ast
from pathlib import Path

import edgekd

ROOT = Path(edgekd.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules `module` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    source = path.read_text()
    visit(ast.parse(source, str(path)))
    if path.name == "__init__.py" and "iter_modules(__path__)" in source:
        found.update(m for m in modules if m.rpartition(".")[0] == module)
    return {m for m in found if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, p, set(modules)) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_deferred_relative_and_submodule_imports():
    graph = import_graph()
    assert "edgekd.stages.distill" in graph["edgekd.stages"]  # from edgekd.stages import distill
    assert "edgekd.rundir" in graph["edgekd.train"]  # from edgekd.rundir import CHECKPOINT
    assert "edgekd.pipeline" in graph["edgekd.cli"]  # inside a function
    assert "edgekd.effective" not in graph["edgekd.context"]  # under TYPE_CHECKING


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
