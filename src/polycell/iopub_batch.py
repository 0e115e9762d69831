"""The kernel's iopub socket, able to hand one thread's messages to ipykernel's IOPub thread at once.

ipykernel sends every iopub message from its IOPub thread: a send from any
other thread queues the message and wakes that thread through a pipe. The
wake-up is a GIL hand-off the sending thread then waits for, and a
``%%bg`` cell the polycell kernel starts from its shell channel thread sends
three messages before its reply (busy, execute_input, the job's handle): held
and handed over together, they cost one wake-up instead of three. They are
handed over as soon as the handle is sent (`IOPubPublisher.send_now`
releases them), before the job starts and can print. Every other thread's
messages, and this thread's outside `held`, go as before, in order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["BatchingIOPubSocket"]


class BatchingIOPubSocket:
    """ipykernel's ``BackgroundSocket``, whose sends from one thread can be `held` and handed over at once.

    Reaches into ipykernel 7.4.0's ``IOPubThread._really_send(msg, *args,
    **kwargs)``, the function ``send_multipart`` schedules for each message on
    the IOPub thread; tests/test_kernel.py::test_ipykernel_internals_polycell_relies_on
    fails if it moves. ``IOPubThread.schedule`` is public.
    """

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)

    def send_multipart(self, *args: Any, **kwargs: Any) -> None:
        held: list[tuple[Any, Any]] | None = getattr(self._local, "held", None)
        if held is None:
            self._socket.send_multipart(*args, **kwargs)
        else:
            held.append((args, kwargs))

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold what this thread sends, and hand it to the IOPub thread at once at the end."""
        if getattr(self._local, "held", None) is not None:
            yield  # already held, by an outer `held`
            return
        self._local.held = []
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Hand over what this thread holds now, and hold no more (before a wait for the IOPub thread:
        a stream's flush, whose messages must come after these)."""
        held: list[tuple[Any, Any]] | None = getattr(self._local, "held", None)
        self._local.held = None
        if held:
            io_thread = self._socket.io_thread
            io_thread.schedule(lambda: _send_all(io_thread, held))


def _send_all(io_thread: Any, messages: list[tuple[Any, Any]]) -> None:
    for args, kwargs in messages:
        io_thread._really_send(*args, **kwargs)
