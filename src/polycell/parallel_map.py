"""``jobs.map``: a parallel map that runs as one job, with a live progress bar.

``jobs.map(func, items)`` returns at once with a `Job` whose result is
``[func(x) for x in items]``, in input order. Items go to the workers in
chunks (`polycell.map_items`), so 100,000 tiny items cost a few dozen
round trips, not 100,000; an iterable with no length (a generator) is read
lazily, chunk by chunk, as workers become free.

`MapRunner` is the coordinator: one thread per map job takes results from the
job's backend as chunks complete, puts them in input order, draws the bar and
ends the job through `Job.finish`, the one rule every runner uses. The backends
run the chunks on the machinery of the runner of the same name, one module each
(`MAP_BACKENDS`): ``process`` (`polycell.map_processes`, forked workers),
``thread`` (`polycell.map_threads`) and ``dask`` (`polycell.map_dask`); their
contract is `polycell.map_backend.MapBackend`.

The progress bar is tqdm's console bar written to the job's stderr stream, so
it is journaled and replayed like any output; front ends draw ``\\r`` updates
in place. For a lazy input it counts items until the input ends, then shows the
full bar. The first item that raises fails the whole map with
`MapItemError` ("item 17 failed: ValueError: ...", its traceback starting at
``func``) and stops the other workers; a failure that is no item's (a worker
killed from outside) is one line (`MapWorkerDied`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobError, Runner, one_line, registered
from polycell.journal import Record, error_record
from polycell.map_backend import MapBackend, MapItemError, MapSpec, MapWorkerDied
from polycell.map_items import ChunkFeed
from polycell.thread import install_interruptible_sleep, remove_interruptible_sleep

__all__ = [
    "MAP_BACKENDS",
    "MapItemError",
    "MapRunner",
    "MapSpec",
    "MapWorkerDied",
    "make_spec",
]

#: backend name -> "module:class"; a backend is imported only when a map uses it.
BACKEND_CLASSES: dict[str, str] = {
    "process": "polycell.map_processes:ProcessMapBackend",
    "thread": "polycell.map_threads:ThreadMapBackend",
    "dask": "polycell.map_dask:DaskMapBackend",
}
MAP_BACKENDS = tuple(BACKEND_CLASSES)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def make_spec(
    func: Any,
    iterable: Iterable[Any],
    *,
    workers: int | None,
    mode: str,
    chunksize: int | None,
    dask_client: Callable[[], Any] | None = None,
) -> MapSpec:
    """Check the arguments of ``jobs.map``; JobError on bad input.

    A sized input is copied now; any other is only asked for its iterator, which
    the map's coordinator reads as it goes.
    """
    if mode not in MAP_BACKENDS:
        raise JobError(f"jobs.map: unknown mode {mode!r}: choose one of {', '.join(MAP_BACKENDS)}")
    if not callable(func):
        raise JobError(f"jobs.map: func must be callable, got {type(func).__name__}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise JobError(
            f"jobs.map: workers must be a whole number >= 1 (or None for one per CPU), got {workers!r}"
        )
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise JobError(f"jobs.map: chunksize must be a whole number >= 1, got {chunksize!r}")
    if workers is None:
        if mode == "dask" and dask_client is not None:
            workers = max(1, sum(dask_client().nthreads().values()))
        else:
            workers = cpu_count()
    try:
        feed = ChunkFeed(iterable, workers=workers, chunksize=chunksize)
    except TypeError as exc:
        raise JobError(f"jobs.map: the items must be iterable: {exc}") from None
    return MapSpec(func, feed, mode, workers, dask_client)


class _JournalFile:
    """A file-like tqdm can write its bar to: text goes to the job's stderr stream."""

    encoding = "utf-8"  # tells tqdm it may draw its bar with unicode blocks

    def __init__(self, job: Job) -> None:
        self.job = job

    def write(self, text: str) -> int:
        self.job.journal.write("stderr", text)
        return len(text)

    def flush(self) -> None:
        pass


class _Bar(tqdm):  # type: ignore[type-arg]
    # tqdm's monitor thread would outlive the job; mininterval already bounds the rate.
    monitor_interval = 0


def _progress(job: Job, total: int | None) -> tqdm:  # type: ignore[type-arg]
    return _Bar(
        total=total,
        file=_JournalFile(job),
        mininterval=0.2,
        ncols=90,
        unit="item",
        desc=f"map {job.id}",
        dynamic_ncols=False,
    )


# -- the runner ---------------------------------------------------------------------------


class MapRunner(Runner):
    """Runs map jobs: one coordinator thread per job drives that job's backend."""

    mode = "map"

    def __init__(self) -> None:
        self._backends: dict[int, MapBackend] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False
        install_interruptible_sleep()  # a kill wakes a lazy input's sleep, in the coordinator too

    def submit(self, job: Job, body: MapSpec) -> Job:
        context = self._prepare(job)
        backend: MapBackend = registered(BACKEND_CLASSES[body.backend])(job, body)
        job.info["workers"] = f"{body.workers} {body.backend}"
        thread = BackgroundThread(
            target=context.run,
            args=(self._run, job, body, backend),
            name=f"polycell-map-{job.id}",
            daemon=True,
        )
        with self._lock:
            self._backends[job.id] = backend
            self._threads[job.id] = thread
        thread.start()
        return job

    def _run(self, job: Job, spec: MapSpec, backend: MapBackend) -> None:
        try:
            if not job.set_running():
                return
            feed = spec.feed
            results: list[Any] = [None] * (feed.total or 0)
            bar = _progress(job, feed.total)  # a lazy input's total: unknown until it ends
            try:
                for start, values in backend.run():
                    end = start + len(values)
                    if end > len(results):
                        results.extend([None] * (end - len(results)))
                    results[start:end] = values
                    bar.update(len(values))
                if feed.lazy:
                    bar.total = len(results)
                    bar.refresh()
            finally:
                bar.close()
        except BaseException as exc:  # noqa: BLE001 - a map's failure is data, not a crash
            # A kill takes every worker down: whatever the coordinator sees then is the kill's.
            if not job.kill_requested:
                job.journal.append(_error_record(exc))
            job.finish(exc, (BaseException,))
        else:
            job.set_result(results)
        finally:
            backend.close()
            with self._lock:
                self._backends.pop(job.id, None)
                self._threads.pop(job.id, None)

    def kill(self, job: Job) -> None:
        with self._lock:
            backend = self._backends.get(job.id)
        if backend is None:
            job.set_killed()
        else:
            backend.stop()

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backends = list(self._backends.values())
            threads = list(self._threads.values())
        for backend in backends:
            backend.job.request_kill()
            backend.stop()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        remove_interruptible_sleep()


def _error_record(exc: BaseException) -> Record:
    """The map's failure in its cell: the item's traceback from the user's function down, or one line.

    A failure that is not an item's (a worker died, results that cannot be
    loaded) is polycell's to explain, and its frames would only hide the cause.
    """
    if isinstance(exc, MapItemError):
        lines = [*exc.traceback_text.splitlines(), str(exc)] if exc.traceback_text else [str(exc)]
    else:
        lines = [one_line(exc, 1000)]
    return error_record(exc, lines)
