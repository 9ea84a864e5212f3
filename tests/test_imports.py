"""One direction of imports (issue 12): train.py is the loop and imports no task, not even
inside a function; the table from `config.task` to its task lives in main.py; and the import
graph of crate_jax/, function-level imports included, has no cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crate_jax"
TASK_MODULES = ("crate_jax.main", "crate_jax.pretrain", "crate_jax.evaluation", "crate_jax.tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every crate_jax module `name` imports anywhere in its file (a function body too)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from crate_jax.x import y`: the module crate_jax.x.y, or the name y of crate_jax.x
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_sees_function_level_imports():
    # Guards the walker itself: these imports sit inside functions.
    assert "crate_jax.data.tfrecord" in GRAPH["crate_jax.data.pipeline"]
    assert "crate_jax.evaluation.classifier" in GRAPH["crate_jax.api"]


def test_train_imports_no_task():
    bad = sorted(m for m in GRAPH["crate_jax.train"] if m.startswith(TASK_MODULES))
    assert not bad, f"crate_jax/train.py imports tasks: {bad}"


def test_main_holds_the_task_table():
    tree = ast.parse(MODULES["crate_jax.main"].read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if hasattr(t, "id")}
    assert {"TASKS", "RUNS"} <= names
    assert "crate_jax.main" in GRAPH["crate_jax.tools.aot_compile"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
