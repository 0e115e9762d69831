"""Where a trivial cell's round trip goes: ``python benchmarks/round_trip_timeline.py [N]``.

Not a row of ``benchmarks/run`` but the breakdown behind one (the README's
"Where the time goes"). For N trivial cells (``1``, default 100) on the polycell
kernel, idle and then while 2 CPU-bound ``%%bg`` thread jobs run, it prints the
median time from sending the request to when the kernel *made* each message
(the date in its header: the main thread's progress) and to when the client
*got* it (the time of delivery). Kernel and client share the machine's clock.
"""

from __future__ import annotations

import statistics
import sys
import time

from harness import POLYCELL_KERNEL, KernelSession, wait_running

KINDS = ("busy", "execute_input", "execute_result", "reply", "idle")
JOBS = 2
SETUP = """
import threading
_timeline_stop = threading.Event()
def _timeline_cpu():
    while not _timeline_stop.is_set():
        sum(range(1000))
"""


def _timeline(session: KernelSession, n: int) -> dict[str, tuple[float, float]]:
    """Per kind of message: median ms from the request's send to its making, and to its arrival."""
    made: dict[str, list[float]] = {kind: [] for kind in KINDS}
    got: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(n):
        wall, mono = time.time(), time.monotonic()
        msg_id = session.execute("1")
        reply = session.reply(msg_id)
        session.wait_idle(msg_id)
        for msg in [*session.messages_of(msg_id), reply]:
            kind = msg["msg_type"]
            if kind == "status":
                kind = msg["content"]["execution_state"]
            elif kind == "execute_reply":
                kind = "reply"
            if kind in made:
                made[kind].append(msg["header"]["date"].timestamp() - wall)
                got[kind].append(msg["_received"] - mono)
    return {kind: (statistics.median(made[kind]) * 1e3, statistics.median(got[kind]) * 1e3) for kind in KINDS}


def _print(title: str, timeline: dict[str, tuple[float, float]]) -> None:
    print(title)
    for kind, (made, got) in timeline.items():
        print(f"  {kind:15s} made {made:6.2f} ms   got {got:6.2f} ms")


def main(n: int) -> None:
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run(SETUP)
        for _ in range(30):
            session.run("1")  # warm up
        _print(f"idle, median of {n}:", _timeline(session, n))
        first = session.eval("len(jobs)") + 1
        for _ in range(JOBS):
            session.run("%%bg --mode thread --name busy\n_timeline_cpu()")
        wait_running(session, range(first, first + JOBS))
        _print(f"while {JOBS} CPU-bound thread jobs run, median of {n}:", _timeline(session, n))
        session.run("_timeline_stop.set()")
        for job_id in range(first, first + JOBS):
            session.wait_job_end(job_id, timeout=60)
    finally:
        session.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
