"""The kernel's iopub socket: messages reach ipykernel's IOPub thread in batches, one wake-up each.

ipykernel sends every iopub message from its IOPub thread: a send from any
other thread queues the message and wakes that thread through a pipe, once per
message. Each wake-up is a ZeroMQ send, in which the sending thread lets go of
the GIL and must then win it back, and a turn of the IOPub thread's event loop.
While CPU-bound thread jobs hold the GIL, each of those hand-offs is what makes
a foreground cell slow: a trivial cell sends four messages (busy,
execute_input, execute_result, idle).

So a message sent here joins the batch of the wake-up last scheduled, as long
as that wake-up has not run and nothing else (an ipykernel stream flush, say)
was scheduled on the IOPub thread after it; only otherwise does it start a new
batch and wake the thread. Order holds for every thread: each batch is sent in
the order it was filled, where its wake-up stands in line.

And when nothing is queued for the IOPub thread at all, as for most of a
foreground cell's messages, there is no wake-up: the thread that made the
message sends it itself, on the socket it shares with the IOPub thread
(`SharedSocket`). The IOPub thread holds that socket while it runs what was
scheduled, so a message sent this way can never overtake one queued before it.

`held` goes further for the ``%%bg`` cells the polycell kernel starts from its
shell channel thread: busy, execute_input and the job's handle are queued
together when the handle is sent (`IOPubPublisher.send_now` releases them),
before the job starts and can print.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from polycell.iopub import keep_every_message
from polycell.shared_socket import SharedSocket

__all__ = ["BatchingIOPubSocket"]

_Message = tuple[tuple[Any, ...], dict[str, Any]]  # send_multipart's arguments


class BatchingIOPubSocket:
    """ipykernel's ``BackgroundSocket``, handing messages to the IOPub thread in batches.

    Reaches into ipykernel 7.4.0's ``IOPubThread``: ``_really_send(msg, *args,
    **kwargs)``, the function ``send_multipart`` schedules for each message;
    ``_events``, the deque of what ``schedule`` (public) has queued for the
    thread; ``_handle_event``, which runs them when ``_event_puller`` (a
    ZMQStream) wakes the thread; and ``_xpub_stream``, which reads the socket's
    subscriptions; tests/test_kernel.py::test_ipykernel_internals_polycell_relies_on
    fails if any of them moves.
    """

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._io_thread = io_thread = socket.io_thread
        self._local = threading.local()
        self._lock = threading.Lock()  # guards `_last` and its batch against the drain taking it
        #: The batch last scheduled, with its drain; more messages join it while the drain is last in line.
        self._last: tuple[Callable[[], None], list[_Message]] | None = None
        subscriptions = getattr(io_thread, "_xpub_stream", None)  # none on a plain PUB socket
        # Sent on here or by the IOPub thread, every message waits for a client that falls behind.
        patient = keep_every_message(io_thread) or io_thread.socket
        self._shared = SharedSocket(patient, io_thread.io_loop, subscriptions)
        if io_thread.thread.is_alive():
            self._shared.share(then=lambda: io_thread._event_puller.on_recv(self._run_scheduled))
            # At the kernel's exit other threads may still send: the IOPub thread's loop closes the
            # socket as the thread ends (through `SharedSocket`), and the kernel app closes it again.
            close = io_thread.close
            io_thread.close = lambda: self._shared.close(close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)

    def send_multipart(self, *args: Any, **kwargs: Any) -> None:
        held: list[_Message] | None = getattr(self._local, "held", None)
        if held is None:
            self._enqueue(((args, kwargs),))
        else:
            held.append((args, kwargs))

    def send(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.send_multipart([msg], *args, **kwargs)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold what this thread sends, and queue it at once at the end."""
        if getattr(self._local, "held", None) is not None:
            yield  # already held, by an outer `held`
            return
        self._local.held = []
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Queue what this thread holds now, and hold no more (before a wait for the IOPub thread:
        a stream's flush, whose messages must come after these)."""
        held: list[_Message] | None = getattr(self._local, "held", None)
        self._local.held = None
        if held:
            self._enqueue(held)

    def _enqueue(self, messages: Iterable[_Message]) -> None:
        if self._shared.shared and not self._io_thread._events:
            # Free means the IOPub thread is not running what was scheduled either: it holds the socket.
            with self._shared.sending_if_free() as free:
                if free is not None and not self._io_thread._events:
                    for args, kwargs in messages:
                        self._shared.send_held(*args, **kwargs)
                    return
        with self._lock:
            if self._last is not None and self._is_last_scheduled(self._last[0]):
                self._last[1].extend(messages)
                return
            batch = list(messages)
            drain = partial(self._send_batch, batch)
            self._last = (drain, batch)
        # Scheduled before this call returns, so before anything this thread does next.
        self._io_thread.schedule(drain)

    def _is_last_scheduled(self, drain: Callable[[], None]) -> bool:
        """Whether `drain` is still to run, with nothing scheduled on the IOPub thread after it."""
        try:
            return self._io_thread._events[-1] is drain
        except IndexError:
            return False

    def _send_batch(self, batch: list[_Message]) -> None:
        """On the IOPub thread: send one batch, in order; later messages go in a new batch."""
        with self._lock:
            if self._last is not None and self._last[1] is batch:
                self._last = None
            messages = list(batch)
            batch.clear()
        for args, kwargs in messages:
            self._io_thread._really_send(*args, **kwargs)

    def _run_scheduled(self, wake_up: list[bytes]) -> None:
        """On the IOPub thread, for each wake-up: run what was scheduled, holding the socket."""
        with self._shared.sending():
            self._io_thread._handle_event(wake_up)
