"""The items of a ``jobs.map``, handed to its workers in chunks.

A sized collection (a list, a range, an array, a set) is copied once when the
map starts, so the foreground may change it meanwhile; its chunks are ranges of
indices that forked workers read from their own copy. Any other iterable (a
generator, a file, ``itertools.count()``) is read lazily, one chunk at a time,
by the map's coordinator thread as workers become free: ``jobs.map`` returns at
once, memory holds only the chunks in flight, and an endless iterator runs
until the job is killed. Its total is known only at its end.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

__all__ = ["CHUNKS_PER_WORKER", "Chunk", "ChunkFeed", "default_chunksize"]

#: Chunks per worker the default chunk size aims for: enough for load balancing
#: and a moving progress bar, few enough that per-chunk overhead stays invisible.
CHUNKS_PER_WORKER = 16
#: A lazy chunk, without a chunksize, is what the iterable yields in this long (at most
#: `LAZY_CHUNK_MAX` items): a slow generator's items go out one by one, as they come,
#: a fast one's in batches that keep the per-chunk cost invisible.
LAZY_CHUNK_SECONDS = 0.05
LAZY_CHUNK_MAX = 1024


def default_chunksize(total: int, workers: int) -> int:
    return max(1, math.ceil(total / (workers * CHUNKS_PER_WORKER)))


@dataclass
class Chunk:
    """Items ``start`` to ``stop - 1`` of the input; `items` is None when workers hold the input."""

    start: int
    stop: int
    items: list[Any] | None


class ChunkFeed:
    """Hands out a map's chunks in input order; `take` is for one thread at a time.

    When reading a lazy iterable raises, `take` lets the exception through, and
    `position` is the index of the item that could not be read.
    """

    def __init__(self, iterable: Iterable[Any], *, workers: int, chunksize: int | None) -> None:
        self.items: list[Any] | None
        self.total: int | None
        self._iterator: Iterator[Any] | None
        if isinstance(iterable, Sized):
            self.items = list(iterable)
            self.total = len(self.items)
            self._iterator = None
            self.chunksize: int | None = chunksize or default_chunksize(self.total, workers)
        else:
            self.items = None
            self.total = None
            self._iterator = iter(iterable)
            self.chunksize = chunksize
        self.position = 0
        self._lock = threading.Lock()

    @property
    def lazy(self) -> bool:
        return self._iterator is not None

    @property
    def finished(self) -> bool:
        """Every item has been handed out."""
        return self.total is not None and self.position >= self.total

    def chunks_left(self) -> int:
        """Chunks not yet handed out, for a sized input (0 for a lazy one)."""
        if self.total is None or self.chunksize is None:
            return 0
        return -(-(self.total - self.position) // self.chunksize)

    def values(self, chunk: Chunk) -> list[Any]:
        """The chunk's items, wherever they are held."""
        if chunk.items is not None:
            return chunk.items
        assert self.items is not None
        return self.items[chunk.start : chunk.stop]

    def take(self) -> Chunk | None:
        """The next chunk, or None once every item has been handed out."""
        with self._lock:
            if self.finished:
                return None
            start = self.position
            if self._iterator is None:
                assert self.total is not None and self.chunksize is not None
                self.position = min(start + self.chunksize, self.total)
                return Chunk(start, self.position, None)
            items = self._read(self._iterator)
            if not items:
                return None
            return Chunk(start, self.position, items)

    def _read(self, iterator: Iterator[Any]) -> list[Any]:
        items: list[Any] = []
        limit = self.chunksize or LAZY_CHUNK_MAX
        deadline = None if self.chunksize else time.monotonic() + LAZY_CHUNK_SECONDS
        try:
            while len(items) < limit:
                items.append(next(iterator))
                self.position += 1
                if deadline is not None and time.monotonic() > deadline:
                    break
        except StopIteration:
            self.total = self.position
        except BaseException:
            self.total = self.position  # nothing more will be read: the map fails here
            raise
        return items
