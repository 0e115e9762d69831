"""Task mode: a job is an asyncio task on an event loop of its own thread.

The kernel's own loop stops whenever a foreground cell blocks (``time.sleep(10)``
holds the main thread), so tasks run on a separate loop, in a daemon thread
started on first use. Tasks share the notebook's namespace and the GIL; they
make progress whenever the foreground is waiting or doing I/O. Kill is
cancellation. Asyncio objects bound to the kernel's loop (made in a
foreground cell) cannot be awaited from here; that is asyncio's rule, not ours.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from polycell.cell import CellWork
from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobKilled, Runner

__all__ = ["TaskRunner"]


class TaskRunner(Runner):
    mode = "task"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        # Tasks to create, and whether the loop was woken to create them: a burst of cells
        # wakes the loop's thread once, not once per cell (each wake-up is a GIL hand-off
        # the thread starting the cells waits for).
        self._starting: list[Callable[[], None]] = []
        self._woken = False
        self._starting_lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runner's event loop, started on first use."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = BackgroundThread(
                    target=self._serve, args=(loop, ready), name="polycell-task-loop", daemon=True
                )
                thread.start()
                ready.wait(10)
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def submit(self, job: Job, work: CellWork | Callable[[], Awaitable[Any]]) -> Job:
        body = work.run_async if isinstance(work, CellWork) else work
        context = self._prepare(job)
        loop = self.loop
        if not job.set_running():  # killed before it was handed over
            return job
        self._jobs[job.id] = job

        def start() -> None:
            # Created inside `context`, the task runs in a copy of it.
            task = context.run(loop.create_task, self._run(job, body), name=f"polycell-job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(lambda t: self._task_done(job, t))

        with self._starting_lock:
            self._starting.append(start)
            wake, self._woken = not self._woken, True
        if wake:
            loop.call_soon_threadsafe(self._start_waiting)
        return job

    def _start_waiting(self) -> None:
        """In the loop's thread: create the tasks of every job submitted since it was woken, in order."""
        with self._starting_lock:
            starting, self._starting = self._starting, []
            self._woken = False
        for start in starting:
            start()

    async def _run(self, job: Job, body: Callable[[], Awaitable[Any]]) -> None:
        if job.done:  # killed between `submit` setting it running and this task's creation
            return
        try:
            value = await body()
        except BaseException as exc:  # noqa: BLE001 - a job's failure is data, not a crash
            job.finish(exc, (asyncio.CancelledError, JobKilled))
        else:
            job.set_result(value)

    def _task_done(self, job: Job, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(job.id, None)
        self._jobs.pop(job.id, None)
        if task.cancelled():  # cancelled before its first step: `_run` never ran
            job.set_killed()

    def kill(self, job: Job) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            job.set_killed()
            return

        def cancel() -> None:
            task = self._tasks.get(job.id)
            if task is not None:
                task.cancel()
            elif not job.done:
                job.set_killed()

        loop.call_soon_threadsafe(cancel)

    def shutdown(self, timeout: float = 2.0) -> None:
        for job in list(self._jobs.values()):
            job.request_kill()  # what the cancellation below raises in it is the kill's doing
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def stop() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop)
        thread.join(timeout)
