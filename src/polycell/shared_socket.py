"""A kernel socket that any thread may send on, not only the thread ipykernel gave it to.

ipykernel gives each of the kernel's sockets to one thread: the shell channel
thread sends every shell reply, the IOPub thread every iopub message. Another
thread hands its message over, and the message waits until that thread wakes
up and wins the GIL: for a trivial foreground cell, the reply and the status
messages each take such a hand-off, which is most of what separates its round
trip from the floor (README, "Where the time goes").

A ZeroMQ socket may be used by several threads as long as no two use it at once,
with a full memory barrier between them: a lock gives both. `SharedSocket` is
that lock, held by the socket's own thread around everything its ZMQStream does
with the socket, and by any other thread around its send (`sending`).

A send from outside the stream must do one more thing. ZeroMQ tells a stream
that a message came in through a file descriptor that behaves as
edge-triggered: a send on the socket may consume the edge, and the stream
never learns that a request is waiting (ipykernel 7.4 sends even its own
replies through its stream for this reason; see ``_send_on_shell_channel``).
So after sending, `sending` looks whether a message is waiting and if so has
the stream handle it, as the stream itself does after its own sends.

And a send keeps the GIL. pyzmq lets go of it around each frame it hands to
libzmq, for a send that might block; a Jupyter message is six frames or more,
and while CPU-bound job threads run, each time a kernel thread lets go of the
GIL it must then wait for a job to give it back (at least the switch interval).
So `send_held` hands a message of ``bytes`` frames to libzmq's own
``zmq_send`` without waiting (ZMQ_DONTWAIT), called through ctypes without
releasing the GIL, and falls back to pyzmq's send for anything else, or if
libzmq refuses the first frame: then pyzmq's send waits as it always does (the
iopub socket waits a while for a client whose queue is full:
`polycell.iopub.PatientIOPubSocket`).

Reaches into pyzmq 27's ``ZMQStream``: ``_handle_events(fd, events)``, the
handler it registers for its socket with ``add_handler``, and
``_update_handler(state)``, which re-arms it after a send;
tests/test_shared_socket.py::test_pyzmq_internals_shared_socket_relies_on fails
if either moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import zmq

__all__ = ["DirectSender", "SharedSocket"]


def _libzmq_send() -> Any | None:
    """libzmq's ``zmq_send`` (the library pyzmq's extension links to), keeping the GIL; None if absent."""
    try:
        from zmq.backend.cython import _zmq

        send = ctypes.PyDLL(_zmq.__file__, use_errno=True).zmq_send  # PyDLL: the call keeps the GIL
    except (ImportError, OSError, AttributeError):
        return None
    send.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    send.restype = ctypes.c_int
    return send


_zmq_send = _libzmq_send()


class SharedSocket:
    """`socket`, read (if at all) by `stream` on `io_loop`'s thread; any thread may send once `shared`."""

    def __init__(self, socket: zmq.Socket[Any], io_loop: Any, stream: Any | None = None) -> None:
        self.socket = socket
        self._io_loop = io_loop
        self._stream = stream
        #: Held by the socket's thread while its stream (or `then`) uses the socket, and by a sender.
        self.lock = threading.RLock()
        self._shared = threading.Event()
        self._pid = os.getpid()

    @property
    def shared(self) -> bool:
        """Whether other threads may send now (never in a forked child: the socket is the parent's)."""
        return self._shared.is_set() and os.getpid() == self._pid

    def share(self, then: Callable[[], None] | None = None) -> None:
        """From the next turn of the socket's loop on, its stream holds the lock; `then` runs there first.

        Asynchronous, as it must happen on that thread; `wait_shared` waits for it.
        """
        self._io_loop.add_callback(self._take_over, then)

    def wait_shared(self, timeout: float) -> bool:
        return self._shared.wait(timeout)

    @contextmanager
    def sending(self) -> Iterator[zmq.Socket[Any]]:
        """The socket, to this thread alone; on leaving, a message that came in meanwhile is not stranded."""
        with self.lock:
            try:
                yield self.socket
            finally:
                self._rearm()

    @contextmanager
    def sending_if_free(self) -> Iterator[zmq.Socket[Any] | None]:
        """As `sending`, but None at once if another thread has the socket now, or it is no longer shared."""
        if not self.lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self.socket if self.shared else None
        finally:
            try:
                self._rearm()
            finally:
                self.lock.release()

    def send_if_shared(self, frames: list[Any], **kwargs: Any) -> bool:
        """Send from this thread and return True; False, sending nothing, if the socket is not shared."""
        with self.sending():
            if not self.shared:  # stopped sharing while this thread waited for the lock
                return False
            self.send_held(frames, **kwargs)
            return True

    def send_held(self, frames: list[Any], **kwargs: Any) -> None:
        """Send, keeping the GIL when every frame is ``bytes``; the caller is `sending`."""
        if _zmq_send is None or not all(type(frame) is bytes for frame in frames):
            self.socket.send_multipart(frames, **kwargs)
            return
        handle, last = self.socket.underlying, len(frames) - 1
        for n, frame in enumerate(frames):
            flags = zmq.DONTWAIT | (zmq.SNDMORE if n < last else 0)
            while _zmq_send(handle, frame, len(frame), flags) < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    continue
                if n == 0:  # nothing queued: pyzmq's send says what is wrong, or waits as ever
                    self.socket.send_multipart(frames, **kwargs)
                    return
                raise zmq.ZMQError(error)  # past the first frame ZeroMQ takes the rest, or the socket is gone

    def close(self, close_socket: Callable[[], None]) -> None:
        """`close_socket` once no other thread is sending, and share no more: no send meets it closed."""
        with self.lock:
            self._shared.clear()
            close_socket()

    def _take_over(self, then: Callable[[], None] | None) -> None:
        """On the socket's thread: the stream's handler and its re-arming take the lock from now on."""
        with self.lock:
            stream = self._stream
            if stream is not None:
                if stream.closed():
                    return
                for name in ("_handle_events", "_update_handler"):
                    setattr(stream, name, self._locked(getattr(stream, name)))
                # The loop calls the handler it was given, so it gets the locked one; and it
                # closes what it was given when it closes (the IOPub thread's, as it ends).
                self._io_loop.remove_handler(self.socket)
                self._io_loop.add_handler(_Registration(self), stream._handle_events, self._io_loop.READ)
                stream._update_handler(stream._state)  # what came in before is handled, as always
            if then is not None:
                then()
            self._shared.set()

    def _locked(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(method)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return method(*args, **kwargs)

        return locked

    def _rearm(self) -> None:
        """Under the lock, after a send: have the stream read a message its edge may have missed."""
        if self._stream is None or self.socket.closed:
            return
        try:
            waiting = self.socket.get(zmq.EVENTS) & zmq.POLLIN
        except zmq.ZMQError:  # closed by its thread at shutdown
            return
        if waiting:
            self._io_loop.add_callback(self._stream._handle_events, self.socket, 0)


class _Registration:
    """What the socket's loop holds for it: the socket's descriptor, and a close that waits for senders."""

    def __init__(self, shared: SharedSocket) -> None:
        self._shared = shared

    def fileno(self) -> int:
        return int(self._shared.socket.fileno())

    def close(self) -> None:
        self._shared.close(self._shared.socket.close)


class DirectSender:
    """Sends through `shared` once it is shared; until then through `until_shared`, ipykernel's own way."""

    def __init__(self, shared: SharedSocket, until_shared: Any) -> None:
        self._shared = shared
        self._until_shared = until_shared

    def send_multipart(self, frames: list[Any], **kwargs: Any) -> None:
        if not (self._shared.shared and self._shared.send_if_shared(frames, **kwargs)):
            self._until_shared.send_multipart(frames, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._until_shared, name)
