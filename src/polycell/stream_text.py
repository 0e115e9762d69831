"""Consecutive writes to one stream, gathered into one text: the one stream merge.

A job printing in a tight loop makes thousands of small writes. Every stage
that carries them on (a forked child's pipe to the kernel, a dask worker's
events, the iopub publisher, the journal on disk) sends each run of writes to
one stream as one text, in pieces of at most `STREAM_CHUNK_CHARS`, so the cost
of a line is a list append, not a message. The in-memory journal
(`polycell.journal`) merges into its last record on the same bound.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["STREAM_CHUNK_CHARS", "StreamText"]

#: The most text one merged piece gathers before it is sent on.
STREAM_CHUNK_CHARS = 64_000


class StreamText:
    """Text written to one stream since it was last sent on; joined once, when it is sent.

    `key` names the stream (a stream name, or a job and a stream name): text of
    another key sends what was held first, so order is kept. The `tag` of the
    first text held travels with the joined text to `emit` (the request a
    message answers and where its text starts, say) and is not compared.
    Not thread-safe: each user holds its own lock, or its own thread.
    """

    __slots__ = ("_emit", "_key", "_parts", "_size", "_tag")

    def __init__(self, emit: Callable[[Any, Any, str], None]) -> None:
        self._emit = emit
        self._key: Hashable = None
        self._tag: Any = None
        self._parts: list[str] = []
        self._size = 0

    def add(self, key: Hashable, text: str, tag: Any = None) -> None:
        """Gather `text` written to stream `key`."""
        if self._parts and key != self._key:
            self.flush()
        if not self._parts:
            self._key, self._tag = key, tag
        self._parts.append(text)
        self._size += len(text)
        if self._size >= STREAM_CHUNK_CHARS:
            self.flush()

    def flush(self) -> None:
        """Send on what is held, as one text (nothing when nothing is held)."""
        if self._parts:
            text = "".join(self._parts)
            self._parts, self._size = [], 0
            self._emit(self._key, self._tag, text)
