"""The layers of docs/architecture.md, as the imports draw them: no cycle, nothing reaching up.

Each module's layer is listed here as the drawing shows it; a new module must be
placed in it (and in the drawing) or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "polycell"

#: 1 job engine (no Jupyter), 2 routing, 3 IPython layer, 4 kernel, 5 command line.
LAYERS = {
    1: "job journal job_table interrupts thread task trio_task process fork child_pipe dask_runner "
    "dask_cluster parallel_map map_backend map_threads map_processes map_dask map_items builtin_standin "
    "after_import view cell stream_text",
    2: "routing program_output job_figures rich_output iopub journal_store stored_jobs journal_files "
    "dask_worker",
    3: "extension magics control history_pacing",
    4: "kernel kernelapp ipykernel_internals out_of_queue iopub_batch shared_socket zmq_io_threads",
    5: "cli kernel_link kernelspec headless notebook_run papermill_engine __main__ __init__",
}
LAYER = {module: layer for layer, names in LAYERS.items() for module in names.split()}

#: Imports that still reach up a layer; each is a debt, not a pattern to follow.
REACHING_UP = {
    ("dask_runner", "dask_worker"),  # the functions the cluster runs; they capture output like routing
    ("map_dask", "dask_worker"),
}


def _imports(path: Path) -> set[str]:
    """The polycell modules `path` imports, anywhere in it but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for top in ast.walk(tree)
        if isinstance(top, ast.If) and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING"
        for node in ast.walk(top)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "polycell":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("polycell."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("polycell.")}
    found.discard(path.stem)
    return found


def _graph() -> dict[str, set[str]]:
    return {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert set(_graph()) == set(LAYER)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_go_down_the_layers() -> None:
    upward = {
        (module, target)
        for module, targets in _graph().items()
        for target in targets
        if LAYER.get(target, 0) > LAYER.get(module, 0)
    }
    assert upward == REACHING_UP


def test_modules_are_readable_in_one_sitting() -> None:
    """About 400 lines; the ones still over are listed, and may only shrink."""
    over = {
        "dask_runner": 440,  # a task's two ways home (result and events) and its kill
    }
    for path in PACKAGE.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= over.get(path.stem, 420), f"{path.name}: {lines} lines"
