"""Which execute requests leave the main thread's queue, and what they are numbered.

The polycell kernel's shell channel thread asks `out_of_queue_action` about each
execute request it receives: a ``%%bg`` cell, a one-line ``%bg`` or never-blocking
job query, or a cell tagged ``bg``/``bg:MODE`` starts there and then, but only
while `MainThreadQueue` says no earlier request still waits for the main thread.
`ExecutionCounter` gives such a cell an execution count that never collides with
the foreground cell's. Nothing here touches a socket: `polycell.kernel` does.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from polycell.interrupts import BackgroundThread

__all__ = ["ExecutionCounter", "MainThreadQueue", "OutOfQueue", "out_of_queue_action", "requested_mode"]


# -- which requests leave the queue ------------------------------------------------------


@dataclass(frozen=True)
class OutOfQueue:
    """What to do with a request that does not wait for the main thread.

    `kind` is ``"cell_magic"`` (``%%bg``: `magic`, `line`, `cell`),
    ``"line_magic"`` (``%bg``/``%jobs``/``%job``: `magic`, `line`) or
    ``"cell"`` (a tagged cell: `cell` run whole, in `mode`, None for the default).
    """

    kind: str
    magic: str = ""
    line: str = ""
    cell: str = ""
    mode: str | None = None


_CELL_MAGIC = re.compile(r"%%bg(?:[ \t]+(.*))?$")
_NO_MODE = object()


def requested_mode(metadata: Mapping[str, Any]) -> Any:
    """The mode a request's metadata asks for (None = the default), or `_NO_MODE`."""
    polycell = metadata.get("polycell")
    if isinstance(polycell, Mapping) and "mode" in polycell:
        mode = polycell["mode"]
        return mode or None
    tags = metadata.get("tags")
    if isinstance(tags, (list, tuple)):
        for tag in tags:
            if tag == "bg":
                return None
            if isinstance(tag, str) and tag.startswith("bg:"):
                return tag[3:] or None
    return _NO_MODE


def out_of_queue_action(code: str, metadata: Mapping[str, Any]) -> OutOfQueue | None:
    """How to run an execute request off the queue, or None to queue it as usual."""
    lines = code.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    first = lines[0].rstrip() if lines else ""
    rest = "\n".join(lines[1:])
    match = _CELL_MAGIC.match(first)
    if match:
        return OutOfQueue("cell_magic", magic="bg", line=match.group(1) or "", cell=rest)
    if first.startswith("%") and not rest.strip():
        word, _, arg = first.partition(" ")
        action = arg.split()[:1]
        never_blocks = word in {"%bg", "%jobs"} or (word == "%job" and action in (["kill"], ["show"]))
        if never_blocks:
            return OutOfQueue("line_magic", magic=word[1:], line=arg.strip())
    mode = requested_mode(metadata)
    if mode is not _NO_MODE:
        if mode is not None and not isinstance(mode, str):
            mode = str(mode)
        return OutOfQueue("cell", cell=code, mode=mode)
    return None


# -- execution counts ---------------------------------------------------------------------


class ExecutionCounter:
    """Execution counts for out-of-queue cells that never collide with the foreground's.

    IPython numbers a cell when it starts and moves ``shell.execution_count`` on
    when it ends. An out-of-queue cell that arrives while a counted foreground
    cell N runs takes N+1 (then N+2...), and the shell's count moves past them
    when cell N ends, so ``In[N]``/``Out[N]`` of the running cell stay N and the
    history stays in order. With the main thread idle it simply takes the next count.

    The inputs go into IPython's history from a thread of this counter's, in
    count order: IPython's history thread holds the input cache's lock while it
    commits to SQLite, and the shell channel thread, which starts every
    background cell, must not wait for a disk. A foreground cell first waits
    until they are stored, so its own input comes after them, as its count does.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        self._foreground = False
        self._base = 0
        self._deferred: list[tuple[int, str]] = []
        self._inputs: queue.SimpleQueue[tuple[int, str] | threading.Event | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        #: Inputs handed to the writer, and inputs it has stored: equal when it has nothing to do.
        self._handed = 0
        self._written = 0

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Around a counted foreground cell on the main thread."""
        with self._lock:
            self._foreground = True
            self._base = self.shell.execution_count
        self.stored()
        try:
            yield
        finally:
            with self._lock:
                self._foreground = False
                deferred, self._deferred = self._deferred, []
                for count, code in deferred:
                    self._store(count, code)
                if deferred:
                    last = deferred[-1][0]
                    self.shell.execution_count = max(self.shell.execution_count, last + 1)

    def reserve(self, code: str) -> int:
        """A fresh execution count for an out-of-queue cell (its input goes to the history)."""
        with self._lock:
            if self._foreground:
                count = self._base + 1 + len(self._deferred)
                self._deferred.append((count, code))
                return count
            count = self.shell.execution_count
            self._store(count, code)
            self.shell.execution_count = count + 1
            return count

    def stored(self, timeout: float = 5.0) -> bool:
        """Wait until every input handed over so far is in IPython's history."""
        if self._writer is None or self._written == self._handed:
            return True  # the usual case: no wait for the writer's thread
        done = threading.Event()
        self._inputs.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Store what is left, then end the writer thread."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._inputs.put(None)
            writer.join(timeout)

    def _store(self, count: int, code: str) -> None:
        """Hand one input to the writer (under `_lock`, so inputs queue in count order)."""
        if self._writer is None:
            self._writer = BackgroundThread(target=self._write, name="polycell-history", daemon=True)
            self._writer.start()
        self._handed += 1
        self._inputs.put((count, code))

    def _write(self) -> None:
        while (item := self._inputs.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.shell.history_manager.store_inputs(*item)
            except Exception as exc:  # noqa: BLE001 - a history that fails loses a line, not the kernel
                print(f"polycell: input {item[0]} not stored in the history: {exc!r}", file=sys.__stderr__)
            self._written += 1  # only this thread writes it


# -- the main thread's queue ----------------------------------------------------------------


class MainThreadQueue:
    """The execute requests handed to the main thread that it has not started yet.

    How ipykernel 7.4 queues a shell message for the main thread: the shell
    channel thread receives it (``shell_channel_thread_main``) and forwards the
    raw frames over an inproc ZMQ pair socket; the main thread's event loop reads
    that socket (``shell_main``), waits for ``_main_asyncio_lock`` (one request
    at a time) and only then calls ``dispatch_shell``, which runs the request, or
    aborts it after an earlier cell failed (``stop_on_error``), also there. So a
    request waits from the moment the shell channel thread forwards it until
    ``dispatch_shell`` begins with it, wherever it sits meanwhile (socket buffer,
    stream, lock). `PolycellKernel` marks those two moments, `handed` and
    `started`, and nothing else counts.

    A request leaves the queue only while this is empty: in "Run All", a ``%%bg``
    cell below ``x = 41`` must not start before ``x = 41`` has (a *running*
    foreground cell is no reason to wait: that is the point of the kernel).
    Silent requests (what front ends send for variable viewers) and requests for
    a subshell are not counted: they run no notebook cell on the main thread.
    Kept by msg_id (a multiset), so a request counts once however often it is seen.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: Counter[str] = Counter()

    def handed(self, msg_id: str) -> None:
        """The shell channel thread forwarded `msg_id` to the main thread."""
        with self._lock:
            self._waiting[msg_id] += 1

    def started(self, msg_id: str) -> None:
        """The main thread began `msg_id` (to run it or to abort it)."""
        with self._lock:
            if self._waiting[msg_id] > 1:
                self._waiting[msg_id] -= 1
            else:
                del self._waiting[msg_id]

    def __len__(self) -> int:
        with self._lock:
            return sum(self._waiting.values())
