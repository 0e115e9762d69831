"""Many jobs: the kernel's memory while 1,000 run and after they end, and ``%jobs`` over 10,000.

Memory (the polycell kernel, its resident set size from /proc): before, while
1,000 ``%%bg --mode task`` cells sleep, after they have ended, and after a
second 1,000 have run and ended. The second thousand shows what an ended job
keeps: its `Job`, its small journal (each printed one line), its cell's input
in IPython's history. Bar: under 20 KB per ended job, beside a journal that may
hold up to 16 MB of output while the job's output is kept.

``%jobs`` with 10,000 ended jobs (started through ``jobs.submit``): the round
trip of the cell that lists them. Bar: under 1 s.
"""

from __future__ import annotations

import time

import psutil

from harness import POLYCELL_KERNEL, KernelSession, Row, print_rows

JOBS = 1000
ENDED = 10_000


def _rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _run_cells(session: KernelSession, first: int, sleep: float) -> None:
    for n in range(first, first + JOBS):
        session.execute(f"%%bg --mode task\nawait asyncio.sleep({sleep})\nprint({n})")


def _all_ended(session: KernelSession, total: int) -> None:
    deadline = time.monotonic() + 300
    while session.eval("(len(jobs), len(jobs.running()))") != (total, 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{total} jobs did not all end within 300 s")
        time.sleep(0.05)


def run() -> list[Row]:
    rows = []
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run("import asyncio, gc")
        pid = session.pid
        before = _rss(pid)
        _run_cells(session, 0, 5.0)
        while session.eval("len(jobs)") < JOBS:  # every cell has started its job
            time.sleep(0.05)
        running = _rss(pid)
        _all_ended(session, JOBS)
        session.run("gc.collect()")
        ended = _rss(pid)
        _run_cells(session, JOBS, 0.01)
        _all_ended(session, 2 * JOBS)
        session.run("gc.collect()")
        ended_twice = _rss(pid)
        per_job_kb = (ended_twice - ended) * 1024 / JOBS
        bench = "kernel memory"
        rows.append(Row(bench, "before any job", before, "MB"))
        rows.append(Row(bench, f"{JOBS:,} task jobs running", running, "MB"))
        rows.append(Row(bench, f"{JOBS:,} jobs ended", ended, "MB"))
        rows.append(Row(bench, f"{2 * JOBS:,} jobs ended", ended_twice, "MB"))
        rows.append(Row(bench, "growth per ended job", per_job_kb, "KB", "< 20 KB", per_job_kb < 20))

        session.run(f"_ = [jobs.submit('thread', int) for _ in range({ENDED})]")
        _all_ended(session, 2 * JOBS + ENDED)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            session.run("%jobs", timeout=120)
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append(Row("%jobs", f"{2 * JOBS + ENDED:,} ended jobs", best, "s", "< 1 s", best < 1.0))
    finally:
        session.close()
    return rows


if __name__ == "__main__":
    print_rows(run())
