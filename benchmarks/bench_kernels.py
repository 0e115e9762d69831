"""The polycell kernel against stock ipykernel and async-kernel, side by side in one run.

* Trivial-cell round trip (``1``): median over 200 cells per kernel, from
  execute_request to reply and idle. The three kernels are measured in
  interleaved rounds of 50 so that load from other processes hits all alike.
  Bar: polycell <= 1.05x ipykernel.
* 8 background cells each sleeping 0.5 s, sent back to back: wall time until
  all 8 are done. polycell kernel: ``%%bg`` cells (they start from the shell
  channel thread); async-kernel: its ``# thread`` first-line convention (done =
  all 8 replies); stock ipykernel: plain cells, run one after another. Bar: <= 0.7 s.
"""

from __future__ import annotations

import statistics
import sys
import time

from harness import (
    BG_CELLS,
    BG_SLEEP,
    POLYCELL_KERNEL,
    KernelSession,
    Row,
    background_sleepers,
    print_rows,
    stock_kernel_argv,
)

ASYNC_KERNEL = [sys.executable, "-m", "async_kernel", "start", "--connection_file={connection_file}"]
ROUNDS, PER_ROUND = 4, 50


def _round_trips(session: KernelSession, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run("1")
        times.append(time.perf_counter() - t0)
    return times


def _replies(session: KernelSession, code: str) -> float:
    t0 = time.perf_counter()
    ids = [session.execute(code) for _ in range(BG_CELLS)]
    for msg_id in ids:
        session.reply(msg_id, timeout=60)
    return time.perf_counter() - t0


def run() -> list[Row]:
    kernels = {
        "polycell kernel": POLYCELL_KERNEL,
        "stock ipykernel": stock_kernel_argv(),
        "async-kernel": ASYNC_KERNEL,
    }
    sessions = {name: KernelSession(argv, load_ext=False) for name, argv in kernels.items()}
    rows = []
    try:
        for session in sessions.values():
            session.run("import time")
            _round_trips(session, 20)  # warm up
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(ROUNDS):
            for name, session in sessions.items():
                times[name] += _round_trips(session, PER_ROUND)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["polycell kernel"] / medians["stock ipykernel"]
        for name, median in medians.items():
            is_polycell = name == "polycell kernel"
            rows.append(
                Row(
                    "trivial cell round trip",
                    name,
                    median * 1000,
                    "ms",
                    "<= 1.05x ipykernel" if is_polycell else "",
                    ratio <= 1.05 if is_polycell else None,
                    {"ratio_vs_ipykernel": round(median / medians["stock ipykernel"], 3)},
                )
            )
        background_sleepers(sessions["polycell kernel"])  # warm up the thread runner
        value = min(background_sleepers(sessions["polycell kernel"]) for _ in range(3))
        rows.append(Row("8 bg cells x 0.5 s", "polycell kernel %%bg", value, "s", "<= 0.7 s", value <= 0.7))
        value = min(_replies(sessions["async-kernel"], f"# thread\ntime.sleep({BG_SLEEP})") for _ in range(3))
        rows.append(Row("8 bg cells x 0.5 s", "async-kernel # thread", value, "s"))
        value = _replies(sessions["stock ipykernel"], f"time.sleep({BG_SLEEP})")
        rows.append(Row("8 bg cells x 0.5 s", "stock ipykernel (serial)", value, "s"))
    finally:
        for session in sessions.values():
            session.close()
    return rows


if __name__ == "__main__":
    print_rows(run())
