"""``jobs.map(..., mode="process")``: workers forked from the kernel, fed chunks by index.

``func`` and a sized input are inherited copy-on-write and never pickled on the
way in (a ``func`` defined in the notebook needs no importable module); only
results travel back, and the chunks of a lazy input. Each worker is made exactly
like a process job (`polycell.fork.Forker`): its own process group (a kernel
interrupt never reaches it, a kill takes it and its children down with
SIGKILL), the parent-death signal, fds 1 and 2 piped to the map's cell,
``input()`` failing in one line. A worker's death is seen by its pidfd, so a
grandchild holding its pipes open cannot hang the map.
"""

from __future__ import annotations

import contextvars
import functools
import os
import pickle
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from polycell.child_pipe import receive_frame
from polycell.fork import ForkedChild, Forker, acquire_forker, describe_status, release_forker
from polycell.job import Job, JobError, JobKilled, current_job, one_line
from polycell.map_backend import (
    MapBackend,
    MapItemError,
    MapSpec,
    MapWorkerDied,
    first_unpicklable,
    pickle_value,
    user_traceback,
)

__all__ = ["ProcessMapBackend"]

#: Chunks a process worker holds at once: the one it runs and the next.
_CHUNKS_AHEAD = 2
#: How long workers told to stop may take to exit (and send their last output) before a kill.
_EXIT_SECONDS = 5.0


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
            payload = pickle_value(results)
        except BaseException as exc:  # noqa: BLE001 - sent to the kernel as the map's failure
            if len(results) == stop - start:  # every item ran: the results would not pickle
                index = first_unpicklable(results, start)
                exc = TypeError(f"its result cannot be sent back to the kernel: {exc}")
                exc.__traceback__ = None
            try:
                exc_bytes = pickle_value(exc)
            except Exception:  # noqa: BLE001
                exc_bytes = b""
            pipe.send(("error", index, type(exc).__name__, str(exc), user_traceback(exc), exc_bytes))
            pipe.close()
            return
        pipe.send(("done", start, payload))


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


class ProcessMapBackend(MapBackend):
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
            return (chunk.start, chunk.stop, pickle_value(chunk.items))
        except Exception as exc:  # noqa: BLE001 - a lock, an open file: one line, at its index
            index = first_unpicklable(chunk.items, chunk.start)
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
