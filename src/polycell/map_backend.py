"""What every backend of ``jobs.map`` is: the map's spec, its errors, and the backend's contract.

A backend (`polycell.map_threads`, `polycell.map_processes`, `polycell.map_dask`)
runs one map's chunks on the machinery of the runner of the same name (a
`polycell.thread.KillSwitch` per worker thread, `polycell.fork.Forker` for
forked workers, the `DaskRunner`'s client) and yields results as chunks
complete; the coordinator (`polycell.parallel_map.MapRunner`) puts them in
order, draws the bar and ends the job. An item that raises fails the map with
`MapItemError`, its traceback starting at the user's function.
"""

from __future__ import annotations

import pickle
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from polycell.cell import user_code_start
from polycell.job import Job, JobError, JobKilled
from polycell.map_items import Chunk, ChunkFeed
from polycell.thread import KillSwitch

__all__ = [
    "MapBackend",
    "MapItemError",
    "MapSpec",
    "MapWorkerDied",
    "first_unpicklable",
    "item_error",
    "pickle_value",
    "user_traceback",
]


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


class MapWorkerDied(JobError):
    """A process worker of a map ended before finishing its chunks (a signal, an exit)."""


@dataclass
class MapSpec:
    """What a map job is asked to do."""

    func: Callable[[Any], Any]
    feed: ChunkFeed
    backend: str
    workers: int
    #: For the dask backend: gives the connected `distributed.Client`.
    dask_client: Callable[[], Any] | None = None


class MapBackend:
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
            raise item_error(feed.position, exc) from exc

    def stop(self) -> None:
        self.stopped.set()
        self._reading.pull()

    def close(self) -> None:
        pass


def user_traceback(exc: BaseException) -> str:
    """The item's traceback starting at the user's function: polycell's frames above it are noise."""
    tb = user_code_start(exc.__traceback__)
    if tb is None:
        return ""  # nothing of the user's ran (or no traceback at all): the one-line message says it
    return "".join(traceback.format_exception(type(exc), exc, tb))


def item_error(index: int, exc: BaseException) -> MapItemError:
    """The map's failure at item `index`, from the exception its function raised."""
    error = MapItemError(index, type(exc).__name__, str(exc), user_traceback(exc))
    error.__cause__ = exc
    return error


def pickle_value(value: Any) -> bytes:
    """Pickle a value for a pipe or a worker; cloudpickle what pickle cannot (lambdas, notebook classes)."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, notebook classes: cloudpickle can
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def first_unpicklable(results: list[Any], start: int) -> int:
    """The index of the first value that will not pickle (`start` if none: the list as a whole failed)."""
    for offset, value in enumerate(results):
        try:
            pickle_value(value)
        except Exception:  # noqa: BLE001
            return start + offset
    return start
