"""1,000 task jobs and 200 thread jobs at once, in a real kernel: all finish, none lost.

1,000 async cells (``await asyncio.sleep(0.5)``) and 200 blocking cells
(``time.sleep(0.5)``) are sent back to back, as JupyterLab sends them (each
request carries its cell's id), each printing its own number when it wakes:

* polycell kernel: ``%%bg --mode task`` and ``%%bg`` (thread) cells; a cell is
  done when the client has its job handle's update saying the job ended (sent
  after the job's last output);
* async-kernel, the peer: its ``# task`` and ``# thread`` first-line
  conventions; a cell is done when its reply has come.

Bar (polycell): every job ends ``done`` and every cell shows exactly its own
line (no output lost, none in the wrong cell). The figure is the wall time
from the first request to the last cell done; one after another they would
take 600 s. The two kernels take turns, 3 times each, and the row shows the
turn whose polycell/async-kernel ratio is the median: this machine's speed
drifts from one minute to the next, and a pair run back to back sees the same.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from harness import POLYCELL_KERNEL, KernelSession, Row, print_rows, wait_for_ended_handles
from polycell.headless import is_end_line

BENCH = "1,000 task + 200 thread cells"
TASKS, THREADS, SLEEP = 1000, 200, 0.5
ASYNC_KERNEL = [sys.executable, "-m", "async_kernel", "start", "--connection_file={connection_file}"]


def _cells(task_head: str, thread_head: str) -> list[tuple[int, str]]:
    cells = [(n, f"{task_head}\nawait asyncio.sleep({SLEEP})\nprint({n})") for n in range(TASKS)]
    cells += [(n, f"{thread_head}\ntime.sleep({SLEEP})\nprint({n})") for n in range(TASKS, TASKS + THREADS)]
    return cells


def _wrong_cells(session: KernelSession, sent: dict[str, int]) -> int:
    """How many cells do not show exactly their own line.

    Not counted: a terminal's end line, which the cell ids sent here rule out anyway.
    """
    text: dict[str, str] = defaultdict(str)
    with session._cond:
        for msg in session.messages:
            parent = msg["parent_header"].get("msg_id")
            if parent in sent and msg["msg_type"] == "stream" and not is_end_line(msg):
                text[parent] += msg["content"]["text"]
    return sum(text[msg_id] != f"{n}\n" for msg_id, n in sent.items())


def _iopub_messages_per_cell(session: KernelSession, sent: dict[str, int]) -> float:
    """How many iopub messages each cell cost: the kernel sends each, and the client reads each."""
    with session._cond:
        count = sum(msg["parent_header"].get("msg_id") in sent for msg in session.messages)
    return round(count / len(sent), 2)


def _polycell() -> Row:
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run("import asyncio, time")
        cells = _cells("%%bg --mode task", "%%bg")
        t0 = time.perf_counter()
        sent = {session.execute_in_cell(code, f"cell-{n}"): n for n, code in cells}
        wait_for_ended_handles(session, sent, timeout=300)
        elapsed = time.perf_counter() - t0
        statuses = session.eval("sorted({j.status.value for j in jobs})")
        wrong = _wrong_cells(session, sent)
        per_cell = _iopub_messages_per_cell(session, sent)
    finally:
        session.close()
    ok = statuses == ["done"] and not wrong
    extra = {"jobs": len(cells), "statuses": statuses, "cells with wrong output": wrong}
    extra["iopub messages per cell"] = per_cell
    return Row(BENCH, "polycell kernel %%bg", elapsed, "s", "all done, each line in its cell", ok, extra)


def _async_kernel() -> Row:
    session = KernelSession(ASYNC_KERNEL, load_ext=False)
    try:
        session.run("import asyncio, time")
        cells = _cells("# task", "# thread")
        t0 = time.perf_counter()
        sent = {session.execute_in_cell(code, f"cell-{n}"): n for n, code in cells}
        errors = sum(session.reply(msg_id, timeout=300)["content"]["status"] != "ok" for msg_id in sent)
        elapsed = time.perf_counter() - t0
        session.run("1")
        wrong = _wrong_cells(session, sent)
        per_cell = _iopub_messages_per_cell(session, sent)
    finally:
        session.close()
    extra = {"cells": len(cells), "error replies": errors, "cells with wrong output": wrong}
    extra["iopub messages per cell"] = per_cell
    return Row(BENCH, "async-kernel # task / # thread", elapsed, "s", extra=extra)


def run(rounds: int = 3) -> list[Row]:
    pairs = [(_polycell(), _async_kernel()) for _ in range(rounds)]
    ratios = [polycell.value / peer.value for polycell, peer in pairs]
    polycell, peer = pairs[sorted(range(rounds), key=ratios.__getitem__)[rounds // 2]]
    polycell.ok = all(row.ok for row, _ in pairs)  # every round: all done, every line in its cell
    polycell.extra["ratios to async-kernel, by round"] = [round(r, 2) for r in ratios]
    return [polycell, peer]


if __name__ == "__main__":
    print_rows(run())
