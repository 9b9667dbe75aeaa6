"""The package's layers, read from its source: no import circle among fdfo's modules, and the commands on top.

Every ``import`` and ``from ... import`` of every module counts, those inside functions too: an import
moved into a function still makes its module depend on the other, and only hides a circle until the
function runs. The commands (``python -m fdfo.train``, ``fdfo.generate``, ``fdfo.evaluate`` and the
evaluation protocol that ``fdfo.evaluate --protocol`` runs) parse a command line and call the library;
no library module imports one, so the library can be used, and tested, without any command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fdfo"
COMMANDS = {"fdfo.train", "fdfo.generate", "fdfo.evaluate", "fdfo.evaluate_protocol", "fdfo.export",
            "fdfo.rewards.serve"}


def module_files() -> dict[str, Path]:
    """Module name -> source file, for the package and every module below it."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The fdfo modules that module ``name`` imports anywhere in its source. ``from P import x`` imports
    module ``P.x`` when there is one, else package ``P``; a relative import is resolved against the
    module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: each is an import circle."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        # (recursive: the package's import chains are a few dozen modules deep at most)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def circle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle inside a strongly connected component, as the chain of imports that closes it."""
    members, start = set(component), component[0]
    paths, queue = {start: [start]}, [start]
    while queue:  # breadth first: the shortest way back to the start
        node = queue.pop(0)
        for other in sorted(graph[node] & members):
            if other == start:
                return paths[node] + [start]
            if other not in paths:
                paths[other] = paths[node] + [other]
                queue.append(other)
    return component


def test_the_graph_sees_imports_of_every_form():
    graph = import_graph()
    assert "fdfo.trainer" in graph and "fdfo.kernels.launch" in graph and "fdfo.rewards" in graph
    assert "fdfo.kernels.launch" in graph["fdfo.kernels.fd_loss_triton"]  # from .launch import ...
    assert "fdfo.inference" in graph["fdfo.generate"]  # from fdfo import inference
    assert "fdfo.images" in graph["fdfo.report"]  # from fdfo.images import image_grid


def test_no_import_circle():
    graph = import_graph()
    circles = [" -> ".join(circle_through(graph, c)) for c in strongly_connected(graph)]
    assert not circles, "import circles among fdfo's modules:\n" + "\n".join(circles)


def test_tarjan_finds_a_circle_and_the_chain_that_closes_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert circle_through(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_library_module_imports_a_command():
    graph = import_graph()
    assert COMMANDS <= set(graph)
    offenders = sorted(f"{name} imports {', '.join(sorted(graph[name] & COMMANDS))}"
                       for name in graph if name not in COMMANDS and graph[name] & COMMANDS)
    assert not offenders, "library modules that import a command:\n" + "\n".join(offenders)
