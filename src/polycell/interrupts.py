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
import threading
from collections.abc import Iterator

__all__ = ["BackgroundThread", "interrupts_blocked", "reset_interrupts_in_child"]

_CAN_MASK = hasattr(signal, "pthread_sigmask")


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


class BackgroundThread(threading.Thread):
    """A thread that never takes the kernel's interrupt (SIGINT is blocked in it from birth).

    The mask is set around ``start`` rather than in ``run``, so there is no
    instant at which the new thread can take the signal; a SIGINT arriving
    during that instant stays pending for the creating thread.
    """

    def start(self) -> None:
        with interrupts_blocked():
            super().start()


def reset_interrupts_in_child() -> None:
    """In a forked child: drop a SIGINT meant for the kernel, then take SIGINT as Python does.

    The child was forked by a `BackgroundThread` (SIGINT blocked), and until it
    left the kernel's process group a ■ press could reach it. Ignoring the
    signal discards one pending; the child then gets a plain Python program's
    ``KeyboardInterrupt`` on SIGINT, whatever the kernel had at the fork.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
