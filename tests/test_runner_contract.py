"""One behaviour suite, run over every way of running a job, as CPython runs one over every executor.

The job engine alone, no Jupyter: a `JobTable`, its runners, and cells compiled
by `polycell.cell.compile_source`. Every mode gets the same cells through the
same call, ``runner.submit(job, CellWork(cell, namespace))``: a value, an
exception with the cell's traceback, the names a cell assigns coming back, a
kill before it starts, a kill in a sleep, a kill in a loop, output in order and
complete when the job has ended, the kill exceptions raised with no kill.
Dask runs them on a real cluster; ``jobs.map`` runs each cell as its one item.
A cell sleeps the way its mode sleeps: ``time.sleep`` in a thread, a process,
on dask and in a map, ``await`` on the asyncio and trio loops.
"""

from __future__ import annotations

import asyncio
import functools
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polycell.cell import CellWork, compile_source
from polycell.job import Job, JobKilled, JobState, current_job
from polycell.job_table import JobTable
from polycell.parallel_map import MapItemError

trio = pytest.importorskip("trio")

MODES = ["thread", "task", "trio", "process", "dask", "map"]

#: How a cell of each mode sleeps.
_SLEEP = {"task": "await asyncio.sleep({})", "trio": "await trio.sleep({})"}


def say(text: str) -> None:
    """Output from the job's code, through its journal (in a forked child, the pipe to the kernel)."""
    job = current_job.get()
    assert job is not None
    job.journal.write("stdout", text)


class Mode:
    """Runs a cell the way one mode runs a ``%%bg`` cell."""

    def __init__(self, name: str, table: JobTable, dask_address: str | None = None) -> None:
        self.name = name
        self.table = table
        self.cells = 0
        if name == "dask":
            assert dask_address is not None
            self.table.runner("dask").use(dask_address)  # type: ignore[attr-defined]

    def work(self, source: str, namespace: dict[str, Any] | None = None) -> CellWork:
        """The cell, with ``{sleep(N)}`` written this mode's way, as every runner's work item."""
        sleep = _SLEEP.get(self.name, "time.sleep({})")
        source = re.sub(r"\{sleep\((\d+)\)\}", lambda m: sleep.format(m.group(1)), textwrap.dedent(source))
        self.cells += 1
        cell = compile_source(source, f"<contract cell {self.cells}>")
        namespace = {} if namespace is None else namespace
        namespace.update(asyncio=asyncio, time=time)
        # On a dask worker the cell's print is its output; here `say` writes to the job's journal.
        namespace["say"] = functools.partial(print, end="") if self.name == "dask" else say
        if self.name == "trio":
            namespace["trio"] = trio
        return CellWork(cell, namespace)

    def new_job(self) -> Job:
        return self.table.new_job("task" if self.name == "trio" else self.name)

    def runner(self, job: Job) -> Any:
        return self.table.runner(job.mode, "trio" if self.name == "trio" else None)

    def start(self, source: str, namespace: dict[str, Any] | None = None) -> Job:
        work = self.work(source, namespace)
        if self.name == "map":
            return self.table.map(lambda _item: work.run(), [0], workers=1, mode="thread")
        job = self.new_job()
        return self.runner(job).submit(job, work)

    def result(self, job: Job) -> Any:
        return job.result[0] if self.name == "map" else job.result

    def cause(self, job: Job) -> BaseException | None:
        exc = job.exception
        if self.name == "map" and isinstance(exc, MapItemError):
            return exc.__cause__
        return exc


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    table = JobTable()
    address = request.getfixturevalue("dask_cluster") if request.param == "dask" else None
    try:
        yield Mode(request.param, table, address)
    finally:
        table.shutdown()


def test_a_value(mode: Mode) -> None:
    job = mode.start("6 * 7")
    assert job.wait(60)
    assert job.status is JobState.DONE and mode.result(job) == 42 and job.exception is None


def test_an_exception_fails_the_job_with_the_cells_traceback(mode: Mode) -> None:
    job = mode.start(
        """
        def broken():
            raise ValueError("bad input")
        broken()
        """
    )
    assert job.wait(60)
    assert job.status is JobState.FAILED
    cause = mode.cause(job)
    assert isinstance(cause, ValueError) and str(cause) == "bad input"
    if mode.name != "process":  # a forked child's exception comes back without its frames
        frames = []
        tb = cause.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        assert "broken" in frames


def test_the_names_a_cell_assigns_are_in_its_namespace_when_it_has_ended(mode: Mode) -> None:
    if mode.name == "map":
        pytest.skip("a map item returns a value; it assigns no names of the notebook")
    namespace: dict[str, Any] = {"base": 6}
    job = mode.start("answer = base * 7\nimport math as shown_math", namespace)
    assert job.wait(60) and job.status is JobState.DONE, job.exception
    assert namespace["answer"] == 42 and namespace["shown_math"].pi > 3


def test_output_in_order_and_complete_when_the_job_has_ended(mode: Mode) -> None:
    job = mode.start(
        """
        [say(f"line {i}\\n") for i in range(200)]
        "end"
        """
    )
    assert job.wait(60) and job.status is JobState.DONE, job.exception
    # As soon as the job has ended, its last output is in its journal (a map's bar besides).
    assert re.findall(r"line \d+\n", job.output) == [f"line {i}\n" for i in range(200)]
    if mode.name != "map":
        assert job.output == "".join(f"line {i}\n" for i in range(200))


def test_a_kill_before_it_starts_runs_nothing(mode: Mode) -> None:
    if mode.name == "map":
        pytest.skip("jobs.map starts its job as it creates it")
    job = mode.new_job()
    job.kill()
    assert job.status is JobState.KILLED
    mode.runner(job).submit(job, mode.work("say('ran')"))
    if mode.name in ("task", "trio"):
        # The loop runs its tasks in order: once a later job has run, this one had its turn.
        later = mode.start("'later'")
        assert later.wait(60)
    else:
        _wait_until(lambda: not any(t.name.endswith(f"-{job.id}") for t in threading.enumerate()))
    assert "ran" not in job.output and job.status is JobState.KILLED


def test_a_kill_in_a_sleep(mode: Mode) -> None:
    job = mode.start("say('asleep\\n')\n{sleep(300)}\n'woke'")
    _wait_for_output(job, "asleep\n")
    job.kill(timeout=10)
    assert job.status is JobState.KILLED
    assert isinstance(job.exception, JobKilled)


def test_a_kill_in_a_loop(mode: Mode) -> None:
    loop = "while True:\n    {sleep(0)}" if mode.name in ("task", "trio") else "while True:\n    pass"
    job = mode.start("say('spinning\\n')\n" + loop)
    _wait_for_output(job, "spinning\n")
    job.kill(timeout=10)
    assert job.status is JobState.KILLED


def test_a_kill_exception_raised_without_a_kill_is_the_jobs_error(mode: Mode) -> None:
    """Awaiting a killed job raises JobKilled (a cancelled inner task, CancelledError): not a kill."""
    job = mode.start("from polycell.job import JobKilled\nraise JobKilled('from another job')")
    assert job.wait(60)
    assert job.status is JobState.FAILED


def _wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _wait_for_output(job: Job, text: str) -> None:
    _wait_until(lambda: text in job.output)
