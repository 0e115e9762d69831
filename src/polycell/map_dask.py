"""``jobs.map(..., mode="dask")``: chunks as tasks on the `DaskRunner`'s cluster.

Each task returns its results and the output it printed (`polycell.dask_worker.map_chunk`).
A sized input goes to the scheduler at once; a lazy one two chunks per worker ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from polycell.job import Job, JobKilled
from polycell.map_backend import MapBackend, MapItemError, MapSpec

__all__ = ["DaskMapBackend"]


class DaskMapBackend(MapBackend):
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
