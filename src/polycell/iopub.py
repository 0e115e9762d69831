"""Sending a job's journal to Jupyter clients, as iopub messages of the right cell.

Each follower of a job's journal is a (job, parent header) pair: the cell that
started the job, and every cell that ran ``%job show N`` later. Records are
queued here by the writing thread and sent by one publisher thread, which
merges consecutive stream text for the same cell, so a job printing in a tight
loop produces a message per batch (at most one batch per 10 ms) rather than
one per line, in order.

Every message carries ``metadata.polycell.job = N`` so front ends and tools can
tell whose output it is, and a message from the journal carries ``pos``, the
journal position of its first unit (`polycell.journal`): a front end that
replayed the journal up to some position keeps only what lies beyond it. A
record may add to that metadata (its ``"polycell"`` key): the job's handle
adds ``handle: true`` and the job's ``status``, so a client that ignores
display updates (a terminal, a headless runner) still learns how a job ended,
from the message the front end already gets.

Every iopub send of the kernel, this publisher's and ipykernel's alike, goes
through `PatientIOPubSocket`, which waits a while for a client that falls
behind rather than let ZeroMQ drop what it cannot take.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from polycell.interrupts import BackgroundThread
from polycell.job import Job
from polycell.journal import Record, StreamRun, Subscription
from polycell.stream_text import StreamText

__all__ = ["IOPubPublisher", "PatientIOPubSocket", "keep_every_message"]

_STOP = object()
#: The shortest time between two batches of messages (ipykernel's own streams flush every 0.2 s).
_BATCH_SECONDS = 0.01


class IOPubPublisher:
    """Publishes job output on a kernel's iopub socket from a thread of its own."""

    def __init__(self, session: Any, socket: Any) -> None:
        self.session = session
        self.socket = socket
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = BackgroundThread(target=self._serve, name="polycell-iopub", daemon=True)
        self._thread.start()
        self._cancels: dict[int, Callable[[], None]] = {}

    # -- public ----------------------------------------------------------------------

    def follow(
        self, job: Job, parent: dict[str, Any], *, replay: bool, on_end: Callable[[], None] | None = None
    ) -> Subscription:
        """Send job's output to the cell of `parent`: what it has so far if `replay`, then live.

        `on_end` runs in the publisher thread after the job's last record was sent.
        """

        def enqueue(record: Record | StreamRun | None, position: int | None) -> None:
            if record is None:
                self._cancels.pop(id(enqueue), None)
            self._queue.put((job.id, parent, record, on_end if record is None else None, position))

        # The snapshot is queued under the journal's lock, so a record the job
        # writes meanwhile cannot overtake it: replayed, then live, in order.
        sub = job.journal.follow(enqueue, replay=replay)
        if sub.ended:
            if on_end is not None:
                self._queue.put((job.id, parent, None, on_end, None))
        else:
            self._cancels[id(enqueue)] = sub.cancel  # until the job ends; not its snapshot
        return sub

    def send(self, job_id: int, parent: dict[str, Any], record: Record) -> None:
        """Queue one record for a cell, in order with the job's journal output.

        From this publisher's thread (an `on_end`), it is sent at once: in order,
        and before a `flush` queued meanwhile says all is sent.
        """
        if threading.current_thread() is self._thread:
            self.send_now(job_id, parent, record)
        else:
            self._queue.put((job_id, parent, record, None, None))

    def send_now(self, job_id: int, parent: dict[str, Any], record: Record) -> None:
        """Send one record from the calling thread, ahead of what is queued.

        Only for a record nothing queued may precede: the first message of a
        cell that follows a job (its handle), sent before the cell's reply
        without waiting for this publisher's thread. The iopub socket takes
        messages from any thread (ipykernel's sends them on from its own). A
        socket holding this thread's messages (`polycell.iopub_batch`) hands
        them over now: the job, started next, may print at once, and its
        output, sent from this publisher's thread, must come after its handle.
        """
        self._send(job_id, parent, record["msg_type"], record["content"], record.get("polycell"))
        release = getattr(self.socket, "release", None)
        if release is not None:
            release()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has been handed to the socket."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        for cancel in list(self._cancels.values()):
            cancel()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the publisher thread ------------------------------------------------------------

    def _serve(self) -> None:
        sent_at = 0.0
        while True:
            items = [self._queue.get()]
            # Output after a quiet spell goes at once; a flood goes in batches, one per
            # `_BATCH_SECONDS`, each taking all its runs of text at once: the job's thread
            # runs instead of handing the GIL to this one for every few lines.
            wait = sent_at + _BATCH_SECONDS - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sent_at = time.monotonic()
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if self._publish_batch(items):
                    return
            except Exception as exc:  # noqa: BLE001 - this thread must outlive one bad item
                print(f"polycell: job output could not be sent: {exc!r}", file=sys.__stderr__)

    def _publish_batch(self, items: list[Any]) -> bool:
        """Send a batch; True when the publisher was asked to stop."""
        items = _coalesce_display_updates([_taken(item) for item in items])
        # Consecutive text of one job's stream for one request becomes one message,
        # which starts at the journal position of its first run: so only runs that
        # follow each other in the journal are joined (an update folded away by
        # `_coalesce_display_updates` leaves a gap; a note of drops has no position).
        text = StreamText(
            lambda key, tag, joined: self._send(
                key[0], tag[0], "stream", {"name": key[2], "text": joined}, _position_mark(tag[1])
            )
        )
        text_ends_at: int | None = None
        for item in items:
            if item is _STOP:
                text.flush()
                return True
            if isinstance(item, threading.Event):
                text.flush()
                item.set()
                continue
            job_id, parent, record, on_end, position = item
            if record is None:
                text.flush()
                if on_end is not None:
                    try:
                        on_end()
                    except Exception as exc:  # noqa: BLE001 - the rest of the batch still goes out
                        print(f"polycell: job {job_id} end update failed: {exc!r}", file=sys.__stderr__)
                continue
            if record["msg_type"] == "stream" and "polycell" not in record:  # marked lines stay whole
                key = (job_id, parent.get("msg_id", ""), record["content"]["name"])
                if position is None or position != text_ends_at:
                    text.flush()
                text.add(key, record["content"]["text"], (parent, position))
                text_ends_at = None if position is None else position + len(record["content"]["text"])
            else:
                text.flush()
                extra = {**record.get("polycell", {}), **_position_mark(position)}
                self._send(job_id, parent, record["msg_type"], record["content"], extra)
        text.flush()
        return False

    def _send(
        self,
        job_id: int,
        parent: dict[str, Any],
        msg_type: str,
        content: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        topic = f"stream.{content['name']}" if msg_type == "stream" else msg_type
        try:
            self.session.send(
                self.socket,
                msg_type,
                content,
                parent=parent,
                metadata={"polycell": {"job": job_id, **(extra or {})}},
                ident=topic.encode(),
            )
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop all output
            print(f"polycell: could not send job {job_id} output: {exc}", file=sys.__stderr__)


#: How long a send waits for a client that reads nothing before its messages are dropped.
CLIENT_WAIT_SECONDS = 5.0
#: After a client made a send wait that long: how long messages are dropped for it, as ZeroMQ would.
LOSSY_SECONDS = 60.0


class PatientIOPubSocket:
    """The kernel's iopub socket, waiting for a client that falls behind instead of dropping.

    ZeroMQ's XPUB socket, ipykernel's iopub, drops a message for a subscriber whose
    queue is full (1,000 messages) and reports it sent: a client that falls behind
    for a moment (a busy Jupyter server, a loaded machine) misses output, with no
    sign, while a burst of it goes out (20,000 ``display`` calls, a flood of
    ``%%bg`` cells). With ``XPUB_NODROP`` a send waits for that client instead, and
    the output arrives late but whole.

    Only for a while: a client that reads nothing at all (a script that waits for
    its replies and never reads iopub) would otherwise hold the kernel's output, and
    the polycell kernel's main thread, for ever. A send that waited
    `CLIENT_WAIT_SECONDS` drops its message for that client, as ZeroMQ does at once,
    and so do all sends for `LOSSY_SECONDS`; then sends wait again. Other clients get
    every message either way. Every send on the socket goes through here, from the
    thread that may use the socket (the IOPub thread, or one sharing it under
    `polycell.shared_socket`), so the options are changed only there.
    """

    def __init__(self, io_thread: Any) -> None:
        self._io_thread = io_thread
        self.socket = io_thread.socket
        self._waiting = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.socket, name)

    def wait_for_clients(self) -> None:
        """From now on a send waits for a client that falls behind (on the socket's thread)."""
        if self.socket.closed or self.socket.type != zmq.XPUB:
            return
        self.socket.setsockopt(zmq.SNDTIMEO, int(CLIENT_WAIT_SECONDS * 1000))
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._waiting = True

    def send_multipart(self, msg_parts: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.socket.send_multipart(msg_parts, *args, **kwargs)
        except zmq.Again:
            flags = args[0] if args else kwargs.get("flags", 0)
            if not self._waiting or flags & zmq.DONTWAIT:  # a send that asked not to wait
                raise
        # A client read nothing for CLIENT_WAIT_SECONDS: drop for it, as ZeroMQ would have.
        self.socket.setsockopt(zmq.XPUB_NODROP, 0)
        self._waiting = False
        print(
            f"polycell: a client read no output for {CLIENT_WAIT_SECONDS:g} s; for the next "
            f"{LOSSY_SECONDS:g} s, output it cannot take is dropped for it (other clients get it all)",
            file=sys.__stderr__,
        )
        loop = self._io_thread.io_loop  # add_callback: the one thread-safe way onto that loop
        loop.add_callback(loop.call_later, LOSSY_SECONDS, self._io_thread.schedule, self.wait_for_clients)
        return self.socket.send_multipart(msg_parts, *args, **kwargs)


def keep_every_message(io_thread: Any) -> PatientIOPubSocket | None:
    """Have the IOPub thread's socket wait for clients that fall behind (`PatientIOPubSocket`).

    Puts the wrapper in the thread's place (where ipykernel's IOPub thread sends
    from) and has that thread set the socket's options. Kept after ``%unload_ext
    polycell``. None when there is no IOPub thread to do it on.
    """
    socket = getattr(io_thread, "socket", None)
    if socket is None or not hasattr(io_thread, "schedule"):
        return None
    if isinstance(socket, PatientIOPubSocket):
        return socket
    patient = PatientIOPubSocket(io_thread)
    io_thread.socket = patient
    io_thread.schedule(patient.wait_for_clients)
    return patient


def _position_mark(position: int | None) -> dict[str, int]:
    """The ``metadata.polycell`` entry that says where a message starts in its job's journal."""
    return {} if position is None else {"pos": position}


def _taken(item: Any) -> Any:
    """A queued journal item with its run of stream text (`StreamRun`) taken as one record."""
    if isinstance(item, tuple) and isinstance(item[2], StreamRun):
        job_id, parent, run, on_end, position = item
        return (job_id, parent, run.take(), on_end, position)
    return item


def _coalesce_display_updates(items: list[Any]) -> list[Any]:
    """Send only the first of a batch's updates of one display, carrying the last one's data.

    An ``update_display_data`` replaces what every output with that display id
    shows, so when several wait in one batch (a busy kernel; a loop calling
    ``handle.update``) the last says it all. Keyed by display id and cell. A
    ``display_data`` is never changed or dropped, and an update never folds into
    one (the update also refreshes other outputs of that display).
    """
    first_update: dict[tuple[str, str], int] = {}  # (display id, cell) -> index of the update sent
    out: list[Any] = list(items)
    for index, item in enumerate(items):
        if not isinstance(item, tuple) or item[2] is None:
            continue
        _, parent, record, _, _ = item
        if record["msg_type"] != "update_display_data":
            continue
        display_id = (record["content"].get("transient") or {}).get("display_id")
        if display_id is None:
            continue
        key = (display_id, parent.get("msg_id", ""))
        first = first_update.get(key)
        if first is None:
            first_update[key] = index
            continue
        job_id, first_parent, shown, on_end, _ = out[first]
        content = {**shown["content"], "data": record["content"]["data"]}
        content["metadata"] = record["content"].get("metadata", {})
        merged = {"msg_type": shown["msg_type"], "content": content}
        if "polycell" in record:
            merged["polycell"] = record["polycell"]
        # The position of the last: a client that replayed up to the last has its data.
        out[first] = (job_id, first_parent, merged, on_end, item[4])
        out[index] = None
    return [item for item in out if item is not None]
