"""Every output a job produced, in order, bounded in memory, and followable.

A record is a Jupyter iopub message without its envelope: ``{"msg_type":
"stream", "content": {"name": "stdout", "text": "..."}}``, or a
``display_data``, ``update_display_data``, ``execute_result``, ``error`` or
``clear_output``. Keeping the protocol's own shape means a replay is just
sending the records again, and nothing is lost in translation.

Consecutive writes to the same stream are merged into one record (up to
`chunk_chars`, by default `polycell.stream_text.STREAM_CHUNK_CHARS`), so a
job printing 100,000 lines keeps a few dozen records, not 100,000. When
the journal grows past `max_chars`, the oldest records are dropped and the
journal says so at its head.

Every unit of output has a *position*, counted from the job's start and never
reused: each character of stream text is one, every other record is one. A
reader that has everything before position P asks for what comes after it
(`since`), and a live message carries the position of its first unit (see
`polycell.iopub`), so a front end that replays a journal and then follows the
job live keeps each unit exactly once, with no state kept here per reader.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from polycell.stream_text import STREAM_CHUNK_CHARS

__all__ = ["OutputJournal", "Record", "StreamRun", "Subscription", "last_line", "stream_record"]

Record = dict[str, Any]
#: A follower is called with each new record (consecutive stream text as one `StreamRun`)
#: and its journal position (see `OutputJournal.position`; None for a note the journal
#: adds, such as the one saying output was dropped), then once with (None, None) when
#: the job ends.
Follower = Callable[["Record | StreamRun | None", "int | None"], None]

DEFAULT_MAX_CHARS = 16_000_000


def stream_record(name: str, text: str) -> Record:
    return {"msg_type": "stream", "content": {"name": name, "text": text}}


def error_record(exc: BaseException, traceback_lines: list[str]) -> Record:
    """The record of an exception that ended a job's code, shown as its cell's error."""
    return {
        "msg_type": "error",
        "content": {"ename": type(exc).__name__, "evalue": str(exc), "traceback": traceback_lines},
    }


def last_line(text: str) -> str:
    """The last non-blank line of stream text; of a line a progress bar redraws with
    ``\r``, only the last drawing."""
    for raw in reversed(text.split("\n")):
        line = raw.rstrip("\r").rpartition("\r")[2].strip()
        if line:
            return line
    return ""


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


def _length(record: Record) -> int:
    """How many positions a record takes: a character of its text each, or 1 for a whole record."""
    return len(record["content"]["text"]) if record["msg_type"] == "stream" else 1


class OutputJournal:
    """The ordered, bounded record of one job's output."""

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, chunk_chars: int = STREAM_CHUNK_CHARS) -> None:
        self.max_chars = max_chars
        self.chunk_chars = chunk_chars
        self._records: deque[Record] = deque()
        self._starts: deque[int] = deque()  # the position of each record's first unit
        #: Units of output ever appended (dropped ones included): the position of the next one.
        self.position = 0
        # Text merged into the last (stream) record but not yet joined into it: joining
        # on every write would copy the growing chunk each time (quadratic per chunk).
        self._open_parts: list[str] = []
        self._open_chars = 0
        self._size = 0
        self._lock = threading.Lock()
        self._followers: list[_Follower] = []
        self._closed = False
        self.dropped_records = 0
        self.dropped_chars = 0

    # -- writing -------------------------------------------------------------------

    def write(self, name: str, text: str) -> None:
        """Append stream text (``stdout`` or ``stderr``)."""
        if text:
            self.append(stream_record(name, text))

    def append(self, record: Record) -> None:
        with self._lock:
            if self._closed:
                return
            position = self.position
            self._store(record)
            # Called under the lock so that followers see records in journal order
            # even when several threads write; followers must only enqueue.
            if record["msg_type"] == "stream" and len(record) == 2:
                name, text = record["content"]["name"], record["content"]["text"]
                for follower in self._followers:
                    run = follower.run
                    if run is not None and run.name == name:
                        run.parts.append(text)  # already queued: its taker gets this too
                    else:
                        follower.run = StreamRun(self._lock, follower, name, [text])
                        follower.callback(follower.run, position)
            else:
                for follower in self._followers:
                    follower.run = None
                    follower.callback(record, position)

    def _store(self, record: Record) -> None:
        last = self._records[-1] if self._records else None
        if (
            record["msg_type"] == "stream"
            and last is not None
            and last["msg_type"] == "stream"
            and last["content"]["name"] == record["content"]["name"]
            and len(last["content"]["text"]) + self._open_chars < self.chunk_chars
        ):
            self._open_parts.append(record["content"]["text"])
            self._open_chars += len(record["content"]["text"])
        else:
            self._seal()
            self._records.append(record)
            self._starts.append(self.position)
        self.position += _length(record)
        self._size += _record_size(record)
        while self._size > self.max_chars and len(self._records) > 1:
            old = self._records.popleft()
            self._starts.popleft()
            size = _record_size(old)
            self._size -= size
            self.dropped_records += 1
            self.dropped_chars += size

    def _seal(self) -> None:
        """Join the pending text into the last record (a new dict: followers may hold the old)."""
        if self._open_parts:
            last = self._records[-1]
            text = last["content"]["text"] + "".join(self._open_parts)
            self._records[-1] = stream_record(last["content"]["name"], text)
            self._open_parts, self._open_chars = [], 0

    def close(self) -> None:
        """The job ended: tell followers, and accept nothing more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for follower in self._followers:
                follower.callback(None, None)
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
            self._seal()
            return self._head() + list(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())

    def text(self) -> str:
        """The stdout and stderr text, in order."""
        with self._lock:
            self._seal()
            records = self._head() + list(self._records)
        return "".join(r["content"]["text"] for r in records if r["msg_type"] == "stream")

    def tail_text(self, max_chars: int = 4096) -> str:
        """The last `max_chars` (or a little more) of the stdout and stderr text."""
        with self._lock:
            parts = list(self._open_parts)
            size = self._open_chars
            for record in reversed(self._records):
                if size >= max_chars:
                    break
                if record["msg_type"] == "stream":
                    parts.insert(0, record["content"]["text"])
                    size += len(record["content"]["text"])
        return "".join(parts)[-max_chars:]

    def follow(self, callback: Follower, *, replay: bool = False) -> Subscription:
        """Snapshot the journal and subscribe to what comes after, atomically.

        Nothing is missed and nothing is seen twice between the snapshot and the
        live records. If the journal had already ended, `ended` is True and the
        follower is never called with live records.

        With `replay`, the follower is first called with every snapshot record,
        under the journal's lock: a follower that queues records then has the
        snapshot queued before any live record a concurrent writer appends.
        """
        follower = _Follower(callback)
        with self._lock:
            self._seal()
            head = self._head()
            snapshot = head + list(self._records)
            ended = self._closed
            if replay:
                for record in head:  # the note of drops: not output, so at no position
                    callback(record, None)
                for record, start in zip(self._records, self._starts, strict=True):
                    callback(record, start)
            if not ended:
                self._followers.append(follower)

        def cancel() -> None:
            with self._lock:
                if follower in self._followers:
                    self._followers.remove(follower)

        return Subscription(snapshot, ended, cancel)

    def since(self, position: int = 0, max_chars: int = 1_000_000) -> tuple[list[Record], int, bool, bool]:
        """The records after `position`, the position they reach, whether that is the
        journal's end (caught up), and whether the journal ended there.

        A reader polling with the position it was given sees every write once,
        in order, with no state kept here (a lost reply is simply asked for
        again): merging only ever appends text to the last record. Output
        dropped by the cap before the reader got it comes back as one note.
        A position beyond the end (of another journal) reads from the end.

        At most about `max_chars` characters are returned per call; the
        returned `ended` is only True once the reader has everything.
        """
        with self._lock:
            self._seal()
            records, starts = self._records, self._starts
            out: list[Record] = []
            position = min(max(position, 0), self.position)
            first = starts[0] if starts else self.position
            if position < first:
                missed = first - position
                note = f"[polycell: {missed:,} characters or records of output were dropped unread]\n"
                out.append(stream_record("stderr", note))
                position = first
            index = bisect_right(starts, position) - 1
            size = 0
            while 0 <= index < len(records) and size < max_chars:
                record, start = records[index], starts[index]
                if record["msg_type"] == "stream":
                    part = record["content"]["text"][position - start :]
                    if part:
                        out.append(stream_record(record["content"]["name"], part))
                        size += len(part)
                elif position == start:
                    out.append(record)
                    size += _record_size(record)
                position = start + _length(record)
                index += 1
            caught_up = position == self.position
            return out, position, caught_up, self._closed and caught_up


class StreamRun:
    """Stream text a follower has been told of and has not taken yet: one queue item per run.

    A job printing in a tight loop writes thousands of times between two
    wake-ups of a follower's thread. The follower is called once, with this,
    at the first write of a run of one stream; the writes after it are added
    here, under the journal's lock, until the follower's thread `take`s it or
    another record ends the run. So a follower's queue holds one item per run
    of text, in journal order, and its thread joins the text once.
    """

    __slots__ = ("_follower", "_lock", "name", "parts")

    def __init__(self, lock: threading.Lock, follower: _Follower, name: str, parts: list[str]) -> None:
        self._lock = lock
        self._follower = follower
        self.name = name
        self.parts = parts

    def take(self) -> Record:
        """The run's text so far, as one stream record; later writes start a new run."""
        with self._lock:
            if self._follower.run is self:
                self._follower.run = None
            parts, self.parts = self.parts, []
        return stream_record(self.name, "".join(parts))


class _Follower:
    """A follower's callback, and the run of text it was told of and has not taken."""

    __slots__ = ("callback", "run")

    def __init__(self, callback: Follower) -> None:
        self.callback = callback
        self.run: StreamRun | None = None


@dataclass(frozen=True)
class Subscription:
    snapshot: list[Record]
    ended: bool
    cancel: Callable[[], None]
