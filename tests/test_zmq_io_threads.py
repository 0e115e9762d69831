"""libzmq's I/O threads in the polycell kernel ask for short time slices (`polycell.zmq_io_threads`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import zmq

from kernel_session import POLYCELL_KERNEL, KernelSession
from polycell.zmq_io_threads import IO_THREAD_SLICE_NS, io_thread_ids, shorten_io_thread_slices, time_slice

TIMEOUT = 10


@pytest.fixture
def io_thread() -> Iterator[int]:
    """The I/O thread of a ZeroMQ context of this process's own (it starts with the first socket).

    The thread names itself once it runs, a moment after the socket is made: until then it
    has its creator's name.
    """
    before = set(io_thread_ids())
    context = zmq.Context(io_threads=1)
    socket = context.socket(zmq.PUB)
    socket.bind("tcp://127.0.0.1:*")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (new := set(io_thread_ids()) - before):
            assert time.monotonic() < deadline, "no ZMQbg/IO thread: has libzmq renamed its threads?"
            time.sleep(0.001)
        (thread,) = new
        yield thread
    finally:
        socket.close(linger=0)
        context.term()


def _short_slices_here(thread: int) -> None:
    """Skip where Linux has no slices of a thread's asking (before 6.12 it takes the call and ignores it)."""
    if not shorten_io_thread_slices([thread]) or time_slice(thread) != IO_THREAD_SLICE_NS:
        pytest.skip("this system gives no thread a time slice of its asking (Linux 6.12 and later do)")


def test_the_polycell_kernels_io_threads_ask_for_the_shortest_slice(io_thread: int) -> None:
    _short_slices_here(io_thread)
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run("1")
        threads = io_thread_ids(session.pid)
        assert threads, "no ZMQbg/IO thread in the kernel: has libzmq renamed its threads?"
        assert {time_slice(thread) for thread in threads} == {IO_THREAD_SLICE_NS}
        assert time_slice(session.pid) != IO_THREAD_SLICE_NS  # the main thread's is as it was
    finally:
        session.close()


def test_an_io_thread_keeps_its_nice_value_and_a_policy_a_user_gave_it(io_thread: int) -> None:
    os.setpriority(os.PRIO_PROCESS, io_thread, 5)
    _short_slices_here(io_thread)
    assert os.getpriority(os.PRIO_PROCESS, io_thread) == 5

    os.sched_setscheduler(io_thread, os.SCHED_BATCH, os.sched_param(0))
    assert shorten_io_thread_slices([io_thread]) == []
    assert os.sched_getscheduler(io_thread) == os.SCHED_BATCH
