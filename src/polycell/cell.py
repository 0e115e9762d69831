"""Turning a cell's text into code a runner can execute, as IPython would run it.

IPython's own ``run_cell`` is not reentrant: it owns the execution count, the
display hook and the history of *the* current cell. A background cell must not
touch any of that, so it is compiled here with IPython's public pieces instead
(``transform_cell`` for magics and ``!`` commands, the shell's caching compiler
for ``__future__`` flags and tracebacks that show the cell's lines), and its
last expression is split off so its value can become the job's result.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import marshal
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from types import CodeType, TracebackType
from typing import Any

__all__ = [
    "CellWork",
    "CompiledCell",
    "cell_traceback_start",
    "compile_cell",
    "compile_source",
    "free_names",
    "user_code_start",
]


@dataclass
class CompiledCell:
    """A cell split into its statements and its last expression (if it ends in one)."""

    source: str
    filename: str
    body: CodeType | None
    last_expr: CodeType | None
    is_async: bool

    @cached_property
    def assigned(self) -> list[str]:
        """Names a top-level statement of the cell binds (assignments, imports, def, class, for).

        Worked out when first asked (a process job sends them back; most cells never
        need them), from `source`, as are `free`.
        """
        module, _ = _split_last_expression(ast.parse(self.source))
        return assigned_names(module)

    @cached_property
    def free(self) -> list[str]:
        """Names the cell reads before (or without) binding them: what it needs from the namespace."""
        return free_names(ast.parse(self.source))

    def __getstate__(self) -> dict[str, Any]:
        """Ship the code objects as `marshal` bytes, which keep their file name.

        A dask cell travels by cloudpickle, and cloudpickle 3.1.3 on renames every
        code object it pickles ``<dynamic-code>``: the worker's traceback would then
        start in polycell's frames and show no line of the cell. `marshal` is what
        CPython itself stores code in, and needs the same Python on both ends, as
        pickled code always has.
        """
        state = dict(self.__dict__)
        for name in ("body", "last_expr"):
            if state[name] is not None:
                state[name] = marshal.dumps(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("body", "last_expr"):
            if state[name] is not None:
                state[name] = marshal.loads(state[name])
        self.__dict__.update(state)

    def _codes(self) -> list[tuple[CodeType, bool]]:
        codes = []
        if self.body is not None:
            codes.append((self.body, False))
        if self.last_expr is not None:
            codes.append((self.last_expr, True))
        return codes

    def run(self, namespace: dict[str, Any]) -> Any:
        """Run in the calling thread; an async cell gets an event loop of its own."""
        if self.is_async:
            return asyncio.run(self.run_async(namespace))
        value = None
        for code, is_expr in self._codes():
            result = eval(code, namespace)  # noqa: S307 - running the user's own cell is the point
            if is_expr:
                value = result
        return value

    async def run_async(self, namespace: dict[str, Any]) -> Any:
        """Run as a coroutine on the running loop, awaiting top-level ``await``s."""
        value = None
        for code, is_expr in self._codes():
            result = eval(code, namespace)  # noqa: S307
            if code.co_flags & inspect.CO_COROUTINE:
                result = await result
            if is_expr:
                value = result
        return value


def _nothing(*_args: Any) -> None:
    return None


@dataclass
class CellWork:
    """A cell to run as a job: the one work item every runner's ``submit`` takes.

    Each mode takes what it needs: a thread calls `run`, a task awaits
    `run_async`, a forked child calls `in_child` then `run` and sends back the
    names the cell assigns, dask ships `cell` with the names it reads (not
    `hidden`). How a value or an error is shown is the caller's (`on_value`,
    `on_error`, called in the job's context); `on_end` runs there too when the
    code has ended, however it ended.
    """

    cell: CompiledCell
    namespace: dict[str, Any]
    on_value: Callable[[Any], None] = _nothing
    on_error: Callable[[BaseException], None] = _nothing
    on_end: Callable[[], None] = _nothing
    in_child: Callable[[], None] = _nothing
    #: The names of the namespace that are not the user's (IPython's ``In``, ``Out``...),
    #: asked for only by a runner that ships names: a notebook's grow with every cell.
    hidden: Callable[[], Iterable[str]] = tuple

    def run(self) -> Any:
        try:
            try:
                value = self.cell.run(self.namespace)
            except BaseException as exc:
                self.on_error(exc)
                raise
            self.on_value(value)
            return value
        finally:
            self.on_end()

    async def run_async(self) -> Any:
        try:
            try:
                value = await self.cell.run_async(self.namespace)
            except BaseException as exc:
                self.on_error(exc)
                raise
            self.on_value(value)
            return value
        finally:
            self.on_end()

    def run_in_child(self) -> Any:
        self.in_child()
        return self.run()


def _bound_names(node: ast.AST) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Name):
        names.append(node.id)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            names.extend(_bound_names(elt))
    elif isinstance(node, ast.Starred):
        names.extend(_bound_names(node.value))
    return names


def assigned_names(module: ast.Module) -> list[str]:
    """Names bound by the module's top-level statements, in order, without repeats.

    Top level means what the cell's own namespace receives: assignments, ``for``
    and ``with`` targets, imports, ``def`` and ``class``, including those nested
    in top-level ``if``/``try``/``for``/``while``/``with`` blocks.
    """
    names: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for stmt in statements:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(stmt.name)
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    names.extend(_bound_names(target))
            elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
                names.extend(_bound_names(stmt.target))
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for alias in stmt.names:
                    if alias.name != "*":
                        names.append(alias.asname or alias.name.split(".")[0])
            elif isinstance(stmt, (ast.For, ast.AsyncFor)):
                names.extend(_bound_names(stmt.target))
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        names.extend(_bound_names(item.optional_vars))
                visit(stmt.body)
            elif isinstance(stmt, ast.While):
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.If):
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
                visit(stmt.body)  # type: ignore[attr-defined]
                for handler in stmt.handlers:  # type: ignore[attr-defined]
                    if handler.name:
                        names.append(handler.name)
                    visit(handler.body)
                visit(stmt.orelse)  # type: ignore[attr-defined]
                visit(stmt.finalbody)  # type: ignore[attr-defined]

    visit(module.body)
    return list(dict.fromkeys(names))


def _scope_locals(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Parameters and names a function or lambda binds: its reads of them are not free."""
    args = node.args
    names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
    names.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    body = node.body if isinstance(node.body, list) else [node.body]
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
    return names


def free_names(module: ast.Module) -> list[str]:
    """Names the module reads that no earlier top-level statement bound, in order.

    What a cell needs from the notebook when it runs elsewhere (a dask worker).
    Deliberately generous (a read inside a function counts unless that function
    binds the name): shipping a name too many costs a little pickling, one too
    few a NameError on the worker.
    """
    bound: set[str] = set()
    free: list[str] = []
    for stmt in module.body:
        local: set[str] = set()
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                local |= _scope_locals(node)
            elif isinstance(node, ast.comprehension):
                local.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
        for node in ast.walk(stmt):
            if (
                isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Load)
                and node.id not in bound
                and node.id not in local
            ):
                free.append(node.id)
        bound.update(assigned_names(ast.Module(body=[stmt], type_ignores=[])))
    return list(dict.fromkeys(free))


def compile_cell(shell: Any, raw_cell: str, number: int) -> CompiledCell:
    """Compile a cell's text like IPython would, for running in the background.

    `number` names the cell in tracebacks (the execution count of the cell that
    started the job). Raises SyntaxError for code that does not compile.
    """
    source = shell.transform_cell(raw_cell)
    filename = shell.compile.cache(source, number, raw_cell)
    return compile_source(source, filename, shell.compile.flags)


def compile_source(source: str, filename: str, flags: int = 0) -> CompiledCell:
    """Compile Python source (magics already transformed) into a cell a runner can run.

    The engine's half of `compile_cell`, which needs no shell: the runners and
    their tests run what this returns. Top-level ``await`` is allowed, and the
    last expression is kept apart, so its value is the cell's value.
    """
    module, last = _split_last_expression(ast.parse(source, filename=filename))
    flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

    def build(node: ast.mod, mode: str) -> CodeType:
        return compile(node, filename, mode, flags=flags, dont_inherit=True)

    body = build(module, "exec") if module.body else None
    last_expr = build(ast.Expression(last), "eval") if last is not None else None
    is_async = any(code.co_flags & inspect.CO_COROUTINE for code in (body, last_expr) if code is not None)
    return CompiledCell(source, filename, body, last_expr, is_async)


def _split_last_expression(module: ast.Module) -> tuple[ast.Module, ast.expr | None]:
    """The module without its last statement if that is an expression, and that expression."""
    if module.body and isinstance(module.body[-1], ast.Expr):
        return module, module.body.pop().value  # type: ignore[attr-defined]
    return module, None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _outside_polycell(code_file: str) -> bool:
    return os.path.dirname(os.path.abspath(code_file)) != _PACKAGE_DIR


def user_code_start(tb: TracebackType | None, filename: str | None = None) -> TracebackType | None:
    """Where the user's code starts in a traceback; polycell's own frames above it are noise.

    With `filename` (a cell's), the first entry in that cell; without, the first
    entry outside polycell's package (a map's function). None when there is none.
    """
    entry = tb
    while entry is not None:
        code_file = entry.tb_frame.f_code.co_filename
        if code_file == filename if filename is not None else _outside_polycell(code_file):
            return entry
        entry = entry.tb_next
    return None


def cell_traceback_start(tb: TracebackType | None, filename: str) -> TracebackType | None:
    """The first traceback entry in the cell itself, or the whole traceback if the cell has none."""
    return user_code_start(tb, filename) or tb
