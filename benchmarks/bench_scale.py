"""Many jobs: the kernel's memory while 1,000 run and after they end, and ``%jobs`` over 10,000.

Memory (the polycell kernel, its resident set size from /proc): before, while
1,000 ``%%bg --mode task`` cells sleep, after they have ended, and after a
second 1,000 have run and ended; ended means the client has each job's end
update, so that no message of theirs is still queued in the kernel. Each
figure after a garbage collection and a ``malloc_trim``: without the trim, the
heap a burst of messages took and freed stayed with the process in one run of
three, and read as 28-50 KB per ended job where the trimmed runs read 5-7 KB.
The second thousand shows what an ended job keeps: its `Job`, its small
journal (each printed one line), its cell's input in IPython's history. Bar:
under 20 KB per ended job, beside a journal that may hold up to 16 MB of
output while the job's output is kept.

``%jobs`` with 10,000 ended jobs (started through ``jobs.submit``): the round
trip of the cell that lists them. Bar: under 1 s.
"""

from __future__ import annotations

import time

import psutil

from harness import POLYCELL_KERNEL, KernelSession, Row, print_rows, wait_for_ended_handles

JOBS = 1000
# What the kernel keeps, not what its allocator has not given back: glibc keeps the heap freed by
# threads other than the main one (ZeroMQ's, the publisher's) until told to trim it.
TRIM = "gc.collect(); getattr(ctypes.CDLL(None), 'malloc_trim', lambda pad: 0)(0)"
ENDED = 10_000


def _rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _run_cells(session: KernelSession, first: int, sleep: float) -> list[str]:
    return [
        session.execute(f"%%bg --mode task\nawait asyncio.sleep({sleep})\nprint({n})")
        for n in range(first, first + JOBS)
    ]


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
        session.run("import asyncio, ctypes, gc")
        pid = session.pid
        session.run(TRIM)
        before = _rss(pid)
        sent = _run_cells(session, 0, 5.0)
        while session.eval("len(jobs)") < JOBS:  # every cell has started its job
            time.sleep(0.05)
        session.run(TRIM)
        running = _rss(pid)
        # Ended, and their output delivered: nothing of theirs still queued for the client.
        wait_for_ended_handles(session, sent, timeout=300)
        session.run(TRIM)
        ended = _rss(pid)
        wait_for_ended_handles(session, _run_cells(session, JOBS, 0.01), timeout=300)
        session.run(TRIM)
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
