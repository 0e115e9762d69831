"""8 background cells each sleeping 0.5 s, sent back to back: wall time until all are done.

polycell (``%%bg`` in a stock ipykernel with the extension) against the same
8 cells on stock ipykernel without ``%%bg``, which runs them one after another.
Bar: all done in <= 0.7 s.
"""

from __future__ import annotations

import time

from harness import BG_CELLS, BG_SLEEP, KernelSession, Row, background_sleepers, print_rows, stock_kernel_argv


def _stock_serial(session: KernelSession) -> float:
    session.run("import time")
    t0 = time.perf_counter()
    ids = [session.execute(f"time.sleep({BG_SLEEP})") for _ in range(BG_CELLS)]
    for msg_id in ids:
        session.reply(msg_id, timeout=60)
    return time.perf_counter() - t0


KILL_CASES = {
    "thread, Python loop": "%%bg --mode thread\nstarted.set()\nwhile True:\n    pass",
    "thread, time.sleep": "%%bg --mode thread\nstarted.set()\ntime.sleep(600)",
    "task, asyncio.sleep": "%%bg --mode task\nstarted.set()\nawait asyncio.sleep(600)",
}


def _kill_latency(session: KernelSession, cell: str) -> float:
    """Seconds from `Job.kill()` to the job ending, measured inside the kernel."""
    session.run("import asyncio, threading, time\nstarted = threading.Event()")
    session.run(cell)
    job = session.eval("len(jobs)")
    session.run("started.wait(10)")
    return session.eval(
        f"(lambda t0: (jobs[{job}].kill(timeout=5), time.perf_counter() - t0)[1])(time.perf_counter())"
    )


def run() -> list[Row]:
    rows = []
    session = KernelSession(stock_kernel_argv(), load_ext=True)
    try:
        background_sleepers(session)  # warm up: runners, loop, imports
        value = min(background_sleepers(session) for _ in range(3))
        rows.append(
            Row("8 bg cells x 0.5 s", "ipykernel + polycell ext", value, "s", "<= 0.7 s", value <= 0.7)
        )
        for label, cell in KILL_CASES.items():
            latency = max(_kill_latency(session, cell) for _ in range(3))
            rows.append(Row("kill latency", label, latency * 1000, "ms", "< 100 ms", latency < 0.1))
    finally:
        session.close()
    session = KernelSession(stock_kernel_argv(), load_ext=False)
    try:
        value = _stock_serial(session)
        rows.append(Row("8 bg cells x 0.5 s", "stock ipykernel (no %%bg)", value, "s"))
    finally:
        session.close()
    return rows


if __name__ == "__main__":
    print_rows(run())
