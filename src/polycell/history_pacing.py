"""IPython's history written between requests, in batches, not while the kernel answers one.

IPython writes each cell's input to SQLite from a thread of its own
(``HistorySavingThread``), which it wakes through the thread's ``save_flag`` as
every cell starts (``HistoryManager.db_cache_size`` is 0 by default). Each
write is a transaction and a commit, and the thread takes the GIL back after
every SQLite call. On a two-core machine that write lands exactly while the
kernel sends the cell's reply and ``idle``, and cells sent back to back (Run
All, a burst of ``%%bg`` cells) each get a write of their own. Traced in a
kernel, it held up the reply of a trivial cell by about a millisecond (README,
"Where the time goes").

`PacedSaveFlag` takes the place of the thread's flag. The thread still wakes
when IPython sets it, but before it writes it waits until no request is being
answered (`answering`), and then `batch_seconds` more, so that inputs arriving
in quick succession share one write. Both waits are bounded: a long cell's
input is in the database within `max_delay` of its start, and a thread being
stopped (at exit, before a fork) does not wait at all. Nothing is written
less: every input reaches the database, with its neighbours, in one transaction.

Written against IPython 9.18, whose ``HistorySavingThread.run`` waits on
``self.save_flag`` afresh on every turn of its loop, and whose ``stop()`` sets
the thread's ``_stop_now`` before it sets the flag; tests/test_history_pacing.py
fails if either moves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = ["PacedSaveFlag", "answering", "paced_history"]

_installing = threading.Lock()


class PacedSaveFlag(threading.Event):
    """A history saving thread's ``save_flag`` whose thread writes between requests, in batches."""

    def __init__(self, thread: threading.Thread, *, batch_seconds: float = 0.05, max_delay: float = 0.25):
        super().__init__()
        self.batch_seconds = batch_seconds
        self.max_delay = max_delay
        self._thread = thread
        self._answering = 0
        #: The thread waits for the requests being answered to end; only then is it woken for it.
        self._awaiting_answers = False
        self._changed = threading.Condition(threading.Lock())

    @contextmanager
    def answering(self) -> Iterator[None]:
        """While this is entered, by any thread, the history thread does not write (up to `max_delay`)."""
        with self._changed:
            self._answering += 1
        try:
            yield
        finally:
            with self._changed:
                self._answering -= 1
                if not self._answering and self._awaiting_answers:
                    self._changed.notify_all()

    def set(self) -> None:
        super().set()
        if self._stopping():
            with self._changed:
                self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """As ``Event.wait``; once set, return only when the thread may write (see the module)."""
        if not super().wait(timeout):
            return False
        now = time.monotonic()
        batched, latest = now + self.batch_seconds, now + self.max_delay
        with self._changed:
            # Woken only when it may write: within the batch, a request that ends wakes nothing
            # (under CPU-bound thread jobs every wake-up is a turn of the GIL taken from the kernel).
            while not self._stopping() and now < latest:
                if now < batched:
                    self._changed.wait(batched - now)
                elif self._answering:
                    self._awaiting_answers = True
                    try:
                        self._changed.wait(latest - now)
                    finally:
                        self._awaiting_answers = False
                else:
                    break
                now = time.monotonic()
        return True

    def _stopping(self) -> bool:
        return bool(getattr(self._thread, "_stop_now", False))


def paced_history(history_manager: Any) -> PacedSaveFlag | None:
    """The save thread's `PacedSaveFlag`, put in place if need be; None without a save thread.

    Asked for per request: IPython stops the thread before a fork (a process job)
    and starts a new one, with a plain flag, when the next input is stored.
    """
    thread = getattr(history_manager, "save_thread", None)
    if thread is None:
        return None
    flag = thread.save_flag
    if isinstance(flag, PacedSaveFlag):
        return flag
    with _installing:  # the main thread and the shell channel thread may both get here first
        flag = thread.save_flag
        if isinstance(flag, PacedSaveFlag):
            return flag
        paced = PacedSaveFlag(thread)
        thread.save_flag = paced
    # The thread waits on the old flag: one more write (of whatever is cached), then it waits on this one.
    flag.set()
    return paced


def answering(history_manager: Any) -> AbstractContextManager[None]:
    """`PacedSaveFlag.answering` for the shell's history thread (nothing to hold without one)."""
    flag = paced_history(history_manager)
    return flag.answering() if flag is not None else nullcontext()
