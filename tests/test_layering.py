"""The package layering `cnm -> bench -> trainer -> pipeline`: no module imports a higher layer,
and the project's modules import each other without a cycle. Both read every import statement
(module-level and inside functions; not those under `if TYPE_CHECKING:`, which never run) from
the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "trainer", "bench", "cnm")  # a layer imports only itself and those before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that `path` (module `name`) imports, anywhere in its body.
    `from pkg import sub` counts as importing `pkg.sub` when that is a module, else `pkg`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m in modules}


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations only,
    never executed, so they make no import cycle)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, name, modules) - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    layer = {m: LAYERS.index(m.split(".")[0]) for m in graph}
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer[b] > layer[a])


def test_the_graph_is_read():
    graph = import_graph()
    assert "trainer.loop" in graph and "pipeline.errors" in graph["pipeline.fileio"]
    assert "pipeline.fileio" in graph["pipeline.data.manifest"]
    assert "trainer.distributed.grads" in graph["trainer.distributed.comm"]
    assert "trainer.distributed.comm" not in graph["trainer.distributed.grads"]  # TYPE_CHECKING only


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"pipeline.x": {"trainer.y"}, "trainer.y": set()}) == ["pipeline.x -> trainer.y"]


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []
