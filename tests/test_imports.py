"""The import graph of the project's modules has no circles, and no library module imports a script: each piece can be
read (and copied) with what it imports, and nothing below an entry point depends on it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Top-level modules by name, and the support folders' modules by dotted name (evaluation.tasks, loading.weights, ...).
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {
    f"{p.parent.name}.{p.stem}": p for init in ROOT.glob("*/__init__.py") for p in init.parent.glob("*.py")
    if p.stem != "__init__"}
# Entry points: run, never imported by library code (a benchmark may import another benchmark or the recipe).
SCRIPTS = {"bench", "benchmarks.bench_cp", "benchmarks.bench_data", "benchmarks.bench_masks", "benchmarks.bench_tiles",
           "build_corpus", "eval", "plot_runs", "train"}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(source: str) -> set[str]:
    """The project modules `source` imports anywhere (also inside functions), except under `if TYPE_CHECKING:`."""
    found, todo = set(), [ast.parse(source)]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)  # from loading.weights import ...
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from loading import weights
        todo += [child for child in ast.iter_child_nodes(node) if not _is_type_checking(child)]
    return found & MODULES.keys()


def graph() -> dict[str, set[str]]:
    return {name: imports(path.read_text()) - {name} for name, path in MODULES.items()}


def circles(g: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                out.append(component)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_imports_skips_type_checking_and_sees_function_imports():
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import data\ndef f():\n    import model\n"
    assert imports(src) == {"model"}


def test_no_import_circles():
    found = circles(graph())
    assert not found, f"modules that import each other: {found}"


def test_no_library_module_imports_a_script():
    found = {name: deps & SCRIPTS for name, deps in graph().items() if name not in SCRIPTS and deps & SCRIPTS}
    assert not found, f"library modules importing scripts: {found}"
