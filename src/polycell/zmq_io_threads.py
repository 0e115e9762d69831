"""Short time slices for libzmq's I/O threads, so that a message leaves while the kernel still works.

The polycell kernel's main thread sends its own iopub messages and replies
(`polycell.shared_socket`), and then goes on running the cell. ZeroMQ hands a
sent message to an I/O thread of its own, which writes it to the client's TCP
connection. Measured on 2 vCPUs, a kernel was in one of two states for its
whole life: its busy status reached the client 0.3 ms after it was made, or
1.2–1.8 ms (once the main thread had finished the cell), and a trivial cell's
round trip went from 2.5 ms to 3.3 ms. Linux (6.6 and later, its EEVDF
scheduler) can wake that thread on the CPU where the main thread runs, and
lets the running thread finish its time slice before a thread it woke may take
the CPU; yielding the CPU after each send removed the delay too, which bears
that out.

Since Linux 6.12 a thread may ask for a shorter slice (``sched_setattr``'s
``sched_runtime``, no privilege needed), and a woken thread with a shorter
slice than the running one takes the CPU at once. The I/O threads run for a
few microseconds per message, so they ask for the shortest, 0.1 ms: every
kernel then delivers in 0.3 ms. Their nice value and policy stay as they
were; their share of the CPU does not change, only when they get it.

Python has no ``sched_setattr``, so it is called through ctypes with the
system call's number for the machine. Where that number is not known, the
system is not Linux, or Linux refuses the call, nothing changes; and a Linux
before 6.12 has no such slices to give.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["IO_THREAD_SLICE_NS", "io_thread_ids", "shorten_io_thread_slices", "time_slice"]

#: The shortest slice Linux accepts for a normal thread.
IO_THREAD_SLICE_NS = 100_000

_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "ppc64le": 355, "s390x": 345}
_SCHED_GETATTR = {"x86_64": 315, "aarch64": 275, "riscv64": 275, "ppc64le": 356, "s390x": 346}


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` as of its first version (48 bytes), which every later kernel accepts."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def _syscall(table: dict[str, int]) -> tuple[ctypes.CDLL, int] | None:
    number = table.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        return None
    return ctypes.CDLL(None, use_errno=True), number


def io_thread_ids(pid: int | str = "self") -> list[int]:
    """The thread ids of libzmq's I/O threads in process `pid` (libzmq names them ``ZMQbg/IO/<n>``)."""
    ids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "comm").read_text().startswith("ZMQbg/IO/"):
                ids.append(int(task.name))
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(ids)


def time_slice(thread_id: int) -> int | None:
    """Thread `thread_id`'s time slice in ns (Linux's default unless it asked for one); None if unknown."""
    call = _syscall(_SCHED_GETATTR)
    if call is None:
        return None
    libc, number = call
    attr = _SchedAttr()
    if libc.syscall(number, thread_id, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return int(attr.sched_runtime)


def shorten_io_thread_slices(thread_ids: Iterable[int] | None = None) -> list[int]:
    """Give libzmq's I/O threads (this process's, or `thread_ids`) the shortest time slice.

    Returns the ids Linux took the call for. Only threads under the normal policy: one a
    user put under another (``chrt``) keeps it.
    """
    call = _syscall(_SCHED_SETATTR)
    if call is None:
        return []
    libc, number = call
    changed = []
    for thread_id in io_thread_ids() if thread_ids is None else thread_ids:
        try:
            if os.sched_getscheduler(thread_id) != os.SCHED_OTHER:
                continue
            attr = _SchedAttr(
                size=ctypes.sizeof(_SchedAttr),
                sched_policy=os.SCHED_OTHER,
                sched_nice=os.getpriority(os.PRIO_PROCESS, thread_id),
                sched_runtime=IO_THREAD_SLICE_NS,
            )
        except OSError:  # the thread ended meanwhile
            continue
        if libc.syscall(number, thread_id, ctypes.byref(attr), 0) == 0:
            changed.append(thread_id)
    return changed
