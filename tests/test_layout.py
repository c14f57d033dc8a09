"""The shape of the code base: small modules, and no import cycle in the core
(imports inside functions count: a lazy import is how a cycle hides)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
MAX_LINES = 500


def python_files():
    for top in ("comox", "plugins"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in python_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_imports(path: Path, name: str) -> set[str]:
    """Modules of ``comox`` that ``path`` imports when it runs (not those
    imported only under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                submodules = [f"{module}.{alias.name}" for alias in node.names]
                targets = submodules if node.module is None else [module] + submodules
            else:
                targets = [node.module or ""]
            found.update(t for t in targets if t.startswith("comox"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("comox"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted((ROOT / "comox").rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in runtime_imports(path, name) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, stack + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle_in_the_core():
    graph = import_graph()
    # The package's __init__ re-exports everything; a submodule importing it
    # would be a cycle by definition, so leave it out and check the rest.
    graph.pop("comox")
    for deps in graph.values():
        assert "comox" not in deps, "a submodule imports the package itself"
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
