"""Thread mode: a job runs in its own thread of the kernel, in the notebook's namespace.

Killing a thread is the hard part. Python offers no public way, so this runner
combines two mechanisms:

* ``PyThreadState_SetAsyncExc`` (CPython's C API, reached through ctypes) makes
  the thread raise `JobKilled` at its next bytecode, which stops any loop that
  runs Python code.
* A thread blocked inside ``time.sleep`` runs no bytecode until the sleep ends,
  so the async exception alone would wait. While a `ThreadRunner` exists,
  ``time.sleep`` is replaced by a stand-in (`BuiltinStandIn`) that is the real
  sleep everywhere but a job's thread, which sleeps on that job's `KillSwitch`
  instead; a kill wakes it and the pending exception is raised at the next
  bytecode. Outside jobs it adds no frame: tracebacks read as without polycell.

``PyThreadState_SetAsyncExc`` is CPython's (3.10-3.13 here); the test suite
fails if it stops stopping a loop.

A thread blocked in other C code (a lock, a socket read, a long numpy call)
cannot be stopped from outside; `Job.kill` then reports
``kill requested, still blocked`` and the job is marked killed when the call
returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from polycell.builtin_standin import BuiltinStandIn
from polycell.cell import CellWork
from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobKilled, Runner

__all__ = ["KillSwitch", "ThreadRunner", "install_interruptible_sleep", "remove_interruptible_sleep"]

_real_sleep = time.sleep
_switches: dict[int, KillSwitch] = {}  # thread ident -> the switch of the code it runs
_sleep_patch_users = 0
_sleep_patch_lock = threading.Lock()


def _sleep_for_calling_job() -> Callable[[float], None] | None:
    """The calling job thread's `KillSwitch.sleep`; None (the real sleep) anywhere else."""
    switch = _switches.get(threading.get_ident())
    return switch.sleep if switch is not None else None


_interruptible_sleep = BuiltinStandIn(_real_sleep, _sleep_for_calling_job, "time")


def install_interruptible_sleep() -> None:
    """Replace `time.sleep` (counted: each install needs one `remove_interruptible_sleep`)."""
    global _sleep_patch_users
    with _sleep_patch_lock:
        _sleep_patch_users += 1
        time.sleep = _interruptible_sleep


def remove_interruptible_sleep() -> None:
    global _sleep_patch_users
    with _sleep_patch_lock:
        _sleep_patch_users -= 1
        if _sleep_patch_users == 0 and time.sleep is _interruptible_sleep:
            time.sleep = _real_sleep


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> int:
    """Schedule `exc_type` to be raised in a thread (None clears a pending one)."""
    obj = ctypes.py_object(exc_type) if exc_type is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


#: While any job thread runs, the GIL is handed over this often (seconds) instead of
#: Python's default 5 ms. A CPU-bound job thread otherwise keeps every other thread
#: of the kernel (iopub, shell channel, the foreground cell) waiting up to 5 ms for
#: each of the many GIL hand-offs of one request: ~40x slower round trips at 5 ms,
#: ~3.5x at 0.2 ms, with no loss of job throughput measured (benchmarks/).
BUSY_SWITCH_INTERVAL = 0.0002
_busy_threads = 0
_busy_lock = threading.Lock()
_idle_switch_interval = sys.getswitchinterval()


def _enter_busy() -> None:
    global _busy_threads, _idle_switch_interval
    with _busy_lock:
        if _busy_threads == 0:
            _idle_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_idle_switch_interval, BUSY_SWITCH_INTERVAL))
        _busy_threads += 1


def _leave_busy() -> None:
    global _busy_threads
    with _busy_lock:
        _busy_threads -= 1
        if _busy_threads == 0:
            sys.setswitchinterval(_idle_switch_interval)


class KillSwitch:
    """Lets any thread stop the code one thread runs inside `armed()`.

    The lock makes the async exception safe to use: `pull` sends it only while
    the armed code may still be running, and leaving `armed()` clears one still
    pending, so it can never land in the caller's bookkeeping after that code
    has finished. Thread jobs,
    the thread workers of ``jobs.map`` and dask cells on a worker all use it.

    A sleep in the armed code waits on `_wake`, a bare lock held until the switch
    is pulled. `pull` schedules the exception *before* it releases that lock, so
    the sleeper wakes with the exception already pending and runs no line of the
    job after its sleep; and a bare lock (not a `threading.Event`) means the
    exception lands in `sleep` itself, never half-way through the
    Python code of a condition variable.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Lock()
        self._wake.acquire()
        self.pulled = False
        self.ident: int | None = None
        self.in_user_code = False
        self.exception_sent = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Run the body killable from outside; raises `JobKilled` at once if already pulled."""
        ident = self.ident = threading.get_ident()
        _switches[ident] = self
        _enter_busy()
        try:
            with self.lock:
                if self.pulled:
                    raise JobKilled
                self.in_user_code = True
            try:
                yield
            finally:
                with self.lock:
                    self.in_user_code = False
                    if self.exception_sent:
                        _raise_in_thread(ident, None)
        finally:
            _leave_busy()
            _switches.pop(ident, None)

    def sleep(self, seconds: float, /) -> None:
        """Sleep up to `seconds`, or until the switch is pulled (then at once, every time)."""
        if not isinstance(seconds, (int, float)):
            seconds = float(seconds)  # the TypeError of time.sleep for non-numbers
        if math.isnan(seconds) or seconds < 0:
            raise ValueError("sleep length must be non-negative")
        if self._wake.acquire(timeout=seconds):
            self._wake.release()  # pulled: let every later sleep return at once too

    def pull(self) -> bool:
        """Stop the armed code: raise `JobKilled` at its next bytecode, and wake its sleep.

        True if the exception was sent now. Each pull sends it again while the code
        still runs, so a job that swallowed one kill (``except BaseException``) can
        be killed by the next.
        """
        with self.lock:
            sent = False
            if self.in_user_code and self.ident is not None:
                self.exception_sent = sent = True
                _raise_in_thread(self.ident, JobKilled)
            if not self.pulled:
                self.pulled = True
                self._wake.release()
            return sent


class ThreadRunner(Runner):
    mode = "thread"

    def __init__(self) -> None:
        self._threads: dict[int, tuple[threading.Thread, KillSwitch, Job]] = {}
        self._lock = threading.Lock()
        self._closed = False
        install_interruptible_sleep()

    def submit(self, job: Job, work: CellWork | Callable[[], Any]) -> Job:
        body = work.run if isinstance(work, CellWork) else work
        if self._closed:
            raise RuntimeError("this ThreadRunner has been shut down")
        context = self._prepare(job)
        switch = KillSwitch()
        thread = BackgroundThread(
            target=context.run,
            args=(self._run, job, body, switch),
            name=f"polycell-job-{job.id}",
            daemon=True,
        )
        if not job.set_running():  # killed before it was handed over
            return job
        with self._lock:
            self._threads[job.id] = (thread, switch, job)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.pop(job.id, None)
            raise
        return job

    def _run(self, job: Job, body: Callable[[], Any], switch: KillSwitch) -> None:
        try:
            if job.done:  # killed between `submit` setting it running and this thread's start
                return
            job.info["thread"] = threading.current_thread().name
            if job.kill_requested:
                switch.pull()
            try:
                with switch.armed():
                    value = body()
            except BaseException as exc:  # noqa: BLE001 - a job's failure is data, not a crash
                job.finish(exc, (JobKilled, SystemExit))
            else:
                job.set_result(value)
        finally:
            with self._lock:
                self._threads.pop(job.id, None)

    def kill(self, job: Job) -> None:
        with self._lock:
            entry = self._threads.get(job.id)
        if entry is None:
            job.set_killed()
            return
        entry[1].pull()

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            entries = list(self._threads.values())
        for _thread, switch, job in entries:
            job.request_kill()
            switch.pull()
        deadline = time.monotonic() + timeout
        for thread, _switch, _job in entries:
            thread.join(max(0.0, deadline - time.monotonic()))
        remove_interruptible_sleep()
