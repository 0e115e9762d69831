"""The kernel's interrupt belongs to the main thread, and only to it.

ipykernel interrupts a cell with ``killpg(SIGINT)``, a signal sent to the
process, not to a thread. Python runs signal handlers only in the main
thread, but Linux lets *any* thread that does not block the signal take it off
the queue: it wakes the main thread first, yet a thread that changes its
signal mask in the meantime takes the signal itself (glibc does that for every
``pthread_create``, ``fork`` and ``posix_spawn``). The main thread, asleep in
``time.sleep(30)`` or a blocking read, is then never woken, and the ■ button
seems to do nothing until the call returns by itself. We saw it happen under
load, with jobs starting threads and processes while the user pressed ■.

So every thread but the main one keeps SIGINT blocked:

* each of polycell's own threads (job threads, event loops, the publisher,
  the forker and the rest) is a `BackgroundThread`;
* the polycell kernel blocks SIGINT in its main thread while ipykernel starts
  its threads, which inherit the mask, and unblocks it there once the event
  loop runs (`polycell.kernelapp`).

With ``%load_ext polycell`` in a stock ipykernel, ipykernel's own threads were
started before polycell and take SIGINT like any thread. There `InterruptWaker`
makes up for it: the C-level handler of a Python-handled signal writes its
number to the interpreter's wakeup fd whichever thread took it, so a polycell
thread reading that fd sees every SIGINT and sends the main thread a signal of
its own whose handler does nothing. Its only effect is to interrupt the call
the main thread is blocked in (``clock_nanosleep``, ``select``...): Python then
runs the pending SIGINT handler there, and the ■ takes effect. When the main
thread took the SIGINT itself, the extra signal wakes nothing that matters.

A program started from a job's thread (``!cmd``, ``subprocess``) inherits
that mask as it inherits every signal mask, so the kernel's interrupt does not
reach it either: the interrupt is the foreground's. Forked children of the
kernel (process jobs, ``jobs.map`` workers) start from a fresh SIGINT state
(`reset_interrupts_in_child`). Threads a user starts from a foreground cell
inherit the main thread's mask, as in a stock kernel.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "BackgroundThread",
    "InterruptWaker",
    "ctrl_c_deferred",
    "interrupts_blocked",
    "reset_interrupts_in_child",
]

_CAN_MASK = hasattr(signal, "pthread_sigmask")
#: The signal that wakes the main thread: a Linux real-time signal, used by nothing in Jupyter.
WAKE_SIGNAL: int | None = signal.SIGRTMIN + 7 if hasattr(signal, "SIGRTMIN") else None


@contextlib.contextmanager
def interrupts_blocked() -> Iterator[None]:
    """Block SIGINT in the calling thread (and so in the threads it starts) for the body."""
    if not _CAN_MASK:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """In the main thread, hold Ctrl-C back for the body, then deliver it.

    Blocking SIGINT in the main thread is not enough: the OS hands the signal
    to any thread that does not block it (a library's), and Python then raises
    KeyboardInterrupt in the main thread at its next instruction, in the middle
    of the body. So the handler itself is swapped for one that only notes it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived and callable(previous):
            previous(signal.SIGINT, None)
        elif arrived and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class BackgroundThread(threading.Thread):
    """A thread that never takes the kernel's interrupt (SIGINT is blocked in it from birth).

    The mask is set around ``start`` rather than in ``run``, so there is no
    instant at which the new thread can take the signal; a SIGINT arriving
    during that instant stays pending for the creating thread.
    """

    def start(self) -> None:
        with interrupts_blocked():
            super().start()


def _woken(signum: int, frame: Any) -> None:
    """The wake signal's handler: nothing to do, the interrupted call was the point."""


class InterruptWaker:
    """Wakes the main thread when another thread took its SIGINT (see the module's docstring)."""

    def __init__(self) -> None:
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._thread: BackgroundThread | None = None
        self._previous_handler: Any = None

    def install(self) -> bool:
        """Start waking; from the main thread. False where it cannot (no real-time signals,
        or the wakeup fd already serves someone else, such as an asyncio loop's signal handlers)."""
        if WAKE_SIGNAL is None or threading.current_thread() is not threading.main_thread():
            return False
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()
            return False
        self._sockets = (reader, writer)
        self._previous_handler = signal.signal(WAKE_SIGNAL, _woken)
        main = threading.main_thread().ident
        self._thread = BackgroundThread(
            target=self._forward, args=(reader, main), name="polycell-interrupt-waker", daemon=True
        )
        self._thread.start()
        return True

    @staticmethod
    def _forward(reader: socket.socket, main: int | None) -> None:
        while True:
            try:
                data = reader.recv(256)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data and main is not None and WAKE_SIGNAL is not None:
                with contextlib.suppress(OSError):
                    signal.pthread_kill(main, WAKE_SIGNAL)

    def uninstall(self) -> None:
        """Stop waking; from the main thread. The wakeup fd is left alone if someone replaced ours."""
        if self._sockets is None or threading.current_thread() is not threading.main_thread():
            return  # elsewhere (a shutdown from another thread) it stays: the fd must stay valid
        reader, writer = self._sockets
        self._sockets = None
        current = signal.set_wakeup_fd(-1)
        if current != writer.fileno():
            signal.set_wakeup_fd(current)
        if WAKE_SIGNAL is not None:
            signal.signal(WAKE_SIGNAL, self._previous_handler or signal.SIG_DFL)
        writer.close()
        reader.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        reader.close()


def reset_interrupts_in_child() -> None:
    """In a forked child: drop a SIGINT meant for the kernel, then take SIGINT as Python does.

    The child was forked by a `BackgroundThread` (SIGINT blocked), and until it
    left the kernel's process group a ■ press could reach it. Ignoring the
    signal discards one pending; the child then gets a plain Python program's
    ``KeyboardInterrupt`` on SIGINT, whatever the kernel had at the fork.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ValueError):  # the kernel's waker (its reader is not in the child)
        signal.set_wakeup_fd(-1)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
