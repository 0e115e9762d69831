"""What crosses between a forked child and the kernel: record frames and the pipes they travel in.

A forked child (a process job, a ``jobs.map`` worker) cannot use the kernel's
journal or output threads; it writes records instead, as length-prefixed pickle
frames on a pipe, and the kernel's side (`polycell.fork.ForkedChild`) appends
them to the job's real journal. `RecordPipe` is the child's journal: it has the
journal's ``write``/``append``, so the output routing layer works unchanged in
the child. `ChildStream` is the child's ``sys.stdout``/``sys.stderr``. A frame
the kernel cannot unpickle becomes a `BadFrame`, reported in one line; the rest
still arrives.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import time
from typing import Any

from polycell.interrupts import BackgroundThread
from polycell.job import one_line
from polycell.journal import Record, stream_record
from polycell.stream_text import StreamText

__all__ = ["BadFrame", "ChildStream", "FrameDecoder", "RecordPipe", "receive_frame", "send_frame"]

_FRAME_HEADER = struct.Struct("!Q")
#: Python-level stream text is sent at once when a line ends and nothing was sent
#: for this long; otherwise it is batched and sent by the child's flusher thread.
_QUIET_SECONDS = 0.005
_FLUSH_SECONDS = 0.01


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RecordPipe:
    """The child's journal: records go to the parent as frames, in the order they were made.

    Stream text is batched (a tight ``print`` loop becomes a few frames, not one
    per line) but a line that ends after a quiet spell is sent at once, so
    Python output keeps its place among output the job's subprocesses write
    straight to file descriptors 1 and 2.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._text = StreamText(self._send_text)
        self._last_send = 0.0
        self._stopped = threading.Event()
        BackgroundThread(target=self._flush_loop, name="polycell-child-flush", daemon=True).start()

    # The journal API the routing layer uses.
    def write(self, name: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._text.add(name, text)
            if text.endswith("\n") and time.monotonic() - self._last_send >= _QUIET_SECONDS:
                self._text.flush()

    def append(self, record: Record) -> None:
        with self._lock:
            self._flush_locked()
            self._send(("record", record))

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def send(self, message: tuple[Any, ...]) -> None:
        """Any frame, after the text written before it."""
        with self._lock:
            self._flush_locked()
            self._send(message)

    def send_end(self, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._flush_locked()
            self._stopped.set()
            self._send(("end", outcome))

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._stopped.set()

    def _flush_loop(self) -> None:
        while not self._stopped.wait(_FLUSH_SECONDS):
            self.flush()

    def _flush_locked(self) -> None:
        self._text.flush()

    def _send_text(self, name: str, _tag: object, text: str) -> None:
        self._send(("record", stream_record(name, text)))

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            data = pickle.dumps(message, protocol=5)
        except Exception as exc:  # noqa: BLE001 - a record that cannot travel becomes a line that can
            note = f"[polycell: an output record could not be sent: {one_line(exc)}]\n"
            data = pickle.dumps(("record", stream_record("stderr", note)), protocol=5)
        _write_all(self._fd, _FRAME_HEADER.pack(len(data)) + data)
        self._last_send = time.monotonic()


class ChildStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` in the child: every write is the job's output."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name: str, pipe: RecordPipe, fd: int) -> None:
        super().__init__()
        self.name = name
        self._pipe = pipe
        self._fd = fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._pipe.write(self.name, text)
        return len(text)

    def flush(self) -> None:
        self._pipe.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # The real descriptor: what C code and subprocesses write there reaches the job's cell too.
        return self._fd


class BadFrame:
    """A frame the parent could not unpickle; reported in one line, the rest still arrives."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class FrameDecoder:
    """Length-prefixed pickle frames out of a byte stream, each decoded on its own."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames: list[Any] = []
        offset = 0
        while len(self._buffer) - offset >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(self._buffer, offset)
            end = offset + _FRAME_HEADER.size + size
            if len(self._buffer) < end:
                break
            try:
                frames.append(pickle.loads(memoryview(self._buffer)[offset + _FRAME_HEADER.size : end]))
            except Exception as exc:  # noqa: BLE001 - e.g. a class the kernel does not have yet
                frames.append(BadFrame(exc))
            offset = end
        if offset:
            del self._buffer[:offset]  # once per read, not once per frame
        return frames


def send_frame(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    _write_all(fd, _FRAME_HEADER.pack(len(data)) + data)


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        data = os.read(fd, left)
        if not data:
            return None
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def receive_frame(fd: int) -> Any:
    """Block for the next frame on `fd`; None at end of file."""
    header = _read_exactly(fd, _FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = _FRAME_HEADER.unpack(header)
    data = _read_exactly(fd, size)
    return None if data is None else pickle.loads(data)
