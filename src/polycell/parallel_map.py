"""``jobs.map``: a parallel map that runs as one job, with a live progress bar.

``jobs.map(func, items)`` returns at once with a `Job` whose result is
``[func(x) for x in items]``, in input order. Items go to the workers in
chunks (`polycell.map_items`), so 100,000 tiny items cost a few dozen
round trips, not 100,000; an iterable with no length (a generator) is read
lazily, chunk by chunk, as workers become free. Three backends do the work:

* ``process``: workers forked from the kernel, so ``func`` and a sized input are
  inherited copy-on-write and never pickled on the way in (a ``func`` defined
  in the notebook needs no importable module); only results travel back, and
  the chunks of a lazy input. Each
  worker is made exactly like a process job (`polycell.process.Forker`): its
  own process group (a kernel interrupt never reaches it, a kill takes it and
  its children down with SIGKILL), the parent-death signal, fds 1 and 2 piped
  to the map's cell, ``input()`` failing in one line. A worker's death is seen
  by its pidfd, so a grandchild holding its pipes open cannot hang the map.
* ``thread``: threads of the kernel, for I/O-bound work; kill as in thread mode.
* ``dask``: chunks become tasks on the `DaskRunner`'s cluster.

The progress bar is tqdm's console bar written to the job's stderr stream, so
it is journaled and replayed like any output; front ends draw ``\\r`` updates
in place. For a lazy input it counts items until the input ends, then shows the
full bar. The first item that raises fails the whole map with
`MapItemError` ("item 17 failed: ValueError: ...", its traceback starting at
``func``) and stops the other workers; a failure that is no item's (a worker
killed from outside) is one line (`MapWorkerDied`).
"""

from __future__ import annotations

import contextvars
import functools
import os
import pickle
import queue
import selectors
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from polycell.child_pipe import receive_frame
from polycell.fork import ForkedChild, Forker, acquire_forker, describe_status, release_forker
from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobError, JobKilled, Runner, current_job, one_line
from polycell.journal import Record, error_record
from polycell.map_items import Chunk, ChunkFeed
from polycell.thread import KillSwitch, install_interruptible_sleep, remove_interruptible_sleep

__all__ = [
    "MAP_BACKENDS",
    "MapItemError",
    "MapRunner",
    "MapSpec",
    "MapWorkerDied",
    "make_spec",
]

MAP_BACKENDS = ("process", "thread", "dask")
#: Chunks a process worker holds at once: the one it runs and the next.
_CHUNKS_AHEAD = 2
#: How long workers told to stop may take to exit (and send their last output) before a kill.
_EXIT_SECONDS = 5.0


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
    feed: ChunkFeed
    backend: str
    workers: int
    #: For the dask backend: gives the connected `distributed.Client`.
    dask_client: Callable[[], Any] | None = None


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
        self._backends: dict[int, _Backend] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False
        install_interruptible_sleep()  # a kill wakes a lazy input's sleep, in the coordinator too

    def submit(self, job: Job, body: MapSpec) -> Job:
        context = self._prepare(job)
        backend = _BACKENDS[body.backend](job, body)
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

    def _run(self, job: Job, spec: MapSpec, backend: _Backend) -> None:
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
        self._reading = KillSwitch()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        raise NotImplementedError

    def take(self) -> Chunk | None:
        """The next chunk, for the coordinator: reading a lazy input runs the user's code,
        which a kill stops, and whose failure fails the map at the item it could not read."""
        feed = self.spec.feed
        if not feed.lazy:
            return feed.take()
        try:
            with self._reading.armed():
                return feed.take()
        except JobKilled:
            raise JobKilled(f"job {self.job.id} was killed") from None
        except Exception as exc:
            raise _format_item_error(feed.position, exc) from exc

    def stop(self) -> None:
        self.stopped.set()
        self._reading.pull()

    def close(self) -> None:
        pass


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_traceback(exc: BaseException) -> str:
    """The item's traceback starting at the user's function: polycell's frames above it are noise."""
    tb = exc.__traceback__
    while tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _PACKAGE_DIR:
        tb = tb.tb_next
    if tb is None:
        return ""  # nothing of the user's ran (or no traceback at all): the one-line message says it
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _format_item_error(index: int, exc: BaseException) -> MapItemError:
    error = MapItemError(index, type(exc).__name__, str(exc), _user_traceback(exc))
    error.__cause__ = exc
    return error


class _ThreadBackend(_Backend):
    """Threads of the kernel take chunks from a shared queue; output routes via `current_job`.

    Each worker is killable the way a thread job is (`polycell.thread.KillSwitch`).
    """

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        install_interruptible_sleep()
        self._todo: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[tuple[threading.Thread, KillSwitch]] = []
        self._workers_lock = threading.Lock()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        feed = self.spec.feed
        count = self.spec.workers
        if not feed.lazy:
            assert feed.total is not None and feed.chunksize is not None
            count = min(count, -(-feed.total // feed.chunksize))
        for n in range(count):
            switch = KillSwitch()
            thread = BackgroundThread(
                target=contextvars.copy_context().run,
                args=(self._work, switch),
                name=f"polycell-map-{self.job.id}-{n}",
                daemon=True,
            )
            with self._workers_lock:
                self._workers.append((thread, switch))
            thread.start()
        # Two chunks queued per worker at most: a lazy input is read as the workers go.
        outstanding, all_queued = 0, count == 0
        while outstanding or not all_queued:
            reading = not all_queued and outstanding < 2 * count
            if reading:
                chunk = self.take()
                if chunk is None:
                    all_queued = True
                    for _ in range(count):
                        self._todo.put(None)
                else:
                    self._todo.put(chunk)
                    outstanding += 1
            try:  # between reads, take what finished without waiting for it
                item = self._done.get(block=not reading)
            except queue.Empty:
                continue
            if item is None:  # stop() woke us
                raise JobKilled(f"job {self.job.id} was killed")
            if isinstance(item, MapItemError):
                raise item
            outstanding -= 1
            yield item

    def _work(self, switch: KillSwitch) -> None:
        func = self.spec.func
        while not self.stopped.is_set():
            chunk = self._todo.get()
            if chunk is None:
                return
            values = self.spec.feed.values(chunk)
            results = []
            index = chunk.start
            try:
                with switch.armed():
                    for index, item in enumerate(values, chunk.start):  # noqa: B007 - read by the except
                        results.append(func(item))
            except BaseException as exc:  # noqa: BLE001 - reported as the map's failure
                # Stopped: the JobKilled is the kill's. Otherwise even a JobKilled (the
                # function awaited a killed job) is this item's error.
                if not self.stopped.is_set():
                    self._done.put(_format_item_error(index, exc))
                return
            self._done.put((chunk.start, results))

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
        workers = self._pull_all()
        for _ in workers:
            self._todo.put(None)  # wakes a worker waiting for a chunk
        for thread, _switch in workers:
            thread.join(2.0)
        remove_interruptible_sleep()


# -- process workers ----------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, notebook classes: cloudpickle can
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _worker_main(
    context: contextvars.Context,
    func: Callable[[Any], Any],
    items: list[Any] | None,
    pipe: Any,
    tasks: int | None,
) -> None:
    """The body of a forked worker (set up by `polycell.process.Forker`): run the chunks it is sent."""
    assert tasks is not None
    context.run(_worker_loop, func, items, pipe, tasks)


def _worker_loop(func: Callable[[Any], Any], items: list[Any] | None, pipe: Any, tasks: int) -> None:
    job = current_job.get()
    if job is not None:
        # The fork copied the kernel's routing: `print` and `display` in this
        # context write to the job's journal, so this copy of it forwards.
        job.journal = pipe
    while True:
        task = receive_frame(tasks)
        if task is None:  # told to stop, or the kernel is gone
            pipe.close()
            return
        # (start, stop): items of the input this fork holds; a lazy input's chunk comes pickled.
        start, stop = task[0], task[1]
        values = pickle.loads(task[2]) if len(task) > 2 else items[start:stop]  # type: ignore[index]
        results = []
        index = start
        try:
            for index, item in enumerate(values, start):  # noqa: B007 - read by the except
                results.append(func(item))
            payload = _dumps(results)
        except BaseException as exc:  # noqa: BLE001 - sent to the kernel as the map's failure
            if len(results) == stop - start:  # every item ran: the results would not pickle
                index = _first_unpicklable(results, start)
                exc = TypeError(f"its result cannot be sent back to the kernel: {exc}")
                exc.__traceback__ = None
            try:
                exc_bytes = _dumps(exc)
            except Exception:  # noqa: BLE001
                exc_bytes = b""
            pipe.send(("error", index, type(exc).__name__, str(exc), _user_traceback(exc), exc_bytes))
            pipe.close()
            return
        pipe.send(("done", start, payload))


def _first_unpicklable(results: list[Any], start: int) -> int:
    for offset, value in enumerate(results):
        try:
            _dumps(value)
        except Exception:  # noqa: BLE001
            return start + offset
    return start


class MapWorkerDied(JobError):
    """A process worker of a map ended before finishing its chunks (a signal, an exit)."""


class _Worker:
    """The coordinator's view of one forked worker."""

    def __init__(self, number: int, child: ForkedChild) -> None:
        self.number = number
        self.child = child
        self.outstanding = 0
        #: Sent the stop message: its exit is expected.
        self.released = False
        self.pidfd = child.open_pidfd()
        self.done = False

    def send(self, task: tuple[Any, ...] | None) -> None:
        if task is None:
            self.released = True
        else:
            self.outstanding += 1
        self.child.send(task)


class _ProcessBackend(_Backend):
    """Forked workers (made like process jobs, by `polycell.process.Forker`), fed ranges of indices.

    Only the coordinator thread (`run`, then `close`) reads, waits for and reaps
    the workers; `stop` from another thread only signals their process groups,
    which is safe until the coordinator reaps them.
    A worker's end is seen through its pidfd, not only by end of file on its
    pipes: a grandchild it forked may hold those open for ever.
    """

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self._forker: Forker | None = None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _start_worker(self, number: int) -> _Worker:
        assert self._forker is not None
        main = functools.partial(
            _worker_main, contextvars.copy_context(), self.spec.func, self.spec.feed.items
        )
        child = self._forker.fork(self.job, main, what="a map worker", tasks=True)
        worker = _Worker(number, child)
        with self._lock:
            self._workers.append(worker)
            if self.stopped.is_set():  # stop() ran while this one was being forked
                child.signal_group(signal.SIGKILL)
        for name in ("stdout", "stderr", "records"):
            os.set_blocking(child.fds[name], False)
            self._selector.register(child.fds[name], selectors.EVENT_READ, (worker, name))
        if worker.pidfd is not None:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, (worker, "exit"))
        return worker

    def _next_task(self) -> tuple[Any, ...] | None:
        """The next chunk as a worker's task; None once all are sent."""
        chunk = self.take()
        if chunk is None:
            return None
        if chunk.items is None:
            return (chunk.start, chunk.stop)
        try:
            return (chunk.start, chunk.stop, _dumps(chunk.items))
        except Exception as exc:  # noqa: BLE001 - a lock, an open file: one line, at its index
            index = _first_unpicklable(chunk.items, chunk.start)
            raise MapItemError(index, type(exc).__name__, f"it cannot be sent to a worker: {exc}") from None

    def _pending(self) -> bool:
        return not self.spec.feed.finished or any(w.outstanding for w in self._workers)

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        self._forker = acquire_forker()
        for number in range(self.spec.workers):
            if self.stopped.is_set():
                raise JobKilled(f"job {self.job.id} was killed")
            task = self._next_task()
            if task is None:
                break
            self._start_worker(number).send(task)
        # Then one chunk ahead each: a worker starts its next chunk as soon as it
        # sends a result, instead of idling while the kernel wakes up to answer.
        # Not for a lazy input: its chunks travel in the pipe, and a worker busy
        # with one could not take a large next one while the kernel writes it.
        if not self.spec.feed.lazy:
            for _ in range(_CHUNKS_AHEAD - 1):
                for worker in self._workers:
                    if (task := self._next_task()) is not None:
                        worker.send(task)
        self.job.info["pids"] = ",".join(str(w.child.pid) for w in self._workers)
        ending_by: float | None = None
        while self._pending() or not all(w.done for w in self._workers):
            if not self._pending():
                # Every chunk is in: the workers were told to stop; take their last
                # output (fds 1 and 2 may lag behind the last result) as they exit.
                ending_by = ending_by or time.monotonic() + _EXIT_SECONDS
                if time.monotonic() > ending_by:
                    return
            polling = any(w.pidfd is None and not w.done for w in self._workers)
            events = self._selector.select(0.05 if polling or ending_by else None)
            if self.stopped.is_set():
                raise JobKilled(f"job {self.job.id} was killed")
            exits = [key.data[0] for key, _ in events if key.data is not None and key.data[1] == "exit"]
            if polling:
                exits += [w for w in self._workers if w.pidfd is None and not w.done and w.child.exited()]
            # Pipes first: a worker's last result may be waiting beside its exit.
            for key, _ in events:
                if key.data is not None and key.data[1] != "exit":
                    worker, name = key.data
                    yield from self._take(worker, name)
            for worker in exits:
                if worker.done:
                    continue
                for name in ("records", "stdout", "stderr"):
                    if worker.child.fds[name] in self._selector.get_map():
                        yield from self._take(worker, name)
                self._ended(worker)

    def _feed(self, worker: _Worker) -> None:
        """A worker sent a result: give it its next chunk, or tell it to exit."""
        feed = self.spec.feed
        # Near the end, no chunk ahead: a chunk queued behind a busy worker would leave another idle.
        ahead = not feed.lazy and feed.chunks_left() > len(self._workers)
        if not worker.outstanding or ahead:
            task = self._next_task()
            if task is not None:
                worker.send(task)
                return
        if not worker.outstanding:
            worker.send(None)  # this worker exits: its end is not a death

    def _take(self, worker: _Worker, name: str) -> list[tuple[int, list[Any]]]:
        """What the worker's `name` pipe holds now: output into the journal, chunk results out."""
        messages, still_open = worker.child.read(name)
        if not still_open:
            self._selector.unregister(worker.child.fds[name])
        finished = []
        for message in messages:
            if message[0] == "error":
                _, index, type_name, text, tb, exc_bytes = message
                error = MapItemError(index, type_name, text, tb)
                if exc_bytes:
                    try:
                        error.__cause__ = pickle.loads(exc_bytes)
                    except Exception:  # noqa: BLE001 - the message says it all
                        pass
                raise error
            _, start, payload = message
            worker.outstanding -= 1
            self._feed(worker)
            try:
                values = pickle.loads(payload)
            except Exception as exc:  # noqa: BLE001 - one line, not polycell's traceback
                raise JobError(
                    f"the results of items {start}.. could not be loaded here: {one_line(exc)}"
                ) from None
            finished.append((start, values))
        return finished

    def _ended(self, worker: _Worker) -> None:
        """The worker exited: end what it left running, reap it; a death unless it was told to stop."""
        child = worker.child
        child.signal_group(signal.SIGKILL)
        status = child.reap()
        worker.done = True
        for name in ("stdout", "stderr", "records"):
            if child.fds[name] in self._selector.get_map():
                self._selector.unregister(child.fds[name])
        if worker.pidfd is not None:
            self._selector.unregister(worker.pidfd)
        if not worker.released or worker.outstanding:
            raise MapWorkerDied(f"map worker {worker.number} died: {describe_status(status)}")

    def stop(self) -> None:
        with self._lock:
            if self._closed:
                return
            super().stop()
            for worker in self._workers:
                worker.child.signal_group(signal.SIGKILL)
            os.write(self._wake_w, b"x")  # under the lock: close() cannot have closed it

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.stopped.set()
            workers = list(self._workers)
        for worker in workers:
            worker.child.signal_group(signal.SIGKILL)
        for worker in workers:
            worker.child.reap()
            worker.child.close()
            if worker.pidfd is not None:
                os.close(worker.pidfd)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._forker is not None:
            release_forker()


class _DaskBackend(_Backend):
    """Chunks as tasks on a dask cluster; each returns its results and the output it printed."""

    def __init__(self, job: Job, spec: MapSpec) -> None:
        super().__init__(job, spec)
        assert spec.dask_client is not None
        self.client = spec.dask_client()
        self._futures: set[Any] = set()

    def run(self) -> Iterator[tuple[int, list[Any]]]:
        from distributed import as_completed

        feed = self.spec.feed
        completed = as_completed([], loop=self.client.loop)
        # A sized input goes to the scheduler at once; a lazy one two chunks per worker ahead.
        ahead = 2 * self.spec.workers if feed.lazy else None
        while (ahead is None or len(self._futures) < ahead) and self._submit(completed):
            pass
        for future in completed:
            if self.stopped.is_set():
                raise JobKilled(f"job {self.job.id} was killed")
            self._futures.discard(future)
            outcome = future.result()
            for record in outcome["records"]:
                self.job.journal.append(record)
            if outcome["status"] == "error":
                error = MapItemError(
                    outcome["index"], outcome["ename"], outcome["evalue"], outcome["traceback"]
                )
                raise error
            if feed.lazy:
                self._submit(completed)
            yield outcome["start"], outcome["results"]

    def _submit(self, completed: Any) -> bool:
        from polycell.dask_worker import map_chunk

        chunk = self.take()
        if chunk is None:
            return False
        items = self.spec.feed.values(chunk)
        future = self.client.submit(
            map_chunk,
            self.spec.func,
            items,
            chunk.start,
            pure=False,
            key=f"polycell-map-{self.job.id}-{chunk.start}",
        )
        self._futures.add(future)
        completed.add(future)
        return True

    def stop(self) -> None:
        super().stop()
        if self._futures:
            self.client.cancel(list(self._futures), force=True)

    def close(self) -> None:
        if self._futures:
            self.client.cancel(list(self._futures), force=True)
        self._futures = set()


_BACKENDS: dict[str, type[_Backend]] = {
    "process": _ProcessBackend,
    "thread": _ThreadBackend,
    "dask": _DaskBackend,
}
