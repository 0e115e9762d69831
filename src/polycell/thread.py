"""Thread mode: a job runs in its own thread of the kernel, in the notebook's namespace.

Killing a thread is the hard part. Python offers no public way, so this runner
combines two mechanisms:

* ``PyThreadState_SetAsyncExc`` (CPython's C API, reached through ctypes) makes
  the thread raise `JobKilled` at its next bytecode, which stops any loop that
  runs Python code.
* A thread blocked inside ``time.sleep`` runs no bytecode until the sleep ends,
  so the async exception alone would wait. While a `ThreadRunner` exists,
  ``time.sleep`` is replaced by a function that behaves exactly like it but,
  in a job's thread, sleeps on that job's kill event instead; a kill wakes it
  and the pending exception is raised at the next bytecode.

A thread blocked in other C code (a lock, a socket read, a long numpy call)
cannot be stopped from outside; `Job.kill` then reports
``kill requested, still blocked`` and the job is marked killed when the call
returns.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from polycell.job import Job, JobKilled, Runner

__all__ = ["ThreadRunner"]

_real_sleep = time.sleep
_kill_events: dict[int, threading.Event] = {}
_sleep_patch_users = 0
_sleep_patch_lock = threading.Lock()


def _interruptible_sleep(seconds: float, /) -> None:
    """`time.sleep`, except that a kill of the calling job's thread wakes it."""
    event = _kill_events.get(threading.get_ident())
    if event is None:
        _real_sleep(seconds)
        return
    if not isinstance(seconds, (int, float)):
        seconds = float(seconds)  # same TypeError as time.sleep for non-numbers
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("sleep length must be non-negative")
    event.wait(seconds)


def _install_sleep_patch() -> None:
    global _sleep_patch_users
    with _sleep_patch_lock:
        _sleep_patch_users += 1
        time.sleep = _interruptible_sleep


def _remove_sleep_patch() -> None:
    global _sleep_patch_users
    with _sleep_patch_lock:
        _sleep_patch_users -= 1
        if _sleep_patch_users == 0 and time.sleep is _interruptible_sleep:
            time.sleep = _real_sleep


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> int:
    """Schedule `exc_type` to be raised in a thread (None clears a pending one)."""
    obj = ctypes.py_object(exc_type) if exc_type is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


class _ThreadSlot:
    """What the runner knows about one job's thread, guarded by `lock`.

    The lock makes the async exception safe to use: a kill sends it at most
    once, and only while the job's own code may still be running, so it can
    never land in the runner's bookkeeping after the job has finished.
    """

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.lock = threading.Lock()
        self.kill_event = threading.Event()
        self.in_user_code = False
        self.exception_sent = False


class ThreadRunner(Runner):
    mode = "thread"

    def __init__(self) -> None:
        self._slots: dict[int, _ThreadSlot] = {}
        self._lock = threading.Lock()
        self._closed = False
        _install_sleep_patch()

    def submit(self, job: Job, body: Callable[[], Any]) -> Job:
        if self._closed:
            raise RuntimeError("this ThreadRunner has been shut down")
        context = self._prepare(job)
        thread = threading.Thread(
            target=context.run,
            args=(self._run, job, body),
            name=f"polycell-job-{job.id}",
            daemon=True,
        )
        with self._lock:
            self._slots[job.id] = _ThreadSlot(thread)
        thread.start()
        return job

    def _run(self, job: Job, body: Callable[[], Any]) -> None:
        slot = self._slots[job.id]
        ident = threading.get_ident()
        try:
            if not job._set_running():
                return
            job.info["thread"] = threading.current_thread().name
            _kill_events[ident] = slot.kill_event
            try:
                with slot.lock:
                    if job.kill_requested:
                        raise JobKilled
                    slot.in_user_code = True
                try:
                    value = body()
                finally:
                    with slot.lock:
                        slot.in_user_code = False
                        if slot.exception_sent:
                            _raise_in_thread(ident, None)
            except JobKilled as exc:
                job._set_killed(exc)
            except BaseException as exc:  # noqa: BLE001 - a job's failure is data, not a crash
                if job.kill_requested and isinstance(exc, SystemExit):
                    job._set_killed()
                else:
                    job._set_exception(exc)
            else:
                job._set_result(value)
        finally:
            _kill_events.pop(ident, None)
            with self._lock:
                self._slots.pop(job.id, None)

    def kill(self, job: Job) -> None:
        with self._lock:
            slot = self._slots.get(job.id)
        if slot is None:
            job._set_killed()
            return
        self._stop(slot)

    @staticmethod
    def _stop(slot: _ThreadSlot) -> None:
        slot.kill_event.set()
        with slot.lock:
            if slot.in_user_code and not slot.exception_sent and slot.thread.ident is not None:
                slot.exception_sent = True
                _raise_in_thread(slot.thread.ident, JobKilled)

    def running_threads(self) -> list[threading.Thread]:
        with self._lock:
            return [slot.thread for slot in self._slots.values()]

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            slots = list(self._slots.items())
        for _job_id, slot in slots:
            self._stop(slot)
        deadline = time.monotonic() + timeout
        for _job_id, slot in slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        _remove_sleep_patch()
