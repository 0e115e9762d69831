"""SharedSocket: a socket its ZMQStream reads on one thread, and any thread sends on."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from tornado.ioloop import IOLoop
from zmq.eventloop.zmqstream import ZMQStream

from polycell.shared_socket import DirectSender, SharedSocket

TIMEOUT = 10


class LoopThread:
    """A tornado loop in a thread of its own, as ipykernel runs its shell channel and IOPub threads."""

    def __init__(self) -> None:
        self.io_loop: Any = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(TIMEOUT)

    def _run(self, started: threading.Event) -> None:
        self.io_loop = IOLoop(make_current=False)
        self.io_loop.add_callback(started.set)
        self.io_loop.start()
        self.io_loop.close()

    def call(self, function: Any, *args: Any) -> Any:
        """`function(*args)` on the loop's thread; its result."""
        done = threading.Event()
        result: list[Any] = []
        self.io_loop.add_callback(lambda: (result.append(function(*args)), done.set()))
        assert done.wait(TIMEOUT)
        return result[0]

    def stop(self) -> None:
        self.io_loop.add_callback(self.io_loop.stop)
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def router() -> Iterator[tuple[LoopThread, ZMQStream, zmq.Socket, list[list[bytes]], threading.Condition]]:
    """A ROUTER read by a ZMQStream on a loop thread (as ipykernel's shell socket), a DEALER client."""
    ctx = zmq.Context()
    loop = LoopThread()
    server = ctx.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{port}")
    received: list[list[bytes]] = []
    arrived = threading.Condition()

    def on_recv(frames: list[bytes]) -> None:
        with arrived:
            received.append(frames)
            arrived.notify_all()

    def make_stream() -> ZMQStream:
        stream = ZMQStream(server, loop.io_loop)
        stream.on_recv(on_recv)
        return stream

    stream = loop.call(make_stream)
    try:
        yield loop, stream, client, received, arrived
    finally:
        loop.call(stream.close)
        loop.stop()
        client.close(linger=0)
        ctx.term()


def _hold_still(holding: threading.Event, hold: threading.Event) -> None:
    """On the loop's thread: keep the loop still until `hold` is set."""
    holding.set()
    hold.wait(TIMEOUT)


def _shared_after_hello(router: Any) -> tuple[SharedSocket, bytes]:
    """The stream's socket, shared, and the identity of the client, which has sent one message."""
    loop, stream, client, received, arrived = router
    shared = SharedSocket(stream.socket, loop.io_loop, stream)
    shared.share()
    assert shared.wait_shared(TIMEOUT)
    client.send_multipart([b"hello"])
    _wait_for(arrived, received, 1)
    return shared, received[0][0]


def _wait_for(arrived: threading.Condition, received: list[Any], count: int) -> None:
    with arrived:
        assert arrived.wait_for(lambda: len(received) >= count, TIMEOUT), f"{len(received)} of {count} came"


def test_a_request_arriving_while_another_thread_sends_is_not_stranded(router):
    """The edge a send consumes is made up for: the stream still reads the request that came meanwhile.

    The loop is held still while the request arrives and the main thread sends;
    that send consumes the socket's read edge. Without the re-arming in
    `SharedSocket.sending`, the stream would never read the request.
    """
    loop, stream, client, received, arrived = router
    shared, identity = _shared_after_hello(router)

    for n in range(20):
        hold, holding = threading.Event(), threading.Event()
        loop.io_loop.add_callback(_hold_still, holding, hold)
        assert holding.wait(TIMEOUT)
        client.send_multipart([b"request %d" % n])
        # The request has reached the server socket once the server reports it readable
        # (read under the lock, as the stream would, which is what consumes the edge).
        with shared.lock:
            while not stream.socket.poll(10):
                pass
        assert shared.send_if_shared([identity, b"reply %d" % n])
        hold.set()
        _wait_for(arrived, received, n + 2)
        assert received[n + 1] == [identity, b"request %d" % n]
        assert client.poll(TIMEOUT * 1000)
        assert client.recv_multipart() == [b"reply %d" % n]


def test_many_threads_send_while_the_stream_reads_and_sends(router):
    """Every message arrives, in each sender's order, whichever thread sent it."""
    loop, stream, client, received, arrived = router
    shared, identity = _shared_after_hello(router)
    per_sender, senders = 300, 4

    def send(name: bytes) -> None:
        for i in range(per_sender):
            if i % 10 == 0:  # the stream's own thread sends too, through the stream
                loop.io_loop.add_callback(stream.send_multipart, [identity, b"stream", b"%d" % i])
            assert shared.send_if_shared([identity, name, b"%d" % i])

    threads = [threading.Thread(target=send, args=(b"t%d" % k,)) for k in range(senders)]
    for thread in threads:
        thread.start()
    for n in range(100):  # requests keep coming meanwhile
        client.send_multipart([b"request %d" % n])
    got: dict[bytes, list[int]] = {}
    expected = senders * per_sender + senders * per_sender // 10
    for _ in range(expected):
        assert client.poll(TIMEOUT * 1000), f"{sum(map(len, got.values()))} of {expected} came"
        name, number = client.recv_multipart()
        got.setdefault(name, []).append(int(number))
    for thread in threads:
        thread.join(TIMEOUT)
    for k in range(senders):
        assert got[b"t%d" % k] == list(range(per_sender))
    _wait_for(arrived, received, 101)
    assert [frames[1] for frames in received[1:]] == [b"request %d" % n for n in range(100)]


def test_a_direct_sender_hands_over_until_the_socket_is_shared(router):
    """Before the loop has taken the lock, ipykernel's own path is used (here, the stream)."""
    loop, stream, client, received, arrived = router
    shared = SharedSocket(stream.socket, loop.io_loop, stream)
    sender = DirectSender(shared, stream)
    assert not shared.shared
    client.send_multipart([b"hello"])
    _wait_for(arrived, received, 1)
    identity = received[0][0]
    loop.call(sender.send_multipart, [identity, b"through the stream"])
    assert client.poll(TIMEOUT * 1000) and client.recv_multipart() == [b"through the stream"]
    shared.share()
    assert shared.wait_shared(TIMEOUT)
    sender.send_multipart([identity, b"directly"])
    assert client.poll(TIMEOUT * 1000) and client.recv_multipart() == [b"directly"]
    assert sender.closed() is False  # anything else is the fallback's


def test_pyzmq_internals_shared_socket_relies_on():
    """Fails when pyzmq moves what `SharedSocket` wraps (written against pyzmq 27.3)."""
    assert zmq.pyzmq_version_info()[0] >= 26, zmq.pyzmq_version()
    assert list(inspect.signature(ZMQStream._handle_events).parameters) == ["self", "fd", "events"]
    assert list(inspect.signature(ZMQStream._update_handler).parameters) == ["self", "state"]
    # The handler the loop calls is the one registered for the socket, read only then.
    assert "add_handler(self.socket, self._handle_events" in inspect.getsource(ZMQStream._init_io_state)
    # After each of its own sends the stream re-arms through _update_handler, as `sending` mirrors.
    assert "self._update_handler(self._state)" in inspect.getsource(ZMQStream._add_io_state)
    assert "self._handle_events(self.socket, 0)" in inspect.getsource(ZMQStream._update_handler)


def test_frames_other_than_bytes_go_through_pyzmq_and_a_closed_socket_is_not_shared(router):
    """Buffers (memoryviews, frames) are pyzmq's to send; `close` waits for senders, then shares no more."""
    client = router[2]
    shared, identity = _shared_after_hello(router)
    assert shared.send_if_shared([identity, memoryview(b"a buffer"), zmq.Frame(b"a frame")])
    assert client.poll(TIMEOUT * 1000) and client.recv_multipart() == [b"a buffer", b"a frame"]

    closed: list[bool] = []
    with shared.sending():  # a send under way: close waits for it
        closer = threading.Thread(target=shared.close, args=(lambda: closed.append(True),))
        closer.start()
        closer.join(0.05)
        assert not closed
    closer.join(TIMEOUT)
    assert closed == [True] and not shared.shared
    assert not shared.send_if_shared([identity, b"after the close"])  # nothing sent on a closed socket
