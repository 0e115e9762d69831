"""IPython's history thread writes between requests, in batches, and still writes everything."""

from __future__ import annotations

import inspect
import sqlite3
import threading
import time
from types import SimpleNamespace

from IPython.core.history import HistorySavingThread

from kernel_session import KernelSession
from polycell.history_pacing import PacedSaveFlag, paced_history


class _Thread:
    """What `PacedSaveFlag` reads of its history thread: whether it is being stopped."""

    _stop_now = False


def _waiter(flag: PacedSaveFlag) -> threading.Thread:
    waiter = threading.Thread(target=flag.wait, name="test-history-waiter", daemon=True)
    waiter.start()
    return waiter


def test_the_history_thread_waits_for_the_request_being_answered() -> None:
    flag = PacedSaveFlag(_Thread(), batch_seconds=0, max_delay=60)  # type: ignore[arg-type]
    with flag.answering():
        waiter = _waiter(flag)
        flag.set()
        waiter.join(0.2)
        assert waiter.is_alive(), "the history thread wrote while a request was being answered"
    waiter.join(10)
    assert not waiter.is_alive()


def test_with_no_request_answered_the_write_still_waits_for_its_batch() -> None:
    """Inputs in quick succession share one write: a set while the thread waits starts no other."""
    thread = _Thread()
    flag = PacedSaveFlag(thread, batch_seconds=60, max_delay=60)  # type: ignore[arg-type]
    waiter = _waiter(flag)
    flag.set()
    flag.set()
    waiter.join(0.2)
    assert waiter.is_alive(), "the history thread wrote before its batch was due"
    thread._stop_now = True
    flag.set()
    waiter.join(10)
    assert not waiter.is_alive()


class _CountedCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_requests_answered_within_the_batch_do_not_wake_the_history_thread() -> None:
    """Under CPU-bound thread jobs each wake-up takes a turn of the GIL from the kernel's answer."""
    thread = _Thread()
    flag = PacedSaveFlag(thread, batch_seconds=60, max_delay=60)  # type: ignore[arg-type]
    flag._changed = counted = _CountedCondition()
    waiter = _waiter(flag)
    flag.set()
    deadline = time.monotonic() + 10
    while not counted.waits and time.monotonic() < deadline:  # until it waits for its batch
        time.sleep(0.001)
    for _ in range(3):
        with flag.answering():
            pass
        # Time for a wake-up to show, were there one (there is none to wait for).
        deadline = time.monotonic() + 0.2
        while counted.waits == 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    thread._stop_now = True
    flag.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert counted.waits == 1, f"woken {counted.waits - 1} times by requests that ended within its batch"


def test_a_long_request_holds_the_history_write_back_only_up_to_max_delay() -> None:
    flag = PacedSaveFlag(_Thread(), batch_seconds=0, max_delay=0.05)  # type: ignore[arg-type]
    with flag.answering():
        waiter = _waiter(flag)
        flag.set()
        waiter.join(10)
        assert not waiter.is_alive(), "a long cell's input must still reach the database"


def test_a_stopping_history_thread_does_not_wait() -> None:
    """IPython stops the thread before every fork (a process job): that must not wait for a request."""
    thread = _Thread()
    flag = PacedSaveFlag(thread, batch_seconds=60, max_delay=60)  # type: ignore[arg-type]
    with flag.answering():
        waiter = _waiter(flag)
        flag.set()
        waiter.join(0.2)
        assert waiter.is_alive()
        thread._stop_now = True  # what HistorySavingThread.stop() does, then it sets the flag
        flag.set()
        waiter.join(10)
        assert not waiter.is_alive()


def test_an_unset_flag_times_out_as_an_event_does() -> None:
    flag = PacedSaveFlag(_Thread())  # type: ignore[arg-type]
    assert flag.wait(0.01) is False


def test_threads_asking_at_once_all_get_the_one_flag_the_history_thread_waits_on() -> None:
    """The main thread and the shell channel thread may both be first to ask."""
    history_thread = _Thread()
    history_thread.save_flag = threading.Event()  # type: ignore[attr-defined]
    manager = SimpleNamespace(save_thread=history_thread)
    start = threading.Barrier(8)
    got: list[PacedSaveFlag | None] = []

    def ask() -> None:
        start.wait(10)
        got.append(paced_history(manager))

    askers = [threading.Thread(target=ask, name=f"test-asker-{n}") for n in range(8)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(10)
    assert len(got) == 8 and all(flag is history_thread.save_flag for flag in got)  # type: ignore[attr-defined]
    assert isinstance(history_thread.save_flag, PacedSaveFlag)  # type: ignore[attr-defined]


def test_the_ipython_history_thread_works_as_pacing_expects() -> None:
    """Written against IPython 9.18: the loop waits on ``self.save_flag`` afresh each turn, and
    ``stop()`` marks ``_stop_now`` before it sets the flag."""
    run = inspect.getsource(HistorySavingThread.run)
    assert "while True:" in run and "self.save_flag.wait()" in run
    stop = inspect.getsource(HistorySavingThread.stop)
    assert stop.index("self._stop_now = True") < stop.index("self.save_flag.set()")


def _stored_inputs(hist_file: str, session_number: int) -> list[str]:
    with sqlite3.connect(hist_file, timeout=10) as db:
        rows = db.execute("SELECT source_raw FROM history WHERE session = ? ORDER BY line", (session_number,))
        return [row[0] for row in rows]


def _wait_stored(hist_file: str, session_number: int, inputs: list[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        stored = _stored_inputs(hist_file, session_number)
        if all(text in stored for text in inputs) or time.monotonic() > deadline:
            return stored
        time.sleep(0.05)


def test_every_input_reaches_the_history_database_also_after_a_fork(any_kernel: KernelSession) -> None:
    """Foreground cells, background cells and the cells after a process job's fork, which restarts
    IPython's history thread (with a plain flag, paced again by the next cell)."""
    session = any_kernel
    hist_file = session.eval("str(get_ipython().history_manager.hist_file)")
    session_number = session.eval("get_ipython().history_manager.session_number")
    inputs = [f"x{n} = {n}" for n in range(20)]
    for code in inputs:
        session.run(code)
    for n in range(5):
        code = f"%%bg\ny{n} = {n}"
        inputs.append(code)
        session.run(code)
    assert session.eval("type(get_ipython().history_manager.save_thread.save_flag).__name__") == (
        "PacedSaveFlag"
    )
    first = session.eval("len(jobs)") + 1
    session.run("%%bg --mode process\nz = 1")
    session.wait_job_end(first, timeout=60)
    after = [f"w{n} = {n}" for n in range(5)]
    for code in after:
        session.run(code)
    inputs += after
    stored = _wait_stored(hist_file, session_number, inputs)
    assert [text for text in inputs if text not in stored] == []
    assert session.eval("type(get_ipython().history_manager.save_thread.save_flag).__name__") == (
        "PacedSaveFlag"
    )
