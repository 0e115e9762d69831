"""``jobs.map``: a parallel map that runs as one job, with a live progress bar.

``jobs.map(func, items)`` returns at once with a `Job` whose result is
``[func(x) for x in items]``, in input order. Items go to the workers in
chunks (a range of indices at a time), so 100,000 tiny items cost a few dozen
round trips, not 100,000. Three backends do the work:

* ``process``: workers forked from the kernel, so ``func`` and the items are
  inherited copy-on-write and never pickled on the way in (a ``func`` defined
  in the notebook needs no importable module); only results travel back, over a
  pipe that also carries whatever the workers print. Each worker leads its own
  process group, so a kernel interrupt (sent to the kernel's group) never
  reaches it, and a kill takes the worker and its children down with SIGKILL.
* ``thread``: threads of the kernel, for I/O-bound work; kill as in thread mode.
* ``dask``: chunks become tasks on the `DaskRunner`'s cluster.

The progress bar is tqdm's console bar written to the job's stderr stream, so
it is journaled and replayed like any output; front ends draw ``\\r`` updates
in place. The first item that raises fails the whole map with
`MapItemError` ("item 17 failed: ValueError: ...") and stops the other workers.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from polycell.job import Job, JobError, JobKilled, Runner, current_job
from polycell.journal import Record, stream_record
from polycell.thread import KillSwitch, install_interruptible_sleep, remove_interruptible_sleep

__all__ = ["MAP_BACKENDS", "MapItemError", "MapRunner", "MapSpec", "default_chunksize", "make_spec"]

MAP_BACKENDS = ("process", "thread", "dask")
#: Chunks per worker the default chunk size aims for: enough for load balancing
#: and a moving progress bar, few enough that per-chunk overhead stays invisible.
CHUNKS_PER_WORKER = 16
#: Worker output is sent to the kernel when this much is buffered, or this old.
_OUT_FLUSH_CHARS = 16_384
_OUT_FLUSH_SECONDS = 0.1
#: Chunks a process worker holds at once: the one it runs and the next.
_CHUNKS_AHEAD = 2


class MapItemError(Exception):
    """One item of a map raised: the map stopped, and this is why.

    ``index`` is the item's position in the input, ``traceback_text`` the
    worker's formatted traceback; ``__cause__`` is the original exception when
    it could be brought back from the worker.
    """

    def __init__(self, index: int, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"item {index} failed: {type_name}: {message}")
        self.index = index
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


@dataclass
class MapSpec:
    """What a map job is asked to do."""

    func: Callable[[Any], Any]
    items: list[Any]
    backend: str
    workers: int
    chunksize: int
    #: For the dask backend: gives the connected `distributed.Client`.
    dask_client: Callable[[], Any] | None = None
    chunks: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        total = len(self.items)
        self.chunks = [
            (start, min(start + self.chunksize, total)) for start in range(0, total, self.chunksize)
        ]


def default_chunksize(total: int, workers: int) -> int:
    return max(1, math.ceil(total / (workers * CHUNKS_PER_WORKER)))


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
    """Check the arguments of ``jobs.map`` and gather the items; JobError on bad input."""
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
    try:
        items = list(iterable)
    except TypeError as exc:
        raise JobError(f"jobs.map: the items must be iterable: {exc}") from None
    if workers is None:
        if mode == "dask" and dask_client is not None:
            workers = max(1, sum(dask_client().nthreads().values()))
        else:
            workers = cpu_count()
    return MapSpec(
        func, items, mode, workers, chunksize or default_chunksize(len(items), workers), dask_client
    )


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


def _progress(job: Job, total: int) -> tqdm:  # type: ignore[type-arg]
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
        self._backends: dict[int, _Backend] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def submit(self, job: Job, body: MapSpec) -> Job:
        context = self._prepare(job)
        backend = _BACKENDS[body.backend](job, body)
        job.info["workers"] = f"{body.workers} {body.backend}"
        thread = threading.Thread(
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

    def _run(self, job: Job, spec: MapSpec, backend: _Backend) -> None:
        try:
            if not job._set_running():
                return
            results: list[Any] = [None] * len(spec.items)
            bar = _progress(job, len(spec.items))
            try:
                for start, values in backend.run():
                    results[start : start + len(values)] = values
                    bar.update(len(values))
            finally:
                bar.close()
        except JobKilled as exc:
            job._set_killed(exc)
        except MapItemError as exc:
            job.journal.append(_error_record(exc))
            job._set_exception(exc)
        except BaseException as exc:  # noqa: BLE001 - a map's failure is data, not a crash
            if job.kill_requested:
                job._set_killed()
            else:
                job.journal.append(_error_record(exc))
                job._set_exception(exc)
        else:
            job._set_result(results)
        finally:
            backend.close()
            with self._lock:
                self._backends.pop(job.id, None)
                self._threads.pop(job.id, None)

    def kill(self, job: Job) -> None:
        with self._lock:
            backend = self._backends.get(job.id)
        if backend is None:
            job._set_killed()
        else:
            backend.stop()

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            backends = list(self._backends.values())
            threads = list(self._threads.values())
        for backend in backends:
            backend.stop()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _error_record(exc: BaseException) -> Record:
    if isinstance(exc, MapItemError):
        lines = [*exc.traceback_text.splitlines(), str(exc)] if exc.traceback_text else [str(exc)]
    else:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "msg_type": "error",
        "content": {"ename": type(exc).__name__, "evalue": str(exc), "traceback": lines},
    }


# -- backends -----------------------------------------------------------------------------


class _Backend:
    """Runs one map's chunks; `run` yields ``(start, results)`` as chunks complete.

    `run` raises `MapItemError` for a failed item and `JobKilled` after `stop`,
    which may be called from any thread. `close` releases everything and is
    called exactly once, from the coordinator thread.
    """

    def __init__(self, job: Job, spec: MapSpec) -> None:
        self.job = job
        self.spec = spec
        self.stopped = threading.Event()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        pass


def _format_item_error(index: int, exc: BaseException) -> MapItemError:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    error = MapItemError(index, type(exc).__name__, str(exc), "".join(tb))
    error.__cause__ = exc
    return error


class _ThreadBackend(_Backend):
    """Threads of the kernel take chunks from a shared queue; output routes via `current_job`.

    Each worker is killable the way a thread job is (`polycell.thread.KillSwitch`).
    """

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        install_interruptible_sleep()
        self._todo: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        for chunk in spec.chunks:
            self._todo.put(chunk)
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[tuple[threading.Thread, KillSwitch]] = []
        self._workers_lock = threading.Lock()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        import contextvars

        for n in range(min(self.spec.workers, len(self.spec.chunks))):
            context = contextvars.copy_context()
            switch = KillSwitch()
            thread = threading.Thread(
                target=context.run,
                args=(self._work, switch),
                name=f"polycell-map-{self.job.id}-{n}",
                daemon=True,
            )
            with self._workers_lock:
                self._workers.append((thread, switch))
            thread.start()
        remaining = len(self.spec.chunks)
        while remaining:
            item = self._done.get()
            if item is None:  # stop() woke us
                raise JobKilled(f"job {self.job.id} was killed")
            if isinstance(item, MapItemError):
                raise item
            remaining -= 1
            yield item

    def _work(self, switch: KillSwitch) -> None:
        func, items = self.spec.func, self.spec.items
        while not self.stopped.is_set():
            try:
                start, stop = self._todo.get_nowait()
            except queue.Empty:
                return
            results = []
            index = start
            try:
                with switch.armed():
                    for index in range(start, stop):
                        results.append(func(items[index]))
            except JobKilled:
                return
            except BaseException as exc:  # noqa: BLE001 - reported as the map's failure
                if not self.stopped.is_set():
                    self._done.put(_format_item_error(index, exc))
                return
            self._done.put((start, results))

    def _pull_all(self) -> list[tuple[threading.Thread, KillSwitch]]:
        with self._workers_lock:
            workers = list(self._workers)
        for thread, switch in workers:
            if thread is not threading.current_thread():
                switch.pull()
        return workers

    def stop(self) -> None:
        super().stop()
        self._pull_all()
        self._done.put(None)

    def close(self) -> None:
        self.stopped.set()
        for thread, _switch in self._pull_all():
            thread.join(2.0)
        remove_interruptible_sleep()


# -- process workers ----------------------------------------------------------------------------


class _PipeOutput:
    """In a forked worker: the job's journal and ``sys.stdout``/``sys.stderr``, sent to the kernel.

    Stream text is buffered and sent in pieces (by size, by age, and at the end
    of each chunk), so a worker printing in a tight loop does not make one
    pipe message per ``print``.
    """

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self._name = ""
        self._parts: list[str] = []
        self._size = 0
        self._since = time.monotonic()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self._flush_locked()
            self.conn.send(message)

    def write(self, name: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            if name != self._name:
                self._flush_locked()
                self._name = name
            self._parts.append(text)
            self._size += len(text)
            if self._size >= _OUT_FLUSH_CHARS or time.monotonic() - self._since >= _OUT_FLUSH_SECONDS:
                self._flush_locked()

    def append(self, record: Record) -> None:
        self.send(("record", record))

    def flush(self) -> None:
        if self._parts:
            with self.lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._parts:
            self.conn.send(("record", stream_record(self._name, "".join(self._parts))))
            self._parts, self._size = [], 0
        self._since = time.monotonic()


class _PipeStream:
    """``sys.stdout`` or ``sys.stderr`` of a forked worker."""

    def __init__(self, out: _PipeOutput, name: str) -> None:
        self._out = out
        self.name = name
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        self._out.write(self.name, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return False


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, notebook classes: cloudpickle can
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _process_worker(
    conn: multiprocessing.connection.Connection, func: Callable[[Any], Any], items: list[Any]
) -> None:
    """The body of a forked worker: run the chunks the kernel sends, until told to stop."""
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - the parent already did it
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = _PipeOutput(conn)
    # Text printed just before a long call must not wait for the next print.
    threading.Thread(target=_flush_every, args=(out, _OUT_FLUSH_SECONDS), daemon=True).start()
    sys.stdout = _PipeStream(out, "stdout")  # type: ignore[assignment]
    sys.stderr = _PipeStream(out, "stderr")  # type: ignore[assignment]
    job = current_job.get()
    if job is not None:
        # The fork copied the kernel's routing: `print` and `display` in this
        # context write to the job's journal, so this copy of it forwards.
        job.journal = out  # type: ignore[assignment]
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            out.flush()
            return
        start, stop = task
        results = []
        index = start
        try:
            for index in range(start, stop):
                results.append(func(items[index]))
            payload = _dumps(results)
        except BaseException as exc:  # noqa: BLE001 - sent to the kernel as the map's failure
            if len(results) == stop - start:  # every item ran: the results would not pickle
                index = _first_unpicklable(results, start)
                exc = TypeError(f"its result cannot be sent back to the kernel: {exc}")
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                exc_bytes = _dumps(exc)
            except Exception:  # noqa: BLE001
                exc_bytes = b""
            out.send(("error", index, type(exc).__name__, str(exc), tb, exc_bytes))
            return
        out.send(("done", start, payload))


def _flush_every(out: _PipeOutput, seconds: float) -> None:
    tick = threading.Event()
    while True:
        tick.wait(seconds)
        out.flush()


def _first_unpicklable(results: list[Any], start: int) -> int:
    for offset, value in enumerate(results):
        try:
            _dumps(value)
        except Exception:  # noqa: BLE001
            return start + offset
    return start


class _ProcessBackend(_Backend):
    """Forked workers, fed ranges of indices over pipes, one pipe per worker."""

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        self._procs: list[Any] = []
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        context = multiprocessing.get_context("fork")
        todo = list(reversed(self.spec.chunks))
        conns: dict[Any, Any] = {}
        outstanding: dict[Any, int] = {}
        for _ in range(min(self.spec.workers, len(todo))):
            parent_end, child_end = context.Pipe(duplex=True)
            proc = context.Process(
                target=_process_worker,
                args=(child_end, self.spec.func, self.spec.items),
                name=f"polycell-map-{self.job.id}",
                daemon=True,
            )
            with self._lock:
                if self.stopped.is_set():
                    raise JobKilled(f"job {self.job.id} was killed")
                # Objects that exist at the fork go to the permanent generation in
                # the child, so its collector never walks (and copies) the
                # kernel's whole heap; the kernel's own collection is unchanged.
                gc.freeze()
                try:
                    proc.start()
                finally:
                    gc.unfreeze()
                self._procs.append(proc)
            child_end.close()
            try:
                os.setpgid(proc.pid, proc.pid)  # both sides set it: no window where a kill misses
            except OSError:
                pass
            conns[parent_end] = proc
            parent_end.send(todo.pop())
            outstanding[parent_end] = 1
        # Then one chunk ahead each: a worker starts its next chunk as soon as it
        # sends a result, instead of idling while the kernel wakes up to answer.
        for _ in range(_CHUNKS_AHEAD - 1):
            for conn in conns:
                if todo:
                    conn.send(todo.pop())
                    outstanding[conn] += 1
        self.job.info["pids"] = ",".join(str(p.pid) for p in self._procs)
        remaining = len(self.spec.chunks)
        while remaining:
            ready = multiprocessing.connection.wait([*conns, self._wake_r])
            if self.stopped.is_set():
                raise JobKilled(f"job {self.job.id} was killed")
            for conn in ready:
                proc = conns[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    proc.join(1.0)
                    raise RuntimeError(
                        f"map worker {proc.pid} died (exit code {proc.exitcode}) before finishing its chunk"
                    ) from None
                kind = message[0]
                if kind == "record":
                    self.job.journal.append(message[1])
                elif kind == "done":
                    remaining -= 1
                    outstanding[conn] -= 1
                    # Near the end, no chunk ahead: a chunk queued behind a busy
                    # worker would leave another idle.
                    if todo and (not outstanding[conn] or len(todo) > len(conns)):
                        conn.send(todo.pop())
                        outstanding[conn] += 1
                    elif not outstanding[conn]:
                        conn.send(None)  # this worker exits: its pipe's end is not a death
                        del conns[conn]
                    yield message[1], pickle.loads(message[2])
                else:
                    _, index, type_name, text, tb, exc_bytes = message
                    error = MapItemError(index, type_name, text, tb)
                    if exc_bytes:
                        try:
                            error.__cause__ = pickle.loads(exc_bytes)
                        except Exception:  # noqa: BLE001 - the message says it all
                            pass
                    raise error

    def stop(self) -> None:
        with self._lock:
            super().stop()
            procs = list(self._procs)
        self._kill(procs)
        os.write(self._wake_w, b"x")

    @staticmethod
    def _kill(procs: list[Any]) -> None:
        for proc in procs:
            if proc.pid is None or proc.exitcode is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()

    def close(self) -> None:
        with self._lock:
            self.stopped.set()
            procs = list(self._procs)
        # Finished workers exit on their own after the None; the rest are stopped for good.
        deadline = time.monotonic() + 1.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill(procs)
        for proc in procs:
            proc.join(5.0)
            proc.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _DaskBackend(_Backend):
    """Chunks as tasks on a dask cluster; each returns its results and the output it printed."""

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        assert spec.dask_client is not None
        self.client = spec.dask_client()
        self._futures: list[Any] = []

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        from distributed import as_completed

        from polycell.dask_worker import map_chunk

        spec = self.spec
        self._futures = [
            self.client.submit(
                map_chunk, spec.func, spec.items[a:b], a, pure=False, key=f"polycell-map-{self.job.id}-{a}"
            )
            for a, b in spec.chunks
        ]
        completed = as_completed(self._futures, loop=self.client.loop)
        for future in completed:
            if self.stopped.is_set():
                raise JobKilled(f"job {self.job.id} was killed")
            outcome = future.result()
            for record in outcome["records"]:
                self.job.journal.append(record)
            if outcome["status"] == "error":
                error = MapItemError(
                    outcome["index"], outcome["ename"], outcome["evalue"], outcome["traceback"]
                )
                raise error
            yield outcome["start"], outcome["results"]

    def stop(self) -> None:
        super().stop()
        if self._futures:
            self.client.cancel(self._futures, force=True)

    def close(self) -> None:
        if self._futures:
            self.client.cancel(self._futures, force=True)
        self._futures = []


_BACKENDS: dict[str, type[_Backend]] = {
    "process": _ProcessBackend,
    "thread": _ThreadBackend,
    "dask": _DaskBackend,
}
