"""Every output a job produced, in order, bounded in memory, and followable.

A record is a Jupyter iopub message without its envelope: ``{"msg_type":
"stream", "content": {"name": "stdout", "text": "..."}}``, or a
``display_data``, ``update_display_data``, ``execute_result``, ``error`` or
``clear_output``. Keeping the protocol's own shape means a replay is just
sending the records again, and nothing is lost in translation.

Consecutive writes to the same stream are merged into one record (up to
`chunk_chars`), so a job printing 100,000 lines keeps a few dozen records,
not 100,000. When the journal grows past `max_chars`, the oldest records are
dropped and the journal says so at its head.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["OutputJournal", "Record", "Subscription", "stream_record"]

Record = dict[str, Any]
#: A follower is called with each new record, then once with None when the job ends.
Follower = Callable[[Record | None], None]

DEFAULT_MAX_CHARS = 16_000_000
DEFAULT_CHUNK_CHARS = 64_000


def stream_record(name: str, text: str) -> Record:
    return {"msg_type": "stream", "content": {"name": name, "text": text}}


def _record_size(record: Record) -> int:
    content = record["content"]
    if record["msg_type"] == "stream":
        return len(content["text"])
    size = 64
    for value in content.get("data", {}).values():
        size += len(value) if isinstance(value, str) else 256
    for line in content.get("traceback", ()):
        size += len(line)
    return size


class OutputJournal:
    """The ordered, bounded record of one job's output."""

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> None:
        self.max_chars = max_chars
        self.chunk_chars = chunk_chars
        self._records: deque[Record] = deque()
        self._size = 0
        self._lock = threading.Lock()
        self._followers: list[Follower] = []
        self._closed = False
        self.dropped_records = 0
        self.dropped_chars = 0
        #: Total records ever appended (merged stream writes count once per write).
        self.writes = 0

    # -- writing -------------------------------------------------------------------

    def write(self, name: str, text: str) -> None:
        """Append stream text (``stdout`` or ``stderr``)."""
        if text:
            self.append(stream_record(name, text))

    def append(self, record: Record) -> None:
        with self._lock:
            if self._closed:
                return
            self.writes += 1
            self._store(record)
            # Called under the lock so that followers see records in journal order
            # even when several threads write; followers must only enqueue.
            for follower in self._followers:
                follower(record)

    def _store(self, record: Record) -> None:
        last = self._records[-1] if self._records else None
        if (
            record["msg_type"] == "stream"
            and last is not None
            and last["msg_type"] == "stream"
            and last["content"]["name"] == record["content"]["name"]
            and len(last["content"]["text"]) < self.chunk_chars
        ):
            # Merge into a new dict: followers may still hold the old one.
            text = last["content"]["text"] + record["content"]["text"]
            self._records[-1] = stream_record(last["content"]["name"], text)
        else:
            self._records.append(record)
        self._size += _record_size(record)
        while self._size > self.max_chars and len(self._records) > 1:
            old = self._records.popleft()
            size = _record_size(old)
            self._size -= size
            self.dropped_records += 1
            self.dropped_chars += size

    def close(self) -> None:
        """The job ended: tell followers, and accept nothing more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for follower in self._followers:
                follower(None)
            self._followers = []

    @property
    def closed(self) -> bool:
        return self._closed

    # -- reading -------------------------------------------------------------------

    def _head(self) -> list[Record]:
        if not self.dropped_records:
            return []
        note = (
            f"[polycell: {self.dropped_chars:,} characters of earlier output were dropped "
            f"to keep the journal under {self.max_chars:,}]\n"
        )
        return [stream_record("stderr", note)]

    def records(self) -> list[Record]:
        """A snapshot of the whole journal, led by a marker if anything was dropped."""
        with self._lock:
            return self._head() + list(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())

    def text(self) -> str:
        """The stdout and stderr text, in order."""
        with self._lock:
            records = self._head() + list(self._records)
        return "".join(r["content"]["text"] for r in records if r["msg_type"] == "stream")

    def follow(self, follower: Follower) -> Subscription:
        """Snapshot the journal and subscribe to what comes after, atomically.

        Nothing is missed and nothing is seen twice between the snapshot and the
        live records. If the journal had already ended, `ended` is True and the
        follower is never called.
        """
        with self._lock:
            snapshot = self._head() + list(self._records)
            ended = self._closed
            if not ended:
                self._followers.append(follower)

        def cancel() -> None:
            with self._lock:
                if follower in self._followers:
                    self._followers.remove(follower)

        return Subscription(snapshot, ended, cancel)


@dataclass(frozen=True)
class Subscription:
    snapshot: list[Record]
    ended: bool
    cancel: Callable[[], None]
