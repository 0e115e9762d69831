"""One behaviour suite, run over every way of running a job, as CPython runs one over every executor.

The job engine alone, no Jupyter: a `JobTable` and its runners. Each mode gets
the same cases (a result, an exception, a kill before it starts, a kill in a
sleep, a kill in a loop, output in order, the kill exceptions raised with no
kill). A mode's code is written the way that mode runs it: a function for
thread and process, a coroutine for the asyncio and trio task runners, and
``jobs.map`` over one item. Dask has its own suite against a real cluster
(tests/test_dask.py).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polycell.job import Job, JobKilled, JobState, current_job
from polycell.job_table import JobTable
from polycell.parallel_map import MapItemError

trio = pytest.importorskip("trio")


def say(text: str) -> None:
    """Output from the job's code, through its journal (in a forked child, the pipe to the kernel)."""
    job = current_job.get()
    assert job is not None
    job.journal.write("stdout", text)


class Mode:
    """How one mode runs a piece of code: `step` runs between the code's checks for a kill."""

    def __init__(self, name: str, table: JobTable) -> None:
        self.name = name
        self.table = table

    def start(self, code: Callable[[], Any]) -> Job:
        """Run `code` (a plain function of this test) the way this mode runs a cell."""
        if self.name == "map":
            return self.table.map(lambda _item: code(), [0], workers=1, mode="thread")
        if self.name in ("thread", "process"):
            return self.table.submit(self.name, code)
        backend = "trio" if self.name == "trio" else None
        runner = self.table.runner("task", backend)
        job = self.table.new_job("task")
        sleep = trio.sleep if self.name == "trio" else asyncio.sleep

        async def body() -> Any:
            await sleep(0)
            result = code()
            while isinstance(result, _Sleep):  # the code asked to sleep: do it the mode's way
                await sleep(result.seconds)
                result = result.then()
            return result

        return runner.submit(job, body)

    def result(self, job: Job) -> Any:
        return job.result[0] if self.name == "map" else job.result

    def cause(self, job: Job) -> BaseException | None:
        exc = job.exception
        if self.name == "map" and isinstance(exc, MapItemError):
            return exc.__cause__
        return exc


class _Sleep:
    """A sleep the task modes await (they cannot block in ``time.sleep``); then `then()`."""

    def __init__(self, seconds: float, then: Callable[[], Any]) -> None:
        self.seconds = seconds
        self.then = then


def sleep_then(mode: Mode, seconds: float, then: Callable[[], Any]) -> Any:
    if mode.name in ("task", "trio"):
        return _Sleep(seconds, then)
    time.sleep(seconds)
    return then()


MODES = ["thread", "task", "trio", "process", "map"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    table = JobTable()
    try:
        yield Mode(request.param, table)
    finally:
        table.shutdown()


def test_a_result(mode: Mode) -> None:
    job = mode.start(lambda: 42)
    assert job.wait(30)
    assert job.status is JobState.DONE and mode.result(job) == 42 and job.exception is None


def test_an_exception_fails_the_job_with_its_traceback(mode: Mode) -> None:
    def broken() -> None:
        raise ValueError("bad input")

    job = mode.start(broken)
    assert job.wait(30)
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


def test_output_in_order_and_complete_when_the_job_has_ended(mode: Mode) -> None:
    def chatty() -> str:
        for i in range(200):
            say(f"line {i}\n")
        return "end"

    job = mode.start(chatty)
    assert job.wait(30) and job.status is JobState.DONE
    # As soon as the job has ended, its last output is in its journal (a map's bar besides).
    assert re.findall(r"line \d+\n", job.output) == [f"line {i}\n" for i in range(200)]
    if mode.name != "map":
        assert job.output == "".join(f"line {i}\n" for i in range(200))


def test_a_kill_before_it_starts_runs_nothing(mode: Mode) -> None:
    if mode.name == "map":
        pytest.skip("jobs.map starts its job as it creates it")
    ran = threading.Event()
    job = mode.table.new_job("task" if mode.name in ("task", "trio") else mode.name)
    job.kill()
    assert job.status is JobState.KILLED
    backend = "trio" if mode.name == "trio" else None
    runner = mode.table.runner(job.mode, backend)
    if mode.name in ("task", "trio"):

        async def body() -> None:
            ran.set()

        runner.submit(job, body)
        # The loop runs its tasks in order: once a later job has run, this one had its turn.
        later = mode.start(lambda: "later")
        assert later.wait(30)
    else:
        runner.submit(job, ran.set)
        _wait_until(lambda: f"polycell-job-{job.id}" not in {t.name for t in threading.enumerate()})
    assert not ran.is_set() and job.status is JobState.KILLED


def test_a_kill_in_a_sleep(mode: Mode) -> None:
    def sleeper() -> Any:
        say("asleep\n")
        return sleep_then(mode, 300, lambda: "woke")

    job = mode.start(sleeper)
    _wait_for_output(job, "asleep\n")
    job.kill(timeout=10)
    assert job.status is JobState.KILLED
    assert isinstance(job.exception, JobKilled)


def test_a_kill_in_a_loop(mode: Mode) -> None:
    def spinner() -> Any:
        say("spinning\n")
        if mode.name in ("task", "trio"):  # a coroutine can only be stopped where it awaits
            return sleep_then(mode, 0, spinner_again)
        while True:
            pass

    def spinner_again() -> Any:
        return sleep_then(mode, 0, spinner_again)

    job = mode.start(spinner)
    _wait_for_output(job, "spinning\n")
    job.kill(timeout=10)
    assert job.status is JobState.KILLED


def test_a_kill_exception_raised_without_a_kill_is_the_jobs_error(mode: Mode) -> None:
    """Awaiting a killed job raises JobKilled (a cancelled inner task, CancelledError): not a kill."""

    def raises() -> None:
        raise JobKilled("from another job")

    job = mode.start(raises)
    assert job.wait(30)
    assert job.status is JobState.FAILED


def _wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _wait_for_output(job: Job, text: str) -> None:
    _wait_until(lambda: text in job.output)
