"""Task mode on trio: ``%%bg --mode task --backend trio``.

The same idea as `polycell.task`, on a trio event loop instead of asyncio: one
daemon thread runs ``trio.run``, whose root nursery holds every job. Each job
runs in its own cancel scope, so a kill is trio cancellation of that job only.
Code in a trio job awaits trio things (``await trio.sleep(1)``); asyncio
objects do not work here, as they would not under any trio program.

trio is an optional extra (``pip install 'polycell[trio]'``); without it this
module refuses to import with a one-line `JobError`.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

from polycell.cell import CellWork
from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobError, JobKilled, Runner

try:
    import trio
except ImportError:  # pragma: no cover - exercised by a test that hides trio
    raise JobError("--backend trio needs the trio package: pip install 'polycell[trio]'") from None

__all__ = ["TrioTaskRunner"]


class TrioTaskRunner(Runner):
    mode = "task"

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._thread: threading.Thread | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()

    def _start(self) -> trio.lowlevel.TrioToken:
        """The trio loop's token, starting its thread on first use."""
        with self._lock:
            if self._token is None:
                ready = threading.Event()
                thread = BackgroundThread(
                    target=trio.run, args=(self._serve, ready), name="polycell-trio-loop", daemon=True
                )
                thread.start()
                ready.wait(10)
                self._thread = thread
            assert self._token is not None
            return self._token

    async def _serve(self, ready: threading.Event) -> None:
        async with trio.open_nursery() as nursery:
            self._token = trio.lowlevel.current_trio_token()
            self._nursery = nursery
            ready.set()
            await trio.sleep_forever()

    def submit(self, job: Job, work: CellWork | Callable[[], Awaitable[Any]]) -> Job:
        body = work.run_async if isinstance(work, CellWork) else work
        context = self._prepare(job)
        self._jobs[job.id] = job
        token = self._start()

        def spawn() -> None:
            nursery = self._nursery
            if nursery is None:  # the loop is shutting down
                job.set_killed()
                return
            # A trio task runs in a copy of the context that spawned it.
            context.run(nursery.start_soon, self._run, job, body, name=f"polycell-job-{job.id}")

        token.run_sync_soon(spawn)
        return job

    async def _run(self, job: Job, body: Callable[[], Awaitable[Any]]) -> None:
        with trio.CancelScope() as scope:
            self._scopes[job.id] = scope
            try:
                if job.kill_requested or not job.set_running():
                    job.set_killed()
                    return
                value = await body()
            except BaseException as exc:
                job.finish(exc, (JobKilled, trio.Cancelled))
                if isinstance(exc, trio.Cancelled):
                    raise  # trio's own: its scope must see it
                return
            finally:
                self._scopes.pop(job.id, None)
                self._jobs.pop(job.id, None)
            job.set_result(value)
        if scope.cancelled_caught:
            job.set_killed()

    def kill(self, job: Job) -> None:
        token = self._token
        if token is None:
            job.set_killed()
            return

        def cancel() -> None:
            scope = self._scopes.get(job.id)
            if scope is not None:
                scope.cancel()
            elif not job.done:  # not spawned yet: `_run` sees kill_requested and stops
                job.set_killed()

        try:
            token.run_sync_soon(cancel)
        except trio.RunFinishedError:
            job.set_killed()

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            token, thread = self._token, self._thread
            nursery = self._nursery
            self._token = self._thread = self._nursery = None
        if token is None or thread is None or nursery is None:
            return
        for job in list(self._jobs.values()):
            job.request_kill()  # the cancellation below is the kill's doing
        try:
            token.run_sync_soon(nursery.cancel_scope.cancel)
        except trio.RunFinishedError:
            pass
        thread.join(timeout)
