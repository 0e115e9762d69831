"""The publisher batches: a display updated several times in one batch is sent once, in its last state."""

from __future__ import annotations

import copy

from polycell.iopub import IOPubPublisher, _coalesce_display_updates


def _display(msg_type: str, display_id: str, text: str) -> dict:
    return {
        "msg_type": msg_type,
        "content": {"data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": display_id}},
    }


CELL_A, CELL_B = {"msg_id": "a"}, {"msg_id": "b"}
STREAM = {"msg_type": "stream", "content": {"name": "stdout", "text": "x\n"}}


def test_updates_of_one_display_in_a_batch_go_out_once_in_their_last_state():
    items = [
        (1, CELL_A, _display("display_data", "h", "pending"), None, 0),
        (1, CELL_A, _display("update_display_data", "h", "running"), None, 1),
        (1, CELL_A, STREAM, None, 2),
        (1, CELL_A, _display("update_display_data", "h", "done"), None, 9),
    ]
    before = copy.deepcopy(items)
    out = _coalesce_display_updates(items)
    assert [(item[2]["msg_type"], item[2]["content"].get("data")) for item in out] == [
        ("display_data", {"text/plain": "pending"}),
        ("update_display_data", {"text/plain": "done"}),
        ("stream", None),
    ]
    assert out[1][2]["content"]["transient"] == {"display_id": "h"}
    # At the last update's journal position: a page that replayed up to it already has its data.
    assert [item[4] for item in out] == [0, 9, 2]
    assert items == before  # journal records are shared: never changed in place


def test_displays_other_cells_and_end_markers_are_left_alone():
    end = (1, CELL_A, None, lambda: None, None)
    items = [
        (1, CELL_A, _display("display_data", "h", "a"), None, None),
        (1, CELL_A, _display("display_data", "h", "b"), None, None),  # dh.display() twice
        (2, CELL_A, _display("update_display_data", "other", "x"), None, None),
        end,
        (1, CELL_A, _display("update_display_data", "h", "c"), None, None),  # refreshes both: kept
        (1, CELL_B, _display("update_display_data", "h", "d"), None, None),  # another cell's: kept
    ]
    out = _coalesce_display_updates(items)
    assert out == items


class _RecordingSession:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, dict]] = []

    def send(self, _socket, msg_type, content, parent=None, metadata=None, ident=None):
        self.sent.append((msg_type, content, metadata["polycell"]))


def test_a_message_says_where_its_text_starts_even_when_an_update_between_was_folded_away():
    """Only runs that follow each other in the journal become one message (see polycell.journal)."""
    session = _RecordingSession()
    publisher = IOPubPublisher(session, None)
    try:
        text = {"msg_type": "stream", "content": {"name": "stdout", "text": "ab"}}
        more = {"msg_type": "stream", "content": {"name": "stdout", "text": "cd"}}
        items = [
            (1, CELL_A, text, None, 0),
            (1, CELL_A, _display("update_display_data", "h", "first"), None, 2),
            (1, CELL_A, more, None, 3),
            (1, CELL_A, _display("update_display_data", "h", "last"), None, 5),
            (1, CELL_A, more, None, 6),
            (1, CELL_A, more, None, 8),
        ]
        publisher._publish_batch(items)
    finally:
        publisher.close()
    assert [(t, c.get("text"), m.get("pos")) for t, c, m in session.sent] == [
        ("stream", "ab", 0),
        ("update_display_data", None, 5),  # the last update's data, at its position
        ("stream", "cd", 3),
        ("stream", "cdcd", 6),  # 6 and 8 follow each other: one message
    ]


def test_batched_iopub_sends_in_order_with_what_is_scheduled_directly_on_the_iopub_thread():
    """A message joins a pending drain only if nothing was scheduled after it: one thread's order holds."""
    import threading

    import zmq
    from ipykernel.iostream import BackgroundSocket, IOPubThread

    from polycell.iopub_batch import BatchingIOPubSocket

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    io_thread = IOPubThread(pub)
    io_thread.start()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        while True:  # until the subscription has reached the PUB socket
            io_thread.send_multipart([b"probe"])
            if sub.poll(100):
                break
        while sub.poll(100):
            sub.recv_multipart()
        batching = BatchingIOPubSocket(BackgroundSocket(io_thread))

        def send(first: int, n: int) -> None:
            for i in range(first, first + n):
                if i % 3 == 0:  # as ipykernel's stream flushes do, past polycell
                    io_thread.send_multipart([b"direct", str(i).encode()])
                elif i % 7 == 0:
                    with batching.held():
                        batching.send_multipart([b"held", str(i).encode()])
                else:
                    batching.send_multipart([b"batched", str(i).encode()])

        other = threading.Thread(target=send, args=(1000, 300))
        other.start()
        send(0, 300)
        other.join(10)
        received: dict[bool, list[int]] = {True: [], False: []}
        while len(received[True]) + len(received[False]) < 600:
            assert sub.poll(10_000), "a message was not sent"
            number = int(sub.recv_multipart()[1])
            received[number >= 1000].append(number)
        assert received[False] == list(range(300))
        assert received[True] == list(range(1000, 1300))
    finally:
        io_thread.stop()
        io_thread.close()
        sub.close(linger=0)
        ctx.term()


def test_a_message_with_nothing_queued_ahead_is_sent_by_its_own_thread_and_one_behind_waits():
    """No wake-up of the IOPub thread when nothing waits for it; never ahead of what does."""
    import threading

    import zmq
    from ipykernel.iostream import BackgroundSocket, IOPubThread

    from polycell.iopub_batch import BatchingIOPubSocket

    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)  # as the kernel's: its subscriptions are read by a stream
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    io_thread = IOPubThread(xpub)
    io_thread.start()
    sub = ctx.socket(zmq.SUB)
    try:
        batching = BatchingIOPubSocket(BackgroundSocket(io_thread))
        assert batching._shared.wait_shared(10)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        while True:  # until the subscription, read under the shared lock, has reached the socket
            batching.send_multipart([b"probe"])
            if sub.poll(100):
                break
        while sub.poll(100):
            sub.recv_multipart()
        drained = threading.Event()  # a probe that found the socket busy was queued: now it has run
        io_thread.schedule(drained.set)
        assert drained.wait(10)

        hold, holding = threading.Event(), threading.Event()
        io_thread.io_loop.add_callback(lambda: (holding.set(), hold.wait(10)))
        assert holding.wait(10)
        batching.send_multipart([b"sent while the IOPub thread is held"])
        assert sub.poll(10_000), "nothing queued ahead: the sending thread sends"
        assert sub.recv_multipart() == [b"sent while the IOPub thread is held"]

        io_thread.send_multipart([b"queued"])  # as ipykernel's streams schedule their output
        batching.send_multipart([b"behind it"])  # waits for the held thread: received in this order
        hold.set()
        for expected in (b"queued", b"behind it"):
            assert sub.poll(10_000)
            assert sub.recv_multipart() == [expected]

        io_thread.stop()  # its loop closes the socket as the thread ends: no thread sends on it after
        assert xpub.closed and not batching._shared.shared
        batching.send_multipart([b"after the end"])  # queued, as ipykernel does once its thread is gone
    finally:
        io_thread.stop()
        io_thread.close()
        sub.close(linger=0)
        ctx.term()


class _IOThreadStandIn:
    """What `PatientIOPubSocket` uses of ipykernel's IOPub thread, run on the test's own thread."""

    def __init__(self, socket: object) -> None:
        self.socket = socket
        self.later: list[tuple[float, object, tuple]] = []
        self.io_loop = self

    def schedule(self, f) -> None:
        f()

    def add_callback(self, f, *args) -> None:
        f(*args)

    def call_later(self, delay: float, f, *args) -> None:
        self.later.append((delay, f, args))


def test_iopub_waits_for_a_client_that_falls_behind_then_drops_for_one_that_reads_nothing(monkeypatch):
    """Backpressure, bounded: no message lost while a client reads; a client that stops reading
    holds a send back `CLIENT_WAIT_SECONDS`, then is dropped for (`LOSSY_SECONDS`), then waited for again."""
    import threading
    import time

    import zmq

    from polycell import iopub

    monkeypatch.setattr(iopub, "CLIENT_WAIT_SECONDS", 0.2)
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
    pub.sndhwm = sub.rcvhwm = 10
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        assert pub.poll(10_000) and pub.recv() == b"\x01"  # the subscription has arrived
        io_thread = _IOThreadStandIn(pub)
        patient = iopub.keep_every_message(io_thread)
        assert patient is not None and io_thread.socket is patient
        assert iopub.keep_every_message(io_thread) is patient  # once

        # A client that reads, however slowly: every message, in order. (Large messages,
        # so that the network buffers fill too, and the sender waits for the reader.)
        payload = b"x" * 65_536
        received: list[bytes] = []

        def read(n: int) -> None:
            while len(received) < n and sub.poll(10_000):
                received.append(sub.recv()[:8])
                time.sleep(0.0005)

        reader = threading.Thread(target=read, args=(2_000,))
        reader.start()
        for i in range(2_000):
            patient.send_multipart([b"%08d" % i + payload])
        reader.join(60)
        assert received == [b"%08d" % i for i in range(2_000)]
        assert io_thread.later == []

        def send_until_given_up() -> None:
            for _ in range(10_000):
                patient.send_multipart([payload])
                if io_thread.later:
                    break
            for _ in range(100):  # and from then on, without waiting
                patient.send_multipart([payload])

        # A client that reads nothing: one send waits, then what it cannot take is dropped.
        send_until_given_up()
        assert [delay for delay, _, _ in io_thread.later] == [iopub.LOSSY_SECONDS]

        # After LOSSY_SECONDS the socket waits for it again.
        while sub.poll(100):
            sub.recv()
        _, wait_again, args = io_thread.later.pop()
        wait_again(*args)
        send_until_given_up()
        assert len(io_thread.later) == 1  # it waited, and gave up, once more
    finally:
        sub.close(0)
        pub.close(0)
        ctx.term()
