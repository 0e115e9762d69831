"""What every benchmark shares: kernels to measure, timing, and one row format.

A benchmark module ``bench_<topic>.py`` has a ``run() -> list[Row]`` that
measures side by side (polycell and its peers in the same run) and returns
rows; ``benchmarks/run`` collects them into one table. Run a module alone with
``python benchmarks/bench_<topic>.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from kernel_session import POLYCELL_KERNEL, KernelSession  # noqa: E402

__all__ = [
    "BG_CELLS",
    "BG_SLEEP",
    "POLYCELL_KERNEL",
    "KernelSession",
    "Row",
    "background_sleepers",
    "machine",
    "median_round_trip",
    "print_rows",
    "stock_kernel_argv",
    "wait_for_ended_handles",
    "wait_running",
]


@dataclass
class Row:
    """One measured figure, its bar, and whether the bar is met."""

    bench: str
    subject: str  # which kernel / mode was measured
    value: float
    unit: str
    bar: str = ""  # human text of the bar, e.g. "<= 0.7 s"
    ok: bool | None = None  # None when the row is a reference, not held to a bar
    extra: dict[str, Any] = field(default_factory=dict)


def stock_kernel_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def median_round_trip(session: KernelSession, code: str = "1", n: int = 200) -> float:
    """Median seconds from execute_request to its reply and idle, over `n` runs."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(code)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wait_running(session: KernelSession, job_ids: range, timeout: float = 30) -> None:
    """Wait until each of `job_ids` is running (a busy job is measured against only once it runs)."""
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while session.eval(f"jobs[{job_id}].status.value") != "running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"busy job {job_id} did not start in {timeout}s")
            time.sleep(0.01)


def wait_for_ended_handles(session: KernelSession, sent: Iterable[str], timeout: float = 60) -> None:
    """Until the handle of the job each cell of `sent` (msg_ids) started says the job ended.

    polycell sends that update after the job's last output, so the client then has every message
    of those jobs, and none is still queued in the kernel.

    A later cell's idle is no such mark: the publisher sends a job's output in batches, on a
    thread of its own, and may send its last one after a cell that ran meanwhile went idle.
    """
    deadline = time.monotonic() + timeout
    waiting = set(sent)
    seen = 0
    with session._cond:
        while waiting:
            for msg in session.messages[seen:]:
                status = msg.get("metadata", {}).get("polycell", {}).get("status")
                if msg["msg_type"] == "update_display_data" and status in ("done", "failed", "killed"):
                    waiting.discard(msg["parent_header"].get("msg_id"))
            seen = len(session.messages)
            remaining = deadline - time.monotonic()
            if waiting and remaining <= 0:
                raise RuntimeError(f"{len(waiting)} job handles never said that their job ended")
            if waiting:
                session._cond.wait(remaining)


BG_CELLS, BG_SLEEP = 8, 0.5


def background_sleepers(session: KernelSession) -> float:
    """Seconds until BG_CELLS ``%%bg`` cells sleeping BG_SLEEP s, sent back to back, are all done."""
    session.run("import time")
    first_job = session.eval("len(jobs)") + 1
    t0 = time.perf_counter()
    for _ in range(BG_CELLS):
        session.execute(f"%%bg\ntime.sleep({BG_SLEEP})")
    for job_id in range(first_job, first_job + BG_CELLS):
        session.wait_job_end(job_id, timeout=60)
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def print_rows(rows: list[Row]) -> None:
    width = max((len(r.bench) for r in rows), default=10)
    for r in rows:
        verdict = "" if r.ok is None else ("PASS" if r.ok else "FAIL")
        print(f"{r.bench:<{width}}  {r.subject:<22} {r.value:>10.4g} {r.unit:<4} {r.bar:<18} {verdict}")
        if r.extra:
            print(f"{'':<{width}}    {r.extra}")


def dump(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=2))
