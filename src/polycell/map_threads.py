"""``jobs.map(..., mode="thread")``: threads of the kernel, for I/O-bound work.

Each worker thread is killable the way a thread job is (`polycell.thread.KillSwitch`);
what a worker prints routes to the map's job through `current_job`.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator
from typing import Any

from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobKilled
from polycell.map_backend import MapBackend, MapItemError, MapSpec, item_error
from polycell.map_items import Chunk
from polycell.thread import KillSwitch, install_interruptible_sleep, remove_interruptible_sleep

__all__ = ["ThreadMapBackend"]


class ThreadMapBackend(MapBackend):
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
                    self._done.put(item_error(index, exc))
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
