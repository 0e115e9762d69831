"""1,000 task jobs and 200 thread jobs at once, in a real polycell kernel: all finish, none lost.

1,000 ``%%bg --mode task`` cells (``await asyncio.sleep(0.5)``) and 200 ``%%bg``
thread cells (``time.sleep(0.5)``) are sent back to back, as a front end would
send them. Each prints its own number when it wakes. Bar: every job ends
``done``, and every cell shows exactly its own line (no output lost, none in
the wrong cell). The figure is the wall time from the first request to the
last job's end; run one after another they would take 600 s.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from harness import KernelSession, Row, print_rows

BENCH = "1,000 task + 200 thread jobs"
TASKS, THREADS, SLEEP = 1000, 200, 0.5
POLYCELL_KERNEL = [sys.executable, "-m", "polycell.kernelapp", "-f", "{connection_file}"]


def _cells() -> list[tuple[int, str]]:
    task = "%%bg --mode task\nawait asyncio.sleep({sleep})\nprint({n})"
    thread = "%%bg\ntime.sleep({sleep})\nprint({n})"
    cells = [(n, task.format(sleep=SLEEP, n=n)) for n in range(TASKS)]
    cells += [(n, thread.format(sleep=SLEEP, n=n)) for n in range(TASKS, TASKS + THREADS)]
    return cells


def run() -> list[Row]:
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run("import asyncio, time")
        cells = _cells()
        t0 = time.perf_counter()
        sent = {session.execute(code): n for n, code in cells}
        deadline = time.monotonic() + 300
        while session.eval("(len(jobs), len(jobs.running()))") != (len(cells), 0):
            if time.monotonic() > deadline:
                raise RuntimeError("the jobs did not all end within 300 s")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        statuses = session.eval("sorted({j.status.value for j in jobs})")
        session.run("1")  # every job's output was published before this cell's idle
        text: dict[str, str] = defaultdict(str)
        with session._cond:
            for msg in session.messages:
                parent = msg["parent_header"].get("msg_id")
                if parent in sent and msg["msg_type"] == "stream":
                    text[parent] += msg["content"]["text"]
        wrong = [msg_id for msg_id, n in sent.items() if text[msg_id] != f"{n}\n"]
    finally:
        session.close()
    ok = statuses == ["done"] and not wrong
    extra = {"jobs": len(cells), "statuses": statuses, "cells with wrong output": len(wrong)}
    return [Row(BENCH, "polycell kernel", elapsed, "s", "all done, every line in its cell", ok, extra)]


if __name__ == "__main__":
    print_rows(run())
