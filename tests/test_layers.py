"""The design's layers, read from the source (nothing under test is imported): arrows go down only
(fitflow/ -> flows/ -> tasks/), tasks/ never imports prefect, the training loop and the tasks/
modules it imports never import mlflow, no import circles. Imports inside functions count, those
under `if TYPE_CHECKING:` do not (they never run). Each test reports every violation, file:line."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("tasks", "flows", "fitflow")  # low to high: a module imports its own layer or lower ones
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
LOOP = ("tasks.training", "tasks.callbacks", "tasks.device", "tasks.checkpoints")
FILES = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
         for layer in LAYERS for path in sorted((REPO / layer).rglob("*.py"))}


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import in `module`; a project module as its file's name."""
    found, todo = [], [ast.parse(FILES[module].read_text(encoding="utf-8"))]
    package = module.split(".")[: None if FILES[module].name == "__init__.py" else -1]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) + 1 - node.level] if node.level else []
            base = ".".join(parts + [node.module] if node.module else parts)
            found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base, node.lineno) for a in node.names]
    return sorted(set(found), key=lambda item: (item[1], item[0]))


IMPORTS = {module: _imports(module) for module in FILES}
EDGES = {m: [(t, line) for t, line in IMPORTS[m] if t in FILES and t != m] for m in FILES}


def _at(module: str, line: int) -> str:
    return f"{FILES[module].relative_to(REPO)}:{line}"


def test_arrows_go_down_and_tasks_never_imports_prefect():
    bad = [f"{_at(m, line)}: {m} imports {name}" for m in FILES for name, line in IMPORTS[m]
           if RANK.get(name.split(".")[0], -1) > RANK[m.split(".")[0]]
           or (m.startswith("tasks") and name.split(".")[0].startswith("prefect"))]
    assert not bad, "\n".join(bad)


def test_the_training_loop_and_what_it_imports_never_import_mlflow():
    via, todo = dict.fromkeys(LOOP, ""), list(LOOP)
    while todo:
        module = todo.pop()
        for target, _ in EDGES[module]:
            if target not in via:
                via[target] = f" (imported by {module})"
                todo.append(target)
    bad = [f"{_at(m, line)}: {m}{via[m]} imports {name}" for m in sorted(via) for name, line in IMPORTS[m]
           if name.split(".")[0] == "mlflow"]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    cycles, done, path = [], set(), []  # path: the modules being visited, each with its line that goes on

    def visit(module: str) -> None:
        for target, line in EDGES[module]:
            path.append((module, line))
            names = [name for name, _ in path]
            if target in names:
                cycles.append(" -> ".join(f"{m} ({_at(m, ln)})" for m, ln in path[names.index(target):]) + f" -> {target}")
            elif target not in done:
                visit(target)
            path.pop()
        done.add(module)

    for module in FILES:
        if module not in done:
            visit(module)
    assert not cycles, "import circles:\n" + "\n".join(cycles)
